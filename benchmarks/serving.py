"""Serving benchmark: batch-1 latency and throughput of `mlflow models serve` over HTTP on loopback.

    MLFLOW_TRACKING_URI=sqlite:///mlflow.db python benchmarks/serving.py \\
        [--models models:/cifar10@champion models:/imagenette@champion] [--requests 1000] [--clients 1 8]

Each model (and a trivial identity pyfunc, the ceiling of the serving stack) is served in turn with
`mlflow models serve --env-manager local`, warmed up, then hit with batch-1 requests by 1 and by 8
concurrent clients (threads with keep-alive connections), in two forms: uint8 pixels as JSON
(`inputs`) and a base64 PNG. Prints a table and logs it to the experiment `benchmarks-serving`.
"""

from __future__ import annotations

import argparse
import base64
import http.client
import io
import json
import os
import platform
import sys
import threading
import time
from pathlib import Path

import mlflow
import numpy as np

PROJECT_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(PROJECT_ROOT))
from registry.serve import serving  # noqa: E402


class Identity(mlflow.pyfunc.PythonModel):
    """Returns its input: what serving costs with no model at all."""

    def predict(self, context, model_input, params=None):
        return model_input


def log_identity() -> str:
    with mlflow.start_run(run_name="identity-pyfunc") as run:
        mlflow.pyfunc.log_model(name="model", python_model=Identity(), pip_requirements=["mlflow"])
    return f"runs:/{run.info.run_id}/model"


def image_shape(model_uri: str) -> tuple:
    config = mlflow.models.get_model_info(model_uri).flavors["python_function"].get("config") or {}
    return tuple(config.get("image_shape", (32, 32, 3)))


def payloads(shape: tuple) -> dict[str, bytes]:
    from PIL import Image

    pixels = np.random.default_rng(0).integers(0, 255, size=shape, dtype=np.uint8)
    png = io.BytesIO()
    Image.fromarray(pixels.squeeze()).save(png, format="PNG")
    return {
        "pixels": json.dumps({"inputs": [pixels.tolist()]}).encode(),
        "png": json.dumps({"inputs": [base64.b64encode(png.getvalue()).decode()]}).encode(),
    }


def hammer(port: int, body: bytes, clients: int, requests: int) -> dict:
    """`requests` batch-1 POSTs spread over `clients` threads; latency percentiles and images/s."""
    latencies: list[float] = []
    failures = []
    lock = threading.Lock()
    per_client = [requests // clients + (i < requests % clients) for i in range(clients)]

    def client(count: int):
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        mine = []
        for _ in range(count):
            start = time.perf_counter()
            connection.request("POST", "/invocations", body, {"Content-Type": "application/json"})
            response = connection.getresponse()
            response.read()
            mine.append(time.perf_counter() - start)
            if response.status != 200:
                failures.append(response.status)
        with lock:
            latencies.extend(mine)

    threads = [threading.Thread(target=client, args=(n,)) for n in per_client]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - start
    if failures:
        raise RuntimeError(f"{len(failures)} requests failed, e.g. HTTP {failures[0]}")
    milliseconds = np.array(latencies) * 1000
    return {
        "p50_ms": float(np.percentile(milliseconds, 50)),
        "p99_ms": float(np.percentile(milliseconds, 99)),
        "images_per_s": requests / wall,
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["models:/cifar10@champion", "models:/imagenette@champion"])
    parser.add_argument("--requests", type=int, default=1000, help="per model, form and client count")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 8])
    # One worker: see registry/serve.py for why more are slower here.
    parser.add_argument("--workers", type=int, default=1, help="uvicorn workers per server (MLFLOW_MODELS_WORKERS)")
    args = parser.parse_args(argv)

    mlflow.set_tracking_uri(os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{PROJECT_ROOT / 'mlflow.db'}")
    mlflow.set_experiment("benchmarks-serving")
    targets = {uri: uri for uri in args.models}
    targets["identity pyfunc"] = log_identity()
    rows = []
    for label, uri in targets.items():
        shape = image_shape(args.models[0] if label == "identity pyfunc" else uri)
        with serving(uri, workers=args.workers) as url:
            port = int(url.rsplit(":", 1)[1])
            for form, body in payloads(shape).items():
                hammer(port, body, max(args.clients), min(200, args.requests))  # warm-up
                for clients in args.clients:
                    figures = hammer(port, body, clients, args.requests)
                    rows.append({"model": label, "input": f"{form} {'x'.join(map(str, shape))}",
                                 "clients": clients, **figures})
                    print(f"{label:32} {rows[-1]['input']:16} clients={clients}  p50={figures['p50_ms']:.2f} ms  "
                          f"p99={figures['p99_ms']:.2f} ms  {figures['images_per_s']:.0f} img/s", flush=True)

    print(f"\n| model | input | clients | p50 ms | p99 ms | images/s |\n|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['model']} | {row['input']} | {row['clients']} | {row['p50_ms']:.2f} | {row['p99_ms']:.2f} "
              f"| {row['images_per_s']:.0f} |")
    with mlflow.start_run(run_name="serving-benchmark"):
        mlflow.log_params({"models": " ".join(args.models), "requests": args.requests, "workers": args.workers,
                           "machine": f"{platform.machine()} {os.cpu_count()} cpus"})
        for row in rows:
            key = f"{row['model'].split(':/')[-1].replace('@', '_').replace(' ', '_')}_{row['input'].split()[0]}"
            for name in ("p50_ms", "p99_ms", "images_per_s"):
                mlflow.log_metric(f"{key}_c{row['clients']}_{name}", row[name])
        mlflow.log_table({k: [row[k] for row in rows] for k in rows[0]}, "serving_benchmark.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
