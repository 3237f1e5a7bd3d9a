"""Numeric precision: float32, or mixed bfloat16/float16, chosen per run, measured where it is `auto`.

Which precision trains faster depends on the CPU: mixed bfloat16 ran 2.26x faster than float32 on an
AMD EPYC with AVX-512 BF16, and 1.36x slower on an Intel Xeon that exposed no AMX (issue 19). So `auto`
never assumes. On a GPU it takes mixed float16; on a CPU it times a few training steps of the run's own
model in both precisions and keeps the faster. The timings are cached per CPU and TensorFlow version
(`precision-<cpu>.json` in the cache folder), so each model scale is measured once per machine.

Mixed precision computes in 16 bits and keeps float32 weights; every architecture's softmax stays
float32 (`layers.classifier`).
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import os
import platform
import time
from pathlib import Path
from typing import Callable

from experiments.cache import atomic_path, cache_dir
from experiments.errors import UserError

# precision -> Keras dtype policy
POLICIES = {"float32": "float32", "bfloat16": "mixed_bfloat16", "float16": "mixed_float16"}
CHOICES = ("auto", *POLICIES)
MEASURE_SECONDS = 0.5  # per precision and round; two rounds, alternating, keep each one's best
# A second round only while the measurement is this cheap, or the first one too close to call: where
# bfloat16 is emulated, one cnn_deep step at batch 128 took 8-12 s (7-10x float32) and two rounds 75 s.
MEASURE_BUDGET_SECONDS = 10.0
CLEAR_RATIO = 2.0  # a first round this far apart is decided: no burst of other work explains it


@dataclasses.dataclass(frozen=True)
class Choice:
    precision: str  # a key of POLICIES
    reason: str  # one line: why (the two timings where measured)
    timings: dict = dataclasses.field(default_factory=dict)  # precision -> seconds per training step

    @property
    def policy(self) -> str:
        return POLICIES[self.precision]


def check_precision(precision: str, options: dict | None = None, gpus: int | None = None) -> None:
    """Refuse an unknown precision, float16 without a GPU, and a precision among architecture `options`,
    each in one line."""
    if "precision" in (options or {}):
        raise UserError("precision is a parameter of the run, not an architecture option: pass --precision "
                        "(-P precision=...) and drop it from options")
    if precision not in CHOICES:
        raise UserError(f"unknown precision {precision!r}; choose one of: {', '.join(CHOICES)}")
    if precision == "float16" and not (gpu_count() if gpus is None else gpus):
        raise UserError("precision float16 needs a GPU: no GPU is visible, and a CPU runs float16 math "
                        "many times slower than float32; use auto, bfloat16 or float32")


def gpu_count() -> int:
    import tensorflow as tf

    return len(tf.config.list_physical_devices("GPU"))


def choose(precision: str, scale: str, timer: Callable[[str], Callable[[], float]], gpus: int | None = None
           ) -> Choice:
    """The precision a run trains in. `scale` names the model and batch being measured (the cache key within
    this machine's file); `timer(policy)` prepares the model under a Keras dtype policy and returns a function
    that times a few training steps (seconds per step)."""
    check_precision(precision, gpus=gpus)
    if precision != "auto":
        return Choice(precision, f"{precision}: set by the run")
    if gpu_count() if gpus is None else gpus:
        return Choice("float16", "auto: a GPU is visible, so mixed float16 (its tensor cores)")
    path = cache_dir() / f"precision-{machine_key()}.json"
    cached = _read(path)
    if _valid(cached.get(scale)):
        timings, when = cached[scale]["timings"], cached[scale]["measured"]
        how = f"measured {when}, cached"
    else:
        timings = measure_both(timer)
        when = datetime.date.today().isoformat()
        cached[scale] = {"timings": timings, "measured": when}
        how = f"measured {when}"
        try:
            with atomic_path(path) as staging:
                staging.write_text(json.dumps(cached, indent=1, sort_keys=True))
        except OSError as exc:  # a full disk costs the cache (the next run measures again), not the run
            print(f"precision timings not cached ({exc.strerror}); free space in {path.parent} to reuse them",
                  flush=True)
            how += ", not cached"
    fastest = min(timings, key=timings.get)
    other = max(timings, key=timings.get)
    reason = (f"auto: {fastest} {timings[fastest] * 1000:.1f} ms/step against {other} "
              f"{timings[other] * 1000:.1f} ms/step ({timings[other] / timings[fastest]:.2f}x) for {scale} on "
              f"{cpu_model()}, TensorFlow {tensorflow_version()}; {how}")
    return Choice(fastest, reason, timings)


def measure_both(timer: Callable[[str], Callable[[], float]], rounds: int = 2) -> dict:
    """{precision: seconds per step} of float32 and bfloat16, timed in alternation, each keeping its best
    round: a burst of other work on a shared machine then slows one round, not one precision. Rounds after
    the first run only within MEASURE_BUDGET_SECONDS, or while the two are within CLEAR_RATIO."""
    start = time.perf_counter()
    timers = {precision: timer(POLICIES[precision]) for precision in ("float32", "bfloat16")}
    timings = {precision: float("inf") for precision in timers}
    for round_ in range(rounds):
        if (round_ and time.perf_counter() - start > MEASURE_BUDGET_SECONDS
                and max(timings.values()) >= CLEAR_RATIO * min(timings.values())):
            break
        for precision, time_steps in timers.items():
            timings[precision] = min(timings[precision], time_steps())
    return timings


def step_timer(build: Callable[[], object], policy: str, batch_size: int, image_shape: tuple, num_classes: int,
               seconds: float = MEASURE_SECONDS) -> Callable[[], float]:
    """Build the model `build()` makes under `policy`, trace its training step on random uint8 images, and
    return a function that times its steps for about `seconds` (seconds per step)."""
    import keras
    import numpy as np

    from experiments.models import dtype_policy

    with dtype_policy(policy):
        model = build()
    model.compile(optimizer=keras.optimizers.SGD(0.01, momentum=0.9), loss="categorical_crossentropy")
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (batch_size, *image_shape), dtype=np.uint8)
    labels = np.eye(num_classes, dtype=np.float32)[rng.integers(0, num_classes, batch_size)]
    model.train_on_batch(images, labels)  # traces the step

    def time_steps() -> float:  # at least one step: a slow precision's step may take longer than `seconds`
        steps, start = 0, time.perf_counter()
        while steps < 1 or time.perf_counter() - start < seconds:
            model.train_on_batch(images, labels)
            steps += 1
        return (time.perf_counter() - start) / steps

    return time_steps


def cpu_model() -> str:
    return _cpuinfo("model name") or platform.processor() or platform.machine()


def cpu_flags() -> str:
    return _cpuinfo("flags")


def _cpuinfo(field: str) -> str:
    """A field of /proc/cpuinfo's first processor ("" where there is none, as off Linux)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(field):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def tensorflow_version() -> str:
    import tensorflow as tf

    return tf.__version__


def machine_key() -> str:
    """The CPU (its name, and its instruction sets: one name can hide CPUs with and without AMX or AVX-512
    BF16), its core count and the TensorFlow version, as a file-name-safe key."""
    name = "".join(c if c.isalnum() else "-" for c in cpu_model()).strip("-")[:40]
    identity = f"{cpu_model()}|{cpu_flags()}|{os.cpu_count()}|{tensorflow_version()}"
    return f"{name}-{hashlib.sha256(identity.encode()).hexdigest()[:10]}"


def _valid(entry) -> bool:
    try:
        return all(entry["timings"][p] > 0 for p in ("float32", "bfloat16")) and bool(entry["measured"])
    except (KeyError, TypeError):
        return False


def _read(path: Path) -> dict:
    try:
        cached = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return cached if isinstance(cached, dict) else {}


def for_training(config, spec) -> Choice:
    """The precision `config` (a TrainConfig) trains its architecture in, measured at its own scale: its
    options, image shape, class count and batch size."""
    from experiments.models import get_model_entry

    entry = get_model_entry(config.arch)
    options = dict(config.options)
    if entry.recipe.features:  # timed with random weights: a download would only slow the timing
        options["weights"] = None
    scale = (f"{config.arch}{json.dumps(config.options, sort_keys=True) if config.options else ''} "
             f"{'x'.join(map(str, spec.image_shape))} {spec.num_classes} classes, batch {config.batch_size}")

    built = []

    def timer(policy: str):
        built.append(policy)
        return step_timer(lambda: entry.build(spec, **options), policy, config.batch_size, spec.image_shape,
                          spec.num_classes)

    choice = choose(config.precision, scale, timer)
    if built:
        import keras

        keras.backend.clear_session()  # the timed models' layer names must not shift the trained model's
    return choice
