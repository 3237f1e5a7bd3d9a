"""Input and feature pipelines against what training consumes: decoding, the in-memory cache, VGG16 features."""

from __future__ import annotations

import time

from benchmarks.cpu import measured_peak
from benchmarks.harness import benchmark


def _training_images_per_s(model, config, split, steps: int) -> float:
    """Images/s that `model` trains at on `split`, through the project's compile path, after a warm-up."""
    from experiments.fit import compile_model, make_batches

    recipe = config.training_recipe()
    compile_model(model, recipe, config, steps * config.batch_size)
    batches = make_batches(split, config.batch_size, int(split.labels.max()) + 1).take(steps)
    model.fit(batches, epochs=1, verbose=0)
    start = time.perf_counter()
    model.fit(batches, epochs=1, verbose=0)
    return steps * config.batch_size / (time.perf_counter() - start)


@benchmark("data_loading", "Folder pipeline (JPEG decode + resize, then the in-memory cache) against training consumption")
def data_loading(dataset: str = "imagenette", image_size: int = 160, arch: str = "cnn_basic", batch_size: int = 128,
                 train_steps: int = 20, data_dir: str = "") -> list[dict]:
    from experiments.datasets import load_dataset
    from experiments.models import DataSpec, get_model_entry
    from experiments.train import TrainConfig

    config = TrainConfig(dataset, arch, batch_size=batch_size, image_size=image_size, data_dir=data_dir)
    config.validate()
    start = time.perf_counter()
    data = load_dataset(dataset, data_dir, image_size)  # decodes every file once into the cache
    decoded = len(data.train) + len(data.test)
    decode_rate = decoded / (time.perf_counter() - start)

    start = time.perf_counter()
    for _ in data.train.images.batch(batch_size).prefetch(2):
        pass
    cached_rate = len(data.train) / (time.perf_counter() - start)

    model = get_model_entry(arch).build(DataSpec(data.image_shape, data.num_classes, data.hflip), **config.options)
    training_rate = _training_images_per_s(model, config, data.train, train_steps)
    return [
        {"stage": "first pass: read, decode, resize (all splits)", "images_per_s": decode_rate,
         "ratio_to_training": decode_rate / training_rate},
        {"stage": "later epochs: the in-memory cache", "images_per_s": cached_rate,
         "ratio_to_training": cached_rate / training_rate},
        {"stage": f"training consumption ({arch}, {image_size} px, batch {batch_size})", "images_per_s": training_rate,
         "ratio_to_training": 1.0},
    ]


@benchmark("vgg16_features", "VGG16 feature extraction throughput against the float32 peak, and the cache's second run")
def vgg16_features(dataset: str = "imagenette", image_size: int = 160, batch_size: int = 64, limit: int = 0,
                   data_dir: str = "") -> list[dict]:
    from benchmarks.recipes import forward_flops
    from experiments.datasets import load_dataset
    from experiments.models import DataSpec
    from experiments.models import vgg16_features as build_extractor
    from experiments.features import cached_features, feature_cache_path

    data = load_dataset(dataset, data_dir, image_size, limit)
    # Random weights: the ImageNet file cannot be downloaded here, and the cost is the same.
    extractor = build_extractor(DataSpec(data.image_shape, data.num_classes), weights=None)
    key = "benchmark-random"
    feature_cache_path(extractor, data.train, key).unlink(missing_ok=True)
    extractor.predict(data.train.images.take(batch_size).batch(batch_size).map(lambda x, y: x), verbose=0)  # warm-up
    peak = measured_peak().get("float32")
    rows = []
    for attempt in ("first run (extracts, writes the cache)", "second run (reads the cache)"):
        start = time.perf_counter()
        cached_features(extractor, data.train, key, batch_size)
        seconds = time.perf_counter() - start
        rate = len(data.train) / seconds
        achieved = forward_flops(extractor) * rate / 1e9 if attempt.startswith("first") else float("nan")
        rows.append({"run": attempt, "seconds": seconds, "images_per_s": rate, "gflop_per_s": achieved,
                     "fraction_of_fp32_peak": achieved / peak if peak else float("nan")})
    return rows
