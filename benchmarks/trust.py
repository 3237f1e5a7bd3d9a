"""What the promotion evidence of issue 20 costs, feature by feature, at CIFAR-10's size.

    python -m benchmarks run trust_cost [arch=cnn_modern] [images=10000] [requests=40]

- `evaluation/predictions.npz`: its bytes for `images` test images of 10 classes (float16 probabilities);
- the 95% bootstrap interval (1,000 resamples), the ECE and the temperature fit (on a 5% holdout's logits);
- Grad-CAM per run: run_logging.log_gradcam (16 heatmaps and the figure) on `arch` at 32x32x3;
- `explain` per image: the served model (registry/classifier.py around `arch`) answering one image, in
  process and over HTTP (`mlflow models serve --env-manager local`), with and without explain; p50 of
  `requests` calls after a warm-up.

The models are untrained (their cost is the same), the images synthetic (benchmarks/evaluation.py).
"""

from __future__ import annotations

import json
import statistics
import time
import urllib.request
from pathlib import Path

import numpy as np

from benchmarks.evaluation import in_fresh_process, synthetic_test_split
from benchmarks.harness import benchmark


def seconds(call, repeats: int = 5) -> float:
    """The median wall time of `call()` over `repeats` calls."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def p50_ms(call, requests: int) -> float:
    call()  # warm-up: traces and first-use costs
    return 1000 * seconds(call, requests)


def post(url: str, payload: dict) -> dict:
    request = urllib.request.Request(f"{url}/invocations", json.dumps(payload).encode(),
                                     {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=120) as response:
        return json.load(response)


def probe(arch: str, images: int, requests: int, store: str) -> list[dict]:
    """In a fresh process, on its own sqlite store in `store`: the table's rows."""
    import mlflow

    from experiments import calibration, predictions, run_logging, scoring
    from experiments.datasets import take_images
    from experiments.models import Recipe, create_model, inference_model
    from registry.promote import log_serving_model
    from registry.serve import serving

    data, probabilities = synthetic_test_split(images, 10, accuracy=0.9)
    labels, correct = data.test.labels, probabilities.argmax(axis=1) == data.test.labels
    path = Path(store) / "predictions.npz"
    predictions.save(path, labels, probabilities, "digest")
    rows = [
        {"feature": f"evaluation/predictions.npz, {images:,} images x 10 classes", "unit": "MB (budget 1 MB)",
         "cost": round(path.stat().st_size / 1e6, 3)},
        {"feature": "bootstrap interval, 1,000 resamples", "unit": "s",
         "cost": round(seconds(lambda: scoring.bootstrap_interval(correct)), 4)},
        {"feature": "ECE, 15 bins", "unit": "s",
         "cost": round(seconds(lambda: scoring.expected_calibration_error(labels, probabilities)), 4)},
    ]
    held = np.log(probabilities[: images // 20].astype(np.float64))  # logits, up to a constant per image
    rows.append({"feature": f"temperature fit on {len(held):,} held-out logits", "unit": "s",
                 "cost": round(seconds(lambda: calibration.fit_temperature(held, labels[: len(held)])), 4)})

    uri = f"sqlite:///{store}/mlflow.db"
    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment(experiment_id=mlflow.create_experiment("trust_cost", artifact_location=f"{store}/artifacts"))
    model = inference_model(create_model(arch, data.spec), Recipe(), data.spec)
    with mlflow.start_run() as run:
        run_logging.log_model(model, data, {"loss": [1.0]})
        rows.append({"feature": f"Grad-CAM per run: {arch}, 16 images and the figure", "unit": "s",
                     "cost": round(seconds(lambda: run_logging.log_gradcam(model, data, probabilities), 3), 3)})
    served_uri, _ = log_serving_model(mlflow.MlflowClient(), run.info.run_id)
    served = mlflow.pyfunc.load_model(served_uri)
    one = take_images(data.test, np.arange(1))
    body = {"inputs": one.tolist()}
    with serving(served_uri, MLFLOW_TRACKING_URI=uri) as url:
        timings = {
            "in process": p50_ms(lambda: served.predict(one), requests),
            "in process, explain": p50_ms(lambda: served.predict(one, params={"explain": True}), requests),
            "over HTTP": p50_ms(lambda: post(url, body), requests),
            "over HTTP, explain": p50_ms(lambda: post(url, {**body, "params": {"explain": True}}), requests),
        }
    rows += [{"feature": f"served {arch}, 1 image, {how}", "unit": "ms p50", "cost": round(ms, 2)}
             for how, ms in timings.items()]
    return rows


@benchmark("trust_cost", "The cost of each piece of promotion evidence at CIFAR-10's size: the per-image "
                         "predictions file, the bootstrap interval, ECE, the temperature fit, Grad-CAM per run "
                         "and the served model's explain per image")
def trust_cost(arch: str = "cnn_modern", images: int = 10000, requests: int = 40) -> list[dict]:
    rows = in_fresh_process({"arch": arch, "images": images, "requests": requests}, "benchmarks.trust:probe")
    for how in ("in process", "over HTTP"):
        cost = {row["feature"]: row["cost"] for row in rows}
        plain, explained = cost[f"served {arch}, 1 image, {how}"], cost[f"served {arch}, 1 image, {how}, explain"]
        rows.append({"feature": f"explain adds, per image, {how}", "unit": "ms", "cost": round(explained - plain, 2)})
    return rows
