"""What tracking costs: the same training with and without MLflow, side by side in one process."""

from __future__ import annotations

import statistics
import time

from benchmarks.harness import benchmark
from experiments import train as training


@benchmark("tracking_overhead", "Wall time of train() (autolog, artifacts, model logging) against a plain model.fit")
def tracking_overhead(dataset: str = "cifar10", arch: str = "airbench_s", epochs: int = 5, repeats: int = 3,
                      limit: int = 0, batch_size: int = 128, data_dir: str = "") -> list[dict]:
    """By default the CIFAR-10 3-minute recipe (airbench at half width): a fast model, so the fixed
    per-epoch cost of tracking weighs the most."""
    import mlflow

    config = training.TrainConfig(dataset=dataset, arch=arch, epochs=epochs, limit=limit, batch_size=batch_size,
                                   data_dir=data_dir)
    config.validate()
    training.load_data(config)  # decoded once, outside the timings
    times: dict[str, list[float]] = {"plain model.fit": [], "train() with tracking": []}
    accuracies: dict[str, list[float]] = {name: [] for name in times}
    for repeat in range(repeats):
        # Alternate, so that both see the same machine state (thermal, caches, background load), and
        # swap which goes first each repeat (on 2026-11-27 plain went first each time, and was 6% slower).
        pair = [("plain model.fit", False), ("train() with tracking", True)]
        for name, track in pair if repeat % 2 == 0 else pair[::-1]:
            start = time.perf_counter()
            if track:
                with mlflow.start_run(nested=True):  # train() names it
                    result = training.train(config)
            else:
                result = training.train(config, track=False)  # the same steps, no MLflow
            times[name].append(time.perf_counter() - start)
            accuracies[name].append(result.test_accuracy)
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
