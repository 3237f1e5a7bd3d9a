"""What op determinism costs: the same training with `deterministic` off and on, side by side.

Each training runs in a fresh process (TensorFlow cannot switch op determinism off again), through
train() without tracking (the tracking cost is `tracking_overhead`'s), timed after the data is loaded.
Off and on alternate, so both see the same machine state.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys

from benchmarks.harness import PROJECT_ROOT, benchmark


def probe(settings: dict) -> dict:
    """Seconds, test accuracy and loss of one untracked train() of `settings` (a TrainConfig's fields)."""
    import time

    from experiments import train as training

    config = training.TrainConfig(**settings)
    config.validate()
    training.load_data(config)  # decoded outside the timing
    start = time.perf_counter()
    result = training.train(config, track=False)
    return {"seconds": time.perf_counter() - start, "test_accuracy": result.test_accuracy,
            "test_loss": result.test_loss}


def _in_subprocess(settings: dict) -> dict:
    code = f"import json; from benchmarks.determinism import probe; print('RESULT', json.dumps(probe({settings!r})))"
    out = subprocess.run([sys.executable, "-c", code], cwd=PROJECT_ROOT, capture_output=True, text=True,
                         env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})
    lines = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
    if out.returncode != 0 or not lines:
        raise RuntimeError(f"training with {settings} failed:\n{out.stderr[-2000:]}")
    return json.loads(lines[-1].removeprefix("RESULT "))


@benchmark("determinism", "Wall time of train() with TensorFlow op determinism off and on, each run in a fresh process")
def determinism(dataset: str = "cifar10", arch: str = "cnn_deep", epochs: int = 1, repeats: int = 3, limit: int = 0,
                batch_size: int = 128, seed: int = 0, data_dir: str = "") -> list[dict]:
    base = dict(dataset=dataset, arch=arch, epochs=epochs, limit=limit, batch_size=batch_size, seed=seed,
                data_dir=data_dir)
    runs: dict[str, list[dict]] = {"off": [], "on": []}
    for repeat in range(repeats):
        for name in runs:
            runs[name].append(_in_subprocess({**base, "deterministic": name == "on"}))
        print(f"repeat {repeat + 1}/{repeats}: off {runs['off'][-1]['seconds']:.1f} s, "
              f"on {runs['on'][-1]['seconds']:.1f} s", flush=True)
    baseline = statistics.median(r["seconds"] for r in runs["off"])
    rows = []
    for name, results in runs.items():
        seconds = [r["seconds"] for r in results]
        rows.append({
            "deterministic": name,
            "median_s": statistics.median(seconds),
            "min_s": min(seconds),
            "max_s": max(seconds),
            "ratio_to_off": statistics.median(seconds) / baseline,
            "test_accuracy": statistics.median(r["test_accuracy"] for r in results),
            # Bit-identical figures across the repeats: what determinism buys.
            "identical_results": "yes" if len({(r["test_accuracy"], r["test_loss"]) for r in results}) == 1 else "no",
            "seconds": ", ".join(f"{s:.1f}" for s in seconds),
        })
    return rows
