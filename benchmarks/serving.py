"""Serving benchmark: batch-1 latency and throughput of `mlflow models serve` over HTTP on loopback.

    python -m benchmarks run serving [models="models:/cifar10@champion models:/imagenette@champion"]
        [requests=1000] [clients="1 8"] [workers="1 2"]

Each model (and a trivial identity pyfunc, the ceiling of the serving stack) is served in turn with
`mlflow models serve --env-manager local`, warmed up, then hit with batch-1 requests by 1 and by 8
concurrent clients (threads with keep-alive connections, on the same CPUs), in two forms: uint8
pixels as JSON (`inputs`) and a base64 PNG.
"""

from __future__ import annotations

import base64
import http.client
import io
import json
import threading
import time
from pathlib import Path

import mlflow
import numpy as np

from benchmarks.harness import benchmark
from registry.serve import serving


def log_identity() -> str:
    with mlflow.start_run(run_name="identity-pyfunc", nested=True) as run:
        mlflow.pyfunc.log_model(name="model", python_model=str(Path(__file__).with_name("identity_model.py")),
                                pip_requirements=["mlflow"])
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


@benchmark("serving", "Batch-1 latency and throughput of mlflow models serve on loopback, champions and an "
                      "identity pyfunc (the serving stack's ceiling)")
def serving_benchmark(models: str = "models:/cifar10@champion models:/imagenette@champion", requests: int = 1000,
                      clients: str = "1 8", workers: str = "1") -> list[dict]:
    client_counts = [int(n) for n in clients.split()]
    targets = {uri: uri for uri in models.split()}
    targets["identity pyfunc"] = log_identity()
    rows = []
    for worker_count in [int(n) for n in workers.split()]:
        for label, uri in targets.items():
            reference = uri if label != "identity pyfunc" else (models.split() or [None])[0]
            shape = image_shape(reference) if reference else (32, 32, 3)
            with serving(uri, workers=worker_count) as url:
                port = int(url.rsplit(":", 1)[1])
                for form, body in payloads(shape).items():
                    hammer(port, body, max(client_counts), min(200, requests))  # warm-up
                    for count in client_counts:
                        figures = hammer(port, body, count, requests)
                        rows.append({"model": label.removeprefix("models:/"), "input": f"{form} {'x'.join(map(str, shape))}",
                                     "workers": worker_count, "clients": count, **figures})
                        print(f"{label:32} {rows[-1]['input']:16} workers={worker_count} clients={count}  "
                              f"p50={figures['p50_ms']:.2f} ms  p99={figures['p99_ms']:.2f} ms  "
                              f"{figures['images_per_s']:.0f} img/s", flush=True)
    return rows
