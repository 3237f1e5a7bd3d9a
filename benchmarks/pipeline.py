"""Input and feature pipelines against what training consumes: decoding, the in-memory cache, VGG16 features."""

from __future__ import annotations

import time

from benchmarks.cpu import measured_peak
from benchmarks.harness import benchmark, empty_cache


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


@benchmark("data_loading", "Folder pipeline (JPEG decode + resize, then the in-memory cache) and a compressed .npz "
           "(first load, later loads) against training consumption")
def data_loading(dataset: str = "imagenette", image_size: int = 160, arch: str = "cnn_basic", batch_size: int = 128,
                 train_steps: int = 20, data_dir: str = "", npz: str = "cifar10") -> list[dict]:
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
    rows = [
        {"stage": "first pass: read, decode, resize (all splits)", "seconds": decoded / decode_rate,
         "images_per_s": decode_rate, "ratio_to_training": decode_rate / training_rate},
        {"stage": "later epochs: the in-memory cache", "seconds": len(data.train) / cached_rate,
         "images_per_s": cached_rate, "ratio_to_training": cached_rate / training_rate},
    ]
    if npz:
        rows += [{**row, "ratio_to_training": row["images_per_s"] / training_rate} for row in _npz_loads(npz, data_dir)]
    return rows + [{"stage": f"training consumption ({arch}, {image_size} px, batch {batch_size})",
                    "seconds": batch_size / training_rate, "images_per_s": training_rate, "ratio_to_training": 1.0}]


def _npz_loads(name: str, data_dir: str) -> list[dict]:
    """Reading a compressed `.npz` dataset: the first load decodes it into an empty cache, a later one maps it."""
    import os
    from pathlib import Path

    from experiments.datasets import find_local
    from experiments.datasets.arrays import read_npz

    folder = data_dir or os.environ.get("CNN_DATA_DIR", "")
    path = find_local(Path(folder), (name,)) if folder else None
    if path is None or path.suffix != ".npz":
        return []
    rows = []
    with empty_cache():  # the first load decodes, as on a new machine
        for stage in ("first load: decode into the cache", "later loads: memory-map the decoded arrays"):
            start = time.perf_counter()
            arrays = read_npz(path)
            images = sum(len(arrays[k]) for k in ("x_train", "x_test")) if "x_test" in arrays else 0
            sum(int(a.reshape(-1)[::4096].sum()) for a in arrays.values())  # touch every array
            seconds = time.perf_counter() - start
            rows.append({"stage": f"{path.name}, {stage}", "seconds": seconds, "images_per_s": images / seconds})
            del arrays
    return rows


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
