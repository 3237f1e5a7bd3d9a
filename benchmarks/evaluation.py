"""What the end-of-run evaluation costs: run_logging.log_evaluation (MLflow's classifier evaluation,
our figures, the per-class table, the plots) on a CIFAR-10-sized test split.

    python -m benchmarks run evaluation_cost [images=10000] [classes=10] [repeats=3]

Each repeat is a fresh process, as each training run is: it imports TensorFlow, Keras and MLflow,
makes `images` synthetic 32x32x3 test images and softmax outputs that are right about `accuracy` of
the time, opens a run on a sqlite store in a temp dir (system metrics on, as train() does), logs a
tiny Keras model for the model id, then times log_evaluation: first as a run pays it (the first in its
process: scikit-learn and MLflow's evaluator are imported then), then again in a second run (warm).
Of each, the seconds inside mlflow.models.evaluate are timed apart. The budget is 5 s a run.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile

from benchmarks.harness import PROJECT_ROOT, benchmark

BUDGET_S = 5.0
CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def synthetic_test_split(images: int, classes: int, accuracy: float, seed: int = 0):
    """(ImageData, probabilities): random images and labels; softmax outputs whose top class is the
    true one for about `accuracy` of the images, with spread-out confidences (a real model's shape)."""
    import numpy as np

    from experiments.datasets import ImageData, array_split

    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, images)
    pixels = rng.integers(0, 256, (images, 32, 32, 3), dtype=np.uint8)
    names = CIFAR10_CLASSES if classes == len(CIFAR10_CLASSES) else [f"class_{i}" for i in range(classes)]
    logits = rng.normal(0.0, 1.0, (images, classes))
    right = rng.random(images) < accuracy
    logits[np.arange(images), labels] = np.where(right, logits.max(axis=1) + rng.exponential(1.0, images), -1.0)
    probabilities = np.exp(logits - logits.max(axis=1, keepdims=True))
    probabilities = (probabilities / probabilities.sum(axis=1, keepdims=True)).astype(np.float32)
    train = array_split(pixels[:classes], labels[:classes])
    data = ImageData("synthetic", names, (32, 32, 3), train, array_split(pixels, labels), source=tempfile.gettempdir())
    return data, probabilities


def tiny_model(classes: int):
    import keras

    inputs = keras.Input((32, 32, 3), dtype="uint8")
    x = keras.layers.GlobalAveragePooling2D()(keras.layers.Rescaling(1 / 255)(inputs))
    return keras.Model(inputs, keras.layers.Dense(classes, activation="softmax")(x))


def probe(images: int, classes: int, accuracy: float, store: str) -> dict:
    """In a fresh process: seconds of log_evaluation, cold then warm, each with its MLflow-evaluate part."""
    import time

    import mlflow

    from experiments import evaluate, run_logging
    from experiments.calibration import Served
    from experiments.fit import score_predictions
    from experiments.tracking import start_run

    inside = []
    standard = evaluate.standard_evaluation

    def timed_standard_evaluation(*args, **kwargs):
        start = time.perf_counter()
        try:
            return standard(*args, **kwargs)
        finally:
            inside.append(time.perf_counter() - start)

    evaluate.standard_evaluation = timed_standard_evaluation  # run_logging calls it through the module
    mlflow.set_tracking_uri(f"sqlite:///{store}/mlflow.db")
    experiment_id = mlflow.create_experiment("evaluation_cost", artifact_location=f"{store}/artifacts")
    mlflow.set_experiment(experiment_id=experiment_id)
    data, probabilities = synthetic_test_split(images, classes, accuracy)
    accuracy_, loss = score_predictions(data.test.labels, probabilities)
    history = {"loss": [1.0, 0.8], "accuracy": [0.5, accuracy]}
    seconds = []
    for _ in range(2):
        with start_run():
            model_id = run_logging.log_model(tiny_model(classes), data, history)
            start = time.perf_counter()
            run_logging.log_evaluation(data, Served(probabilities, 1.0, probabilities), history, accuracy_, loss,
                                       model_id)
            seconds.append(time.perf_counter() - start)
    return {"cold_s": seconds[0], "warm_s": seconds[1], "cold_evaluate_s": inside[0], "warm_evaluate_s": inside[1],
            "test_accuracy": accuracy_, "load_avg_1min": os.getloadavg()[0]}


def in_fresh_process(settings: dict, probe: str = "benchmarks.evaluation:probe"):
    """`probe` (module:function) called with `settings` and a temporary `store` folder in a fresh process,
    as each training run is; returns its JSON result."""
    module, function = probe.split(":")
    with tempfile.TemporaryDirectory(prefix="probe-") as store:
        code = (f"import json; from {module} import {function}; "
                f"print('RESULT', json.dumps({function}(**{dict(settings, store=store)!r})))")
        # The probe's own store, not the benchmark run's (nor any run an outer `mlflow run` started).
        env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
        out = subprocess.run([sys.executable, "-c", code], cwd=PROJECT_ROOT, capture_output=True, text=True,
                             env={**env, "TF_CPP_MIN_LOG_LEVEL": "2"})
    lines = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
    if out.returncode != 0 or not lines:
        raise RuntimeError(f"{probe} with {settings} failed:\n{out.stderr[-3000:]}")
    return json.loads(lines[-1].removeprefix("RESULT "))


@benchmark("evaluation_cost", "Seconds of run_logging.log_evaluation (MLflow's classifier evaluation, our figures, "
                              "tables and plots) on a synthetic 32x32x3 test split, each repeat a fresh process")
def evaluation_cost(images: int = 10000, classes: int = 10, accuracy: float = 0.75, repeats: int = 3) -> list[dict]:
    results = []
    for repeat in range(repeats):
        results.append(in_fresh_process({"images": images, "classes": classes, "accuracy": accuracy}))
        print(f"repeat {repeat + 1}/{repeats}: first in process {results[-1]['cold_s']:.2f} s, "
              f"again {results[-1]['warm_s']:.2f} s", flush=True)
    rows = []
    for phase, label in (("cold", "first in its process (as a run pays it)"), ("warm", "again, same process")):
        seconds = [r[f"{phase}_s"] for r in results]
        rows.append({
            "log_evaluation": label,
            "images": images,
            "classes": classes,
            "median_s": statistics.median(seconds),
            "min_s": min(seconds),
            "max_s": max(seconds),
            "mlflow_evaluate_s": statistics.median(r[f"{phase}_evaluate_s"] for r in results),
            "load_avg_1min": statistics.median(r["load_avg_1min"] for r in results),  # other work on the machine
            "within_5s_budget": "yes" if max(seconds) <= BUDGET_S else "no",
        })
    return rows
