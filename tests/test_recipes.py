"""The time-to-accuracy recipes: each builds, takes a finite training step, and repeats itself exactly."""

from __future__ import annotations

import math

import keras
import numpy as np
import pytest
from conftest import make_npz

from experiments.models import DataSpec, create_model, get_model_entry
from experiments.fit import compile_model
from experiments.train import TrainConfig, train

# Small widths keep each test to seconds; the layer structure is the recipe's own.
RECIPES = {
    "cnn_modern": {"widths": [16, 32, 32]},
    "airbench": {"widths": [16, 32, 32]},
    "airbench_s": {},  # named widths: the builders as the recipes use them
    "airbench_m": {},
    "xresnet": {"widths": [16, 16, 32, 32]},
}


@pytest.mark.parametrize("name", RECIPES)
def test_one_training_batch_gives_probabilities_and_a_finite_loss(name):
    spec = DataSpec((32, 32, 3), 10)
    model = create_model(name, spec, **RECIPES[name])
    config = TrainConfig(dataset="cifar10", arch=name, epochs=1, batch_size=8)
    compile_model(model, get_model_entry(name).recipe, config, num_train=8)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(8, 32, 32, 3), dtype=np.uint8)
    labels = keras.utils.to_categorical(rng.integers(0, 10, size=8), 10)
    loss = model.train_on_batch(images, labels, return_dict=True)["loss"]
    assert math.isfinite(loss) and loss > 0
    probabilities = model.predict(images, verbose=0)
    assert probabilities.shape == (8, 10)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=1e-3)


@pytest.mark.parametrize("name", RECIPES)
@pytest.mark.slow
def test_the_same_seed_gives_the_same_first_epoch_loss(name, tmp_path):
    make_npz(tmp_path / "cifar10.npz", n_train=64, n_test=16, shape=(32, 32, 3), classes=3)

    def first_epoch_loss(seed):
        result = train(dataset="cifar10", arch=name, epochs=1, batch_size=16, data_dir=str(tmp_path), seed=seed,
                       options=RECIPES[name], track=False)
        return result.history["loss"][0]

    first, again, other_seed = first_epoch_loss(5), first_epoch_loss(5), first_epoch_loss(6)
    assert math.isfinite(first)
    assert first == again
    assert first != other_seed  # the seed reaches the weights and the augmentation


def test_the_recipe_sets_the_sgd_momentum():
    config = TrainConfig(dataset="cifar10", arch="airbench", epochs=1, batch_size=8, recipe={"momentum": 0.85})
    model = create_model("airbench_s", DataSpec((32, 32, 3), 10))
    compile_model(model, config.training_recipe(), config, num_train=8)
    assert model.optimizer.momentum == 0.85 and model.optimizer.nesterov
    assert get_model_entry("airbench").recipe.momentum == 0.9


def test_airbench_takes_its_activation_as_an_option():
    """ReLU by default (oneDNN fuses it with conv and norm); GELU, airbench's own, as `options={"activation": "gelu"}`."""
    spec = DataSpec((32, 32, 3), 10)

    def activations(**options):
        model = create_model("airbench", spec, widths=[16, 32, 32], **options)
        return {layer.get_config()["activation"] for layer in model.layers if isinstance(layer, keras.layers.Activation)
                and layer.name != "probabilities"}

    assert activations() == {"relu"}
    assert activations(activation="gelu") == {"gelu"}
