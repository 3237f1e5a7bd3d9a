"""The time-to-accuracy recipes: each builds, takes a finite training step, and repeats itself exactly."""

from __future__ import annotations

import math

import keras
import numpy as np
import pytest
from conftest import make_npz

from experiments.errors import UserError
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
                       options=RECIPES[name], track=False, evaluate=False)
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


def test_cutmix_pastes_boxes_between_uint8_images_and_mixes_their_labels_by_area():
    """CutMix (recipe `cutmix`) works on the raw uint8 batches the models take: every output pixel is the
    same pixel of some image of the batch, and each label's mix matches the share of its pixels (to the
    rounding of the box's edges to whole pixels: Keras mixes by the box's exact area)."""
    from experiments.datasets import Split
    from experiments.fit import make_batches

    import tensorflow as tf

    # Each image one flat grey level, so a pixel's value names the image it came from.
    levels = np.arange(8, dtype=np.uint8) * 30
    images = np.broadcast_to(levels[:, None, None, None], (8, 64, 64, 3)).copy()
    split = Split(tf.data.Dataset.from_tensor_slices((images, np.arange(8))), np.arange(8), "levels")
    plain = next(iter(make_batches(split, 8, num_classes=8)))
    (mixed_images, mixed_labels), = make_batches(split, 8, num_classes=8, cutmix=1.0).take(1)

    assert mixed_images.dtype == tf.uint8 and plain[0].dtype == tf.uint8
    np.testing.assert_array_equal(plain[0].numpy(), images)  # off by default
    pixels, labels = mixed_images.numpy(), mixed_labels.numpy()
    assert set(np.unique(pixels)) <= set(levels.tolist())
    shares = np.stack([(pixels[..., 0] == level).mean(axis=(1, 2)) for level in levels], axis=1)
    np.testing.assert_allclose(labels, shares, atol=2 / 64)
    assert (labels.max(axis=1) < 1).any()  # some image did get a box from another


def test_xresnet_depths_set_the_residual_blocks_per_stage():
    spec = DataSpec((32, 32, 3), 10)

    def blocks(**options):
        model = create_model("xresnet", spec, widths=[8, 8, 16, 16], **options)
        return sum(isinstance(layer, keras.layers.Add) for layer in model.layers)

    assert blocks() == 4 and blocks(depths=[2, 2, 2, 2]) == 8
    with pytest.raises(UserError, match=r"xresnet: depths \[2, 2\] must give one block count"):
        create_model("xresnet", spec, depths=[2, 2])
