"""The VGG16 transfer path: frozen VGG16 runs once over the images (cached on disk), a small head trains on
the features, and the two are joined into one image-to-class model."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from experiments.cache import atomic_path, cache_dir, file_key
from experiments.calibration import Served
from experiments.datasets import ImageData, Split
from experiments.fit import RecordLearningRate, compile_model, image_batches, progress_verbosity
from experiments.models import DataSpec, vgg16_features, vgg16_head_layers


# The head fits on every training image's cached features (its one-pass recipe): none is left to calibrate on.
NOT_CALIBRATED = "not calibrated: the VGG16 head trains on the cached features of every training image"


def fit_vgg16_head(config, data: ImageData, spec: DataSpec, callbacks: list, policy: str = "float32"):
    """The tutorial's recipe: (model, history, test predictions), the head trained on cached features.
    The frozen VGG16 runs under the dtype `policy` (its features are kept per policy); the head in float32."""
    import keras

    from experiments.models import dtype_policy

    weights = None if config.weights == "none" else config.weights
    with dtype_policy(policy):
        extractor = vgg16_features(spec, weights)
    key = weights_key(config) + ("" if policy == "float32" else f"-{policy}")
    train_features = cached_features(extractor, data.train, key, config.batch_size)
    test_features = cached_features(extractor, data.test, key, config.batch_size)

    head = vgg16_head_layers(extractor.output_shape[1:], spec)
    compile_model(head, config.training_recipe(), config, len(data.train))
    onehot = np.eye(data.num_classes, dtype=np.float32)
    history = head.fit(
        train_features,
        onehot[data.train.labels],
        validation_data=(test_features, onehot[data.test.labels]),
        epochs=config.epochs,
        batch_size=config.batch_size,
        shuffle=True,
        callbacks=[RecordLearningRate(), *callbacks],
        verbose=progress_verbosity(),
    )
    # The head sees exactly the cached features, so predicting on them equals the full model's output.
    probabilities = head.predict(test_features, batch_size=config.batch_size, verbose=0)
    model = keras.Model(extractor.input, head(extractor.output), name="vgg16_head")
    return model, history.history, Served(probabilities, note=NOT_CALIBRATED)


def weights_key(config) -> str:
    if config.weights == "imagenet":
        return "imagenet"
    if config.weights == "none":
        return f"random-seed{config.seed}"  # random weights differ per seed
    return file_key(Path(config.weights))


def feature_cache_path(extractor, split: Split, weights_key: str) -> Path:
    """Where a split's VGG16 features are cached. Key: data digest + image size + weights."""
    shape = "x".join(str(d) for d in extractor.input_shape[1:])
    return cache_dir() / "features" / f"vgg16-{split.digest}-{shape}-{weights_key}.npy"


def read_cached(path: Path, rows: int) -> np.ndarray | None:
    """The cached features, or None if absent or damaged (a damaged cache is rebuilt, never used)."""
    if not path.is_file():
        return None
    try:
        features = np.load(path, allow_pickle=False)
        if features.shape[:1] != (rows,):
            raise ValueError(f"{features.shape[0]} rows for {rows} images")
    except (OSError, ValueError, EOFError) as exc:  # damaged outside our atomic writes
        print(f"rebuilding the unreadable VGG16 feature cache {path} ({exc})", flush=True)
        return None
    print(f"reusing cached VGG16 features {path}", flush=True)
    return features


def cached_features(extractor, split: Split, weights_key: str, batch_size: int) -> np.ndarray:
    """VGG16 features of a split, computed once."""
    import mlflow

    path = feature_cache_path(extractor, split, weights_key)
    features = read_cached(path, len(split))
    hit = features is not None
    if not hit:
        print(f"extracting VGG16 features for {len(split)} images (cached at {path})", flush=True)
        features = extractor.predict(image_batches(split, batch_size), verbose=progress_verbosity())
        features = np.asarray(features, np.float32)  # bfloat16 features are kept, and fed to the head, as float32
        try:
            with atomic_path(path) as staging:  # a kill never leaves a half-written cache under the real name
                with open(staging, "wb") as file:
                    np.save(file, features)
        except OSError as exc:  # a full disk costs the cache, not the run
            print(f"VGG16 features not cached ({exc.strerror}); free space in {path.parent} to reuse them", flush=True)
    if mlflow.active_run():
        mlflow.set_tag("feature_cache", "hit" if hit else "miss")
    return features
