"""What tracking costs: the same training with and without MLflow, side by side in one process."""

from __future__ import annotations

import os
import statistics
import time

from benchmarks.harness import benchmark
from experiments import train as training
from experiments.tracking import SYSTEM_METRICS_ENV, start_run

# (name, tracked, system metrics): tracking with and without the system metrics, so each cost shows.
VARIANTS = [("plain model.fit", False, "false"), ("train() with tracking", True, "true"),
            ("tracking, system metrics off", True, "false")]


@benchmark("tracking_overhead", "Wall time of train() (per-epoch metrics, system metrics, evaluation, artifacts, "
           "model logging) against a plain model.fit")
def tracking_overhead(dataset: str = "cifar10", arch: str = "airbench_s", epochs: int = 5, repeats: int = 3,
                      limit: int = 0, batch_size: int = 128, data_dir: str = "") -> list[dict]:
    """By default the CIFAR-10 3-minute recipe (airbench at half width): a fast model, so the fixed
    per-epoch cost of tracking weighs the most."""
    config = training.TrainConfig(dataset=dataset, arch=arch, epochs=epochs, limit=limit, batch_size=batch_size,
                                   data_dir=data_dir)
    config.validate()
    training.load_data(config)  # decoded once, outside the timings
    times: dict[str, list[float]] = {name: [] for name, _, _ in VARIANTS}
    accuracies: dict[str, list[float]] = {name: [] for name in times}
    switch = os.environ.get(SYSTEM_METRICS_ENV)
    for repeat in range(repeats):
        # Interleaved, so that all see the same machine state (thermal, caches, background load), and
        # rotated so that each goes first in turn (on 2026-11-27 plain went first each time, and was 6% slower).
        for name, track, system_metrics in VARIANTS[repeat % 3:] + VARIANTS[: repeat % 3]:
            os.environ[SYSTEM_METRICS_ENV] = system_metrics
            start = time.perf_counter()
            if track:
                with start_run(nested=True):  # train() names it; system metrics as the switch says
                    result = training.train(config)
            else:
                result = training.train(config, track=False)  # the same steps, no MLflow
            times[name].append(time.perf_counter() - start)
            accuracies[name].append(result.test_accuracy)
        print(f"repeat {repeat + 1}/{repeats}: " + ", ".join(f"{name} {seconds[-1]:.1f} s"
                                                            for name, seconds in times.items()), flush=True)
    if switch is None:
        os.environ.pop(SYSTEM_METRICS_ENV)
    else:
        os.environ[SYSTEM_METRICS_ENV] = switch
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
