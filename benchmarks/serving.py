"""Serving benchmarks: batch-1 latency and throughput of `mlflow models serve` over HTTP on loopback,
and its start-up with MLflow's default environment manager.

    python -m benchmarks run serving [models="models:/cifar10@champion models:/imagenette@champion"]
        [requests=1000] [clients="1 8"] [workers="1 2"]
    python -m benchmarks run serving_env [model=models:/cifar10@champion] [cold=true]

Each model (and a trivial identity pyfunc, the ceiling of the serving stack) is served in turn with
`mlflow models serve --env-manager local`, warmed up, then hit with batch-1 requests by 1 and by 8
concurrent clients (threads with keep-alive connections, on the same CPUs), in two forms: uint8
pixels as JSON (`inputs`) and a base64 PNG.

`serving_env` times the plain `mlflow models serve -m MODEL` (no `--env-manager`: MLflow builds a
virtualenv from the model's python_env.yaml and requirements.txt) from launch to the first 200 on
/ping: the first start, which builds the environment, and the second, which reuses it; then the same
with `--env-manager local`. Each server must answer a request exactly as the model loaded in this
process does. `cold=true` builds in a new MLFLOW_ENV_ROOT with a new pip cache (a new machine's first
start), both deleted afterwards; `cold=false` uses the user's (~/.mlflow/envs, pip's own cache).
"""

from __future__ import annotations

import base64
import http.client
import io
import json
import os
import shutil
import tempfile
import threading
import time
from pathlib import Path

import mlflow
import numpy as np

from benchmarks.harness import PROJECT_ROOT, benchmark
from registry.serve import server_environment, serving, virtualenv_missing


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


def hammer(port: int, body: bytes, clients: int, requests: int, path: str = "/invocations") -> dict:
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
            connection.request("POST", path, body, {"Content-Type": "application/json"})
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


def _folder_mb(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and not f.is_symlink()) / 2**20


@benchmark("serving_env", "Start-up of mlflow models serve with MLflow's default env manager (virtualenv: the "
                          "first start builds the model's environment) and with --env-manager local")
def serving_env_benchmark(model: str = "models:/cifar10@champion", cold: bool = True,
                          timeout: float = 900.0) -> list[dict]:
    from mlflow.environment_variables import MLFLOW_ENV_ROOT

    from experiments.errors import UserError

    reason = virtualenv_missing(_model_python(model))
    if reason:
        raise UserError(f"serving_env: {reason}")
    local = mlflow.pyfunc.load_model(model)
    shape = tuple((local.model_config or {}).get("image_shape", (32, 32, 3)))
    images = np.random.default_rng(0).integers(0, 255, size=(2, *shape), dtype=np.uint8)
    expected = local.predict(images)
    body = json.dumps({"inputs": images.tolist()}).encode()
    scratch = Path(tempfile.mkdtemp(prefix="serving-env-")) if cold else None
    env = {"MLFLOW_ENV_ROOT": str(scratch / "envs"), "PIP_CACHE_DIR": str(scratch / "pip-cache")} if cold else {}
    rows = []
    try:
        first = "first (builds the environment)" if cold else "first (~/.mlflow/envs as it is)"
        for start, env_manager in ((first, None), ("second (reuses it)", None), ("--env-manager local", "local")):
            load = os.getloadavg()[0]  # other work on the 2 cores slows the pip install most
            began = time.perf_counter()
            with serving(model, timeout=timeout, env_manager=env_manager, **env) as url:
                seconds = time.perf_counter() - began
                port = int(url.rsplit(":", 1)[1])
                environment = server_environment(port)
                connection = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
                connection.request("POST", "/invocations", body, {"Content-Type": "application/json"})
                response = connection.getresponse()
                answer = json.loads(response.read())
            if response.status != 200:
                raise RuntimeError(f"{start}: HTTP {response.status}: {answer}")
            served = answer["predictions"]
            if [r["class_index"] for r in served] != [r["class_index"] for r in expected] or not np.allclose(
                    [r["probabilities"] for r in served], [r["probabilities"] for r in expected], atol=1e-5):
                raise RuntimeError(f"{start}: the server answered {served}, the model in this process {expected}")
            rows.append({"start": start, "env_manager": env_manager or "virtualenv (default)",
                         "environment": _shorten(environment, Path(env.get("MLFLOW_ENV_ROOT") or MLFLOW_ENV_ROOT.get())),
                         "ready_s": seconds, "load_avg_1min": load,
                         "environment_mb": _folder_mb(environment) if environment else float("nan")})
            print(f"{start:32} ready in {seconds:.1f} s, in {environment}; same answer as in process", flush=True)
    finally:
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)
    return rows


def _model_python(model: str) -> str:
    """The Python version the model's environment is built with (its python_env.yaml)."""
    import yaml

    folder = Path(mlflow.artifacts.download_artifacts(model))
    return str(yaml.safe_load((folder / "python_env.yaml").read_text())["python"])


def _shorten(environment: Path | None, env_root: Path) -> str:
    """The server's environment for the table: under MLFLOW_ENV_ROOT, in the home folder, or as is."""
    if environment is None:
        return "?"
    for prefix, name in ((env_root, "$MLFLOW_ENV_ROOT"), (PROJECT_ROOT, "."), (Path.home(), "~")):
        if environment.is_relative_to(prefix):
            return f"{name}/{environment.relative_to(prefix)}"
    return str(environment)
