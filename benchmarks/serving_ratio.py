"""Served throughput as a fraction of in-process throughput, for each set of test-time views (issue 19).

    python -m benchmarks run serving_ratio [run=<training run id>] [tta="as_trained none"] [clients=8]
        [seconds=20] [mlserver_python=<the python of a venv with mlserver and mlserver-mlflow>]

For each `tta` level the training run's model is wrapped as `promote --tta` would wrap it, then:
- in process: the pyfunc's predict on batches of 8 uint8 images, images/s, and on single images, p50;
- served by `mlflow models serve --env-manager local`: batch-1 requests from 8 concurrent keep-alive
  clients (base64 PNG, the form the README recommends, and uint8 pixel JSON), images/s, and from
  one client, p50. wrk (Debian's `wrk`) drives the load where it is installed: one C thread costs
  the 2 shared cores less than Python client threads would.
- optionally MLServer 1.7.1 on the same model folder (`mlserver start` with mlserver-mlflow's runtime), through
  its MLflow-compatible /invocations route: MLflow 3.17 has dropped `mlflow models serve --enable-mlserver`,
  and MLServer pins fastapi below 0.116, so it runs from a separate venv, given as `mlserver_python=`. Its
  adaptive batching works on the V2 route only, which cannot encode the served model's answer (one record
  per image) and fails with HTTP 500 (BENCHMARKS.md, section `serving_ratio`).

Goals: served images/s at least 80% of in-process at batch 8; batch-1 p50 at most 10 ms.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import subprocess
import tempfile
import time
import urllib.parse
from pathlib import Path

import numpy as np

from benchmarks.harness import benchmark
from benchmarks.serving import hammer, payloads
from experiments.errors import UserError
from experiments.network import free_port
from registry.serve import answers, serving, supervised

WRK_REPORT = """
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
local body_file = io.open("{body}", "rb")
wrk.body = body_file:read("*a")
body_file:close()
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format("RESULT %d %d %d %d %d\\n", summary.requests, summary.duration,
    latency:percentile(50), latency:percentile(99), e.connect + e.read + e.write + e.status + e.timeout))
end
"""


def wrk_load(url: str, body: bytes, clients: int, seconds: float) -> dict:
    """`clients` keep-alive connections POSTing `body` for `seconds` from one wrk thread."""
    with tempfile.TemporaryDirectory() as scratch:
        (Path(scratch) / "body.json").write_bytes(body)
        script = Path(scratch) / "post.lua"
        script.write_text(WRK_REPORT.format(body=Path(scratch) / "body.json"))
        out = subprocess.run(["wrk", "-t1", f"-c{clients}", f"-d{max(1, round(seconds))}s", "--timeout", "30s",
                              "-s", str(script), url], capture_output=True, text=True, timeout=seconds + 120)
    found = re.search(r"RESULT (\d+) (\d+) (\d+) (\d+) (\d+)", out.stdout)
    if out.returncode != 0 or not found:
        raise RuntimeError(f"wrk failed ({out.returncode}): {out.stdout[-1000:]} {out.stderr[-1000:]}")
    count, micros, p50, p99, errors = map(int, found.groups())
    if errors:
        raise RuntimeError(f"{errors} of {count} requests to {url} failed")
    return {"p50_ms": p50 / 1000, "p99_ms": p99 / 1000, "images_per_s": count / (micros / 1e6)}


def load(url: str, body: bytes, clients: int, seconds: float) -> dict:
    if shutil.which("wrk"):
        return wrk_load(url, body, clients, seconds)
    parsed = urllib.parse.urlsplit(url)
    return hammer(parsed.port, body, clients, max(50, int(seconds * 100)), path=parsed.path)


def in_process(pyfunc, shape: tuple, seconds: float) -> dict:
    """The wrapped model's predict in this process: images/s at batch 8, p50 of batch 1."""
    images = np.random.default_rng(0).integers(0, 255, size=(8, *shape), dtype=np.uint8)
    pyfunc.predict(images)
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        pyfunc.predict(images)
        count += len(images)
    throughput = count / (time.perf_counter() - start)
    singles = []
    for _ in range(200):
        began = time.perf_counter()
        pyfunc.predict(images[:1])
        singles.append(time.perf_counter() - began)
    return {"images_per_s": throughput, "p50_ms": float(np.median(singles) * 1000)}


@contextlib.contextmanager
def mlserver(python: str, model_folder: str):
    """MLServer serving the MLflow model folder on loopback; yields its base URL."""
    port = free_port()
    with tempfile.TemporaryDirectory() as config:
        Path(config, "settings.json").write_text(json.dumps(
            {"http_port": port, "grpc_port": free_port(), "metrics_port": free_port(), "parallel_workers": 0}))
        Path(config, "model-settings.json").write_text(json.dumps({
            "name": "classifier", "implementation": "mlserver_mlflow.MLflowRuntime",
            "parameters": {"uri": model_folder}}))
        with supervised([python, "-m", "mlserver.cli.main", "start", config], dict(os.environ),
                        lambda: answers(port, "/v2/models/classifier/ready"), 300, "MLServer"):
            yield f"http://127.0.0.1:{port}"


@contextlib.contextmanager
def mlserver_copy(folder: str):
    """A temporary copy of the model folder without its signature, which MLServer 1.7.1 can load.

    mlserver-mlflow reads the signature's inputs as tensors and fails on one with outputs only (the served
    model's: it takes pixels or base64 images, so it declares no input schema).
    """
    import yaml

    with tempfile.TemporaryDirectory(prefix="mlserver-model-") as scratch:
        copy = Path(scratch) / "model"
        shutil.copytree(folder, copy)
        mlmodel = yaml.safe_load((copy / "MLmodel").read_text())
        mlmodel.pop("signature", None)
        (copy / "MLmodel").write_text(yaml.safe_dump(mlmodel))
        yield str(copy)


def _champion_run(model: str) -> str:
    import mlflow

    try:
        info = mlflow.models.get_model_info(model)
    except mlflow.exceptions.MlflowException as exc:
        raise UserError(f"serving_ratio: cannot read {model} ({exc.message}); promote a model first, or pass "
                        "run=<a training run id>") from None
    if not info.run_id:
        raise UserError(f"serving_ratio: {model} has no training run; pass run=<a training run id>")
    return info.run_id  # promote logs the served model into the training run


@benchmark("serving_ratio", "Served images/s with 8 clients (batch-1 requests) against the same model's "
                            "in-process images/s at batch 8, and batch-1 p50, per set of test-time views")
def serving_ratio(run: str = "", model: str = "models:/cifar10@champion", tta: str = "as_trained none",
                  clients: int = 8, seconds: float = 20.0, mlserver_python: str = "") -> list[dict]:
    import mlflow

    from registry.promote import log_serving_model

    client = mlflow.MlflowClient()
    run = run or _champion_run(model)
    rows = []
    for level in tta.split():
        uri, served = log_serving_model(client, run, level)
        pyfunc = mlflow.pyfunc.load_model(uri)
        shape = tuple(pyfunc.model_config["image_shape"])
        local = in_process(pyfunc, shape, seconds)
        del pyfunc
        bodies = payloads(shape)
        with serving(uri) as url:
            rows += _measure(url, "mlflow models serve", bodies, clients, seconds, served["tta"], local)
        if mlserver_python:
            with mlserver_copy(mlflow.artifacts.download_artifacts(uri)) as copy:
                with mlserver(mlserver_python, copy) as url:
                    rows += _measure(url, "MLServer 1.7.1, /invocations", bodies, clients, seconds, served["tta"],
                                     local)
    return rows


def _measure(url: str, engine: str, bodies: dict, clients: int, seconds: float, tta: str, local: dict) -> list[dict]:
    """Per input form: a warm-up, then batch-1 requests from 1 client and from `clients`, against `local`."""
    rows = []
    for form in ("png", "pixels"):
        load(f"{url}/invocations", bodies[form], clients, min(5.0, seconds))  # warm-up
        single = load(f"{url}/invocations", bodies[form], 1, seconds / 2)
        many = load(f"{url}/invocations", bodies[form], clients, seconds)
        rows.append({"tta": tta, "engine": engine, "input": form,
                     "served_b1_p50_ms": single["p50_ms"], "served_c8_p50_ms": many["p50_ms"],
                     "served_c8_images_per_s": many["images_per_s"],
                     "in_process_b8_images_per_s": local["images_per_s"], "in_process_b1_p50_ms": local["p50_ms"],
                     "ratio": many["images_per_s"] / local["images_per_s"]})
        print(rows[-1], flush=True)
    return rows
