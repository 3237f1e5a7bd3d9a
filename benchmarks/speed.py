"""CPU speed options, each measured side by side against the same baseline, each in a fresh process.

Training throughput (images/s) of one architecture on in-memory uint8 data through the project's
own compile path, after a warm-up: XLA (`jit_compile`), `steps_per_execution`, float32 against
mixed bfloat16, TensorFlow's intra-op thread count, and the input pipeline without prefetch.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

from benchmarks.harness import PROJECT_ROOT, benchmark

VARIANTS = {
    "baseline (bfloat16, prefetch, default threads)": {},
    "jit_compile=True": {"jit_compile": True},
    "steps_per_execution=8": {"steps_per_execution": 8},
    "float32": {"precision": "float32"},
    "no prefetch": {"prefetch": False},
    "intra-op threads=1": {"threads": 1},
    "intra-op threads=2": {"threads": 2},
}


def probe(arch: str, batch_size: int, steps: int, jit_compile: bool = False, steps_per_execution: int = 1,
          precision: str = "bfloat16", prefetch: bool = True, threads: int = 0) -> float:
    """Training images/s of `arch` (CIFAR-10 shapes), timed over `steps` steps after a warm-up pass."""
    import tensorflow as tf

    if threads:
        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(threads)
    import keras
    import numpy as np

    from experiments.fit import compile_model
    from experiments.models import DataSpec, create_model, get_model_entry
    from experiments.precision import POLICIES
    from experiments.train import TrainConfig

    keras.utils.set_random_seed(0)
    spec = DataSpec((32, 32, 3), 10)
    entry = get_model_entry(arch)
    model = create_model(arch, spec, POLICIES[precision])
    config = TrainConfig("cifar10", arch, epochs=1, batch_size=batch_size)
    compile_model(model, entry.recipe, config, batch_size * steps, jit_compile=jit_compile,
                  steps_per_execution=steps_per_execution)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, size=(batch_size * steps, 32, 32, 3), dtype=np.uint8)
    labels = np.eye(10, dtype=np.float32)[rng.integers(0, 10, size=len(images))]
    batches = tf.data.Dataset.from_tensor_slices((images, labels)).batch(batch_size)
    if prefetch:
        batches = batches.prefetch(tf.data.AUTOTUNE)
    model.fit(batches, epochs=1, verbose=0)  # warm-up: traces, allocates
    import time

    start = time.perf_counter()
    model.fit(batches, epochs=1, verbose=0)
    return len(images) / (time.perf_counter() - start)


@benchmark("cpu_speed", "Training throughput under each CPU option, against the baseline, each in a fresh process")
def cpu_speed(arch: str = "airbench", batch_size: int = 128, steps: int = 60) -> list[dict]:
    rows = []
    baseline = None
    for name, variant in VARIANTS.items():
        arguments = json.dumps({"arch": arch, "batch_size": batch_size, "steps": steps, **variant})
        out = subprocess.run(
            [sys.executable, "-c", f"import json; from benchmarks.speed import probe; "
                                   f"print('IMAGES_PER_S', probe(**json.loads({arguments!r})))"],
            cwd=PROJECT_ROOT, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}, capture_output=True, text=True,
        )
        lines = [line for line in out.stdout.splitlines() if line.startswith("IMAGES_PER_S")]
        if out.returncode != 0 or not lines:
            raise RuntimeError(f"{name} failed:\n{out.stderr[-2000:]}")
        images_per_s = float(lines[-1].split()[1])
        baseline = baseline or images_per_s
        rows.append({"option": name, "images_per_s": images_per_s, "ratio_to_baseline": images_per_s / baseline})
        print(f"{name:45} {images_per_s:8.0f} img/s  x{images_per_s / baseline:.2f}", flush=True)
    return rows
