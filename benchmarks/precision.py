"""Does `precision=auto` pick the faster precision on this machine? Step times of float32 and mixed bfloat16
for a few architectures, against what auto chose (from an empty cache, as on a new machine)."""

from __future__ import annotations

import statistics
import time

from benchmarks.harness import benchmark, empty_cache

# The input each architecture is measured at: its dataset's (xresnet: Imagenette at 128 px).
SHAPES = {"xresnet": ((128, 128, 3), 10, 64)}  # arch: (image shape, classes, batch)
CIFAR10 = ((32, 32, 3), 10, 128)


@benchmark("precision", "Training step time in float32 and mixed bfloat16, and the precision auto chose; "
                        "acceptance: auto within 5% of the faster")
def precision(archs: str = "cnn_deep,airbench_s,xresnet", seconds: float = 3.0, rounds: int = 3) -> list[dict]:
    from experiments.models import DataSpec, get_model_entry
    from experiments.precision import POLICIES, for_training, step_timer
    from experiments.train import TrainConfig

    rows = []
    for arch in archs.split(","):
        shape, classes, batch = SHAPES.get(arch, CIFAR10)
        spec = DataSpec(shape, classes)
        config = TrainConfig("cifar10", arch, batch_size=batch)
        with empty_cache():  # auto measures, as on a new machine
            start = time.perf_counter()
            choice = for_training(config, spec)
            choice_seconds = time.perf_counter() - start
        # Then a longer measurement of each, alternating, median of the rounds.
        entry = get_model_entry(arch)
        timers = {p: step_timer(lambda: entry.build(spec), POLICIES[p], batch, shape, classes, seconds)
                  for p in ("float32", "bfloat16")}
        samples = {p: [] for p in timers}
        for _ in range(rounds):
            for p, time_steps in timers.items():
                samples[p].append(time_steps())
        step = {p: statistics.median(values) for p, values in samples.items()}
        fastest = min(step.values())
        rows.append({
            "arch": arch,
            "input": f"{'x'.join(map(str, shape))}, batch {batch}",
            "float32_ms": step["float32"] * 1000,
            "bfloat16_ms": step["bfloat16"] * 1000,
            "auto_chose": choice.precision,
            "auto_ms": step[choice.precision] * 1000,
            "auto_vs_faster": step[choice.precision] / fastest,
            "within_5pct": "yes" if step[choice.precision] <= 1.05 * fastest else "no",
            "auto_decision_s": choice_seconds,
        })
        print(rows[-1], flush=True)
    return rows
