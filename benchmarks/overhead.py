"""What tracking costs: the same training with and without MLflow, side by side in one process."""

from __future__ import annotations

import statistics
import time

from benchmarks.harness import benchmark
from experiments import train as training
from experiments.models import DataSpec, fit_patch_whitening, get_model_entry, inference_model


def plain_fit(config: training.TrainConfig) -> float:
    """train() without MLflow: the same data, model, recipe, fit and test predictions; returns test accuracy."""
    import keras
    import numpy as np

    keras.utils.set_random_seed(config.seed)
    data = training.load_data(config)
    recipe = config.training_recipe()
    spec = DataSpec(data.image_shape, data.num_classes, data.hflip)
    model = get_model_entry(config.arch).build(spec, **config.options)
    fit_patch_whitening(model, training._first_images(data.train, 5000))
    training._fit(model, config, data, recipe, training._fit_splits(config, data), [], 0)
    model = inference_model(model, recipe, spec)
    probabilities = model.predict(training._images(data.test, config.batch_size), verbose=0)
    return float(np.mean(probabilities.argmax(axis=1) == data.test.labels))


@benchmark("tracking_overhead", "Wall time of train() (autolog, artifacts, model logging) against a plain model.fit")
def tracking_overhead(dataset: str = "cifar10", arch: str = "cnn_modern", epochs: int = 5, repeats: int = 3,
                      limit: int = 0, batch_size: int = 128, data_dir: str = "") -> list[dict]:
    import mlflow

    config = training.TrainConfig(dataset=dataset, arch=arch, epochs=epochs, limit=limit, batch_size=batch_size,
                                   data_dir=data_dir)
    config.validate()
    training.load_data(config)  # decoded once, outside the timings
    times: dict[str, list[float]] = {"plain model.fit": [], "train() with tracking": []}
    accuracies: dict[str, list[float]] = {name: [] for name in times}
    for repeat in range(repeats):
        # Alternate, so that both see the same machine state (thermal, caches, background load).
        start = time.perf_counter()
        accuracies["plain model.fit"].append(plain_fit(config))
        times["plain model.fit"].append(time.perf_counter() - start)

        start = time.perf_counter()
        with mlflow.start_run(run_name=f"tracked-{repeat}", nested=True):
            result = training.train(config)
        times["train() with tracking"].append(time.perf_counter() - start)
        accuracies["train() with tracking"].append(result.test_accuracy)
        print(f"repeat {repeat + 1}/{repeats}: plain {times['plain model.fit'][-1]:.1f} s, "
              f"tracked {times['train() with tracking'][-1]:.1f} s", flush=True)
    baseline = statistics.median(times["plain model.fit"])
    return [
        {
            "variant": name,
            "median_s": statistics.median(seconds),
            "min_s": min(seconds),
            "max_s": max(seconds),
            "ratio_to_plain": statistics.median(seconds) / baseline,
            "test_accuracy": statistics.median(accuracies[name]),
        }
        for name, seconds in times.items()
    ]
