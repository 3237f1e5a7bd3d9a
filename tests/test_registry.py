"""Promotion on a real sqlite registry, and a real `mlflow models serve` of the champion over HTTP."""

from __future__ import annotations

import base64
import io
import json
import platform
import re
import shutil
import subprocess
import sys
import urllib.error
import urllib.request
from importlib.metadata import version
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from PIL import Image

from conftest import PROJECT_ROOT, assert_loopback_only, make_npz, python_env, served, trained
from experiments.errors import UserError
from registry import promote as registry
from registry.serve import ServerError, server_environment, serving, virtualenv_missing


def champion(name="cifar10") -> str:
    return str(mlflow.MlflowClient().get_model_version_by_alias(name, "champion").version)


def versions(name="cifar10") -> dict[str, object]:
    return {str(v.version): v for v in mlflow.MlflowClient().search_model_versions(f"name = '{name}'")}


@pytest.mark.slow
def test_champion_moves_only_on_improvement_and_promotion_is_idempotent(tiny_cifar, tmp_path):
    client = mlflow.MlflowClient()
    first = trained(tiny_cifar, 0.5)
    [decision] = registry.promote("cifar10")
    assert (decision.action, decision.version, decision.run_id) == ("champion", "1", first)
    version = versions()["1"]
    assert version.run_id == first
    assert version.tags["source_run"] == first
    assert version.tags["arch"] == "cnn_simple"
    assert version.tags["test_accuracy"] == "0.5"
    assert version.tags["dataset"] == "cifar10"
    assert version.tags["data_digest"] == client.get_run(first).data.tags["data_digest"]
    assert version.tags["git_commit"] == client.get_run(first).data.tags["git_commit"]
    assert "cnn_simple" in version.description and first in version.description

    assert registry.promote("cifar10")[0].action == "unchanged"  # idempotent: no new version, same aliases
    assert list(versions()) == ["1"]

    worse = trained(tiny_cifar, 0.4)
    [decision] = registry.promote("cifar10")
    assert (decision.action, decision.version, decision.run_id) == ("challenger", "2", worse)
    assert champion() == "1"
    assert str(client.get_model_version_by_alias("cifar10", "challenger").version) == "2"
    assert registry.promote("cifar10")[0].action == "unchanged"
    assert sorted(versions()) == ["1", "2"]

    better = trained(tiny_cifar, 0.9)
    assert registry.promote("cifar10", dry_run=True)[0].action == "would be champion"
    assert champion() == "1" and sorted(versions()) == ["1", "2"]  # a dry run changes nothing
    [decision] = registry.promote("cifar10")
    assert (decision.action, decision.version, decision.run_id) == ("champion", "3", better)
    assert champion() == "3"

    # Rollback: champion back to version 1; version 3 is never promoted again.
    assert registry.rollback("cifar10").version == "1"
    assert champion() == "1"
    assert versions()["3"].tags["rolled_back"] == "true"
    assert registry.promote("cifar10")[0].action == "unchanged"
    assert champion() == "1"
    with pytest.raises(UserError, match="nothing to roll back to"):
        registry.rollback("cifar10")

    # A run scored on another test split is not compared, however good.
    other = tmp_path / "other"
    other.mkdir()
    make_npz(other / "cifar10.npz", n_train=60, n_test=30, shape=(32, 32, 3), classes=3, seed=7)
    trained(other, 1.0)
    [decision] = registry.promote("cifar10")
    assert decision.action == "unchanged" and "1 run(s) on another test split not compared" in decision.message


@pytest.mark.slow
def test_a_tuning_best_run_competes_and_lower_is_better_for_losses(tiny_cifar):
    plain = trained(tiny_cifar, 0.5)
    best = trained(tiny_cifar, 0.8)
    mlflow.MlflowClient().set_tag(best, "best", "true")
    mlflow.MlflowClient().set_tag(best, "search_role", "best")
    trial = trained(tiny_cifar, 0.99)
    mlflow.MlflowClient().set_tag(trial, "search_role", "trial")  # trials never compete
    assert registry.promote("cifar10")[0].run_id == best
    client = mlflow.MlflowClient()
    client.log_metric(plain, "test_loss", 0.01, step=1)
    assert registry.promote("cifar10", metric="test_loss", dry_run=True)[0].run_id == plain


@pytest.mark.slow
def test_the_served_views_are_chosen_at_promotion_with_their_own_figure(tiny_cifar):
    import keras

    from experiments.models import without_views

    run_id = trained(tiny_cifar, arch="airbench_s")  # trained to serve six views
    run = mlflow.get_run(run_id)
    assert run.data.tags["tta"] == "full"
    assert {"test_accuracy_tta_none", "test_accuracy_tta_flip"} <= set(run.data.metrics)
    with pytest.raises(UserError, match="unknown tta 'two'; choose one of: as_trained, none, flip, full"):
        registry.promote("cifar10", tta="two")
    (decision,) = registry.promote("cifar10", tta="none")
    version = mlflow.MlflowClient().get_model_version("cifar10", decision.version)
    assert version.tags["tta"] == "none"
    assert float(version.tags["served_test_accuracy"]) == run.data.metrics["test_accuracy_tta_none"]
    assert float(version.tags["test_accuracy"]) == run.data.metrics["test_accuracy"]  # as trained, as ranked

    images = np.random.default_rng(0).integers(0, 256, (6, 32, 32, 3), dtype=np.uint8)
    six_views = mlflow.keras.load_model(f"runs:/{run_id}/model")
    one_view = without_views(six_views)
    served = mlflow.pyfunc.load_model("models:/cifar10@champion").predict(images)
    np.testing.assert_allclose([r["probabilities"] for r in served], one_view.predict(images, verbose=0), atol=1e-5)
    assert not np.allclose(one_view.predict(images, verbose=0), six_views.predict(images, verbose=0), rtol=1e-2, atol=0)
    serving = mlflow.get_logged_model(mlflow.models.get_model_info("models:/cifar10@champion").model_id)
    figures = {m.key for m in serving.metrics}
    assert "test_accuracy_tta_none" in figures and "test_accuracy" not in figures  # only its own views' figure
    assert not any(isinstance(layer, keras.layers.Average) for layer in one_view.layers)
    with np.load(tiny_cifar / "cifar10.npz") as npz:  # the logged figure is the one-view model's on the test split
        test_images, test_labels = npz["x_test"], npz["y_test"].ravel()
    one_view_accuracy = np.mean(one_view.predict(test_images, verbose=0).argmax(axis=1) == test_labels)
    assert run.data.metrics["test_accuracy_tta_none"] == pytest.approx(one_view_accuracy)


def test_mirrored_views_are_refused_where_a_mirror_changes_the_class():
    from experiments.models import DataSpec, Recipe, create_model, with_views

    digits = DataSpec((28, 28, 1), 10, hflip=False)
    with pytest.raises(UserError, match="test-time views 'flip' mirror images, which changes their class here"):
        with_views(create_model("cnn_simple", digits), "flip", Recipe(), digits)


def test_promote_without_runs_fails_in_one_line(capsys):
    assert registry.main(["--dataset", "imagenette"]) == 2
    [err] = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert err == ("error: no finished run of dataset 'imagenette' with metric 'test_accuracy' in any experiment; "
                   "train one first, e.g. mlflow run . -e imagenette")
    assert registry.main(["--dataset", "cifar10", "--experiment", "nope"]) == 2
    assert "no experiment named 'nope'" in capsys.readouterr().err


# --- Serving -------------------------------------------------------------------------------------


def post(url, payload, raw: bytes | None = None):
    """(status, JSON body) of POST /invocations."""
    data = raw if raw is not None else json.dumps(payload).encode()
    request = urllib.request.Request(f"{url}/invocations", data, {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def encoded(pixels: np.ndarray, fmt: str = "PNG") -> str:
    buffer = io.BytesIO()
    Image.fromarray(pixels.squeeze()).save(buffer, format=fmt)
    return base64.b64encode(buffer.getvalue()).decode()


BAD_REQUESTS = {  # name: (payload builder, a fragment of the 400 message)
    "wrong shape": (lambda x: {"inputs": x[:, :28, :28].tolist()}, "images are 28x28, the model takes 32x32"),
    "wrong dtype": (lambda x: {"inputs": (x / 255).tolist()}, "pixels must be uint8 integers 0-255, got dtype float64"),
    "out of range": (lambda x: {"inputs": (x.astype(int) + 256).tolist()}, "pixels must be uint8 integers 0-255"),
    "wrong channels": (lambda x: {"inputs": x[..., :1].tolist()}, "images have 1 channels, the model takes 3"),
    "empty batch": (lambda x: {"inputs": []}, "empty batch"),
    "not base64": (lambda x: {"inputs": ["this is not base64!"]}, "image 0 is not valid base64"),
    "not an image": (lambda x: {"inputs": [base64.b64encode(b"hello, world").decode()]}, "image 0 is not an image"),
    "truncated jpeg": (
        lambda x: {"inputs": [base64.b64encode(base64.b64decode(encoded(x[0], "JPEG"))[:300]).decode()]},
        "image 0 could not be decoded",
    ),
    "over the size cap": (
        lambda x: {"inputs": [encoded(np.zeros((300, 300, 3), np.uint8))]}, "is 300x300 (90,000 pixels), over the cap of 5,000 pixels"
    ),
    "over the batch cap": (lambda x: {"inputs": np.repeat(x[:1], 9, axis=0).tolist()}, "over the cap of 8"),
    "no batch axis": (lambda x: {"inputs": x[0].tolist()}, "shape"),
    "ragged rows": (lambda x: {"inputs": [x[0].tolist(), x[1, :5].tolist()]}, "inhomogeneous shape"),  # MLflow's
    "wrong top-level key": (lambda x: {"images": x.tolist()}, "inputs"),
}


def check_serving(url: str, name: str, images: np.ndarray, tmp_path) -> None:
    """Tensor, instances and base64 forms agree with a local pyfunc load; every bad request is a 400."""
    assert_loopback_only(int(url.rsplit(":", 1)[1]))  # not reachable from another machine
    local = mlflow.pyfunc.load_model(f"models:/{name}@champion")
    records = local.predict(images)
    assert isinstance(records, list) and len(records) == len(images)
    assert all(set(r) == {"class_index", "label", "confidence", "probabilities"} for r in records)
    expected = pd.DataFrame(records)
    class_names = local.metadata.metadata["class_names"]

    status, body = post(url, {"inputs": images.tolist()})
    assert status == 200
    rows = body["predictions"]
    assert [r["class_index"] for r in rows] == expected["class_index"].tolist()
    assert [r["label"] for r in rows] == [class_names[i] for i in expected["class_index"]]
    np.testing.assert_allclose([r["probabilities"] for r in rows], np.stack(expected["probabilities"]), atol=1e-5)
    assert post(url, {"instances": images.tolist()}) == (200, body)

    # PNG at the model's size is lossless: same answer as the pixels. A bigger JPEG is resized inside.
    status, body = post(url, {"inputs": [encoded(image) for image in images]})
    assert status == 200 and [r["class_index"] for r in body["predictions"]] == expected["class_index"].tolist()
    photo = np.random.default_rng(3).integers(0, 255, size=(48, 64, 3), dtype=np.uint8)
    status, body = post(url, {"inputs": [f"data:image/jpeg;base64,{encoded(photo, 'JPEG')}"]})
    assert status == 200
    assert body["predictions"][0]["label"] == local.predict([encoded(photo, "JPEG")])[0]["label"]

    for case, (payload, fragment) in BAD_REQUESTS.items():
        status, body = post(url, payload(images))
        assert status == 400, case
        assert fragment in body["message"], (case, body["message"][-300:])
    status, body = post(url, None, raw=b"{not json")
    assert status == 400 and "valid JSON" in body["message"]
    # Over the body cap (200,000 bytes here): 413 before the JSON is parsed, whether the size is declared
    # up front (Content-Length) or only found while reading (chunked).
    oversized = json.dumps({"inputs": np.zeros((30, *images.shape[1:]), np.uint8).tolist()}).encode()
    assert len(oversized) > 200_000
    for raw in (oversized, iter([oversized[:100_000], oversized[100_000:]])):
        status, body = post(url, None, raw=raw)
        assert status == 413, body
        assert body["message"].startswith(f"request body of {len(oversized):,} bytes is over the cap of 200,000")
        assert "CNN_SERVE_MAX_REQUEST_BYTES" in body["message"]
    # A 16-bit greyscale PNG (mode I;16) is scaled to 8 bits as training's decoder does, not clipped white.
    wide = (images[0].mean(axis=2).astype(np.uint16) * 257)
    buffer = io.BytesIO()
    Image.fromarray(wide).save(buffer, format="PNG")
    status, body = post(url, {"inputs": [base64.b64encode(buffer.getvalue()).decode()]})
    grey = np.repeat((wide >> 8).astype(np.uint8)[..., None], 3, axis=2)
    assert status == 200 and body["predictions"][0]["class_index"] == local.predict(grey[None])[0]["class_index"]
    assert post(url, {"inputs": images[:1].tolist()})[0] == 200  # still serving

    # The client: a folder of image files, through the server and locally.
    folder = tmp_path / "photos"
    folder.mkdir(exist_ok=True)
    for n, image in enumerate(images):
        Image.fromarray(image).save(folder / f"img{n}.png")
    for source in (["--url", url], ["--model", f"models:/{name}@champion"]):
        out = subprocess.run([sys.executable, "-m", "registry.predict", str(folder), *source], cwd=PROJECT_ROOT,
                             env=python_env(), capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr[-2000:]
        lines = out.stdout.strip().splitlines()
        assert lines[0].split() == ["file", "label", "confidence"]
        assert [line.split()[1] for line in lines[1:]] == expected["label"].tolist()


def test_the_served_model_turns_nagle_off_on_multi_worker_sockets(monkeypatch):
    """uvicorn's multi-worker listener has proto 0; asyncio alone would leave Nagle on (+40 ms a request)."""
    import asyncio.base_events
    import socket

    from registry.classifier import set_nodelay_on_every_tcp_socket

    # Stand in for asyncio's own check (it skips proto-0 sockets); an earlier in-process model load may
    # already have patched it.
    monkeypatch.setattr(asyncio.base_events, "_set_nodelay", lambda sock: None)
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM, 0) as sock:  # proto 0, as uvicorn's workers see it
        asyncio.base_events._set_nodelay(sock)
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 0
        set_nodelay_on_every_tcp_socket()
        asyncio.base_events._set_nodelay(sock)
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as unix_sock:
        asyncio.base_events._set_nodelay(unix_sock)  # not TCP: left alone, no error


@pytest.mark.slow
def test_champion_is_served_over_http_in_both_forms_and_rejects_bad_input(tiny_cifar, tmp_path, isolated_tracking):
    trained(tiny_cifar)
    registry.promote("cifar10")
    images = np.random.default_rng(0).integers(0, 255, size=(3, 32, 32, 3), dtype=np.uint8)
    with served("models:/cifar10@champion", MLFLOW_TRACKING_URI=isolated_tracking,
                CNN_SERVE_MAX_BATCH="8", CNN_SERVE_MAX_IMAGE_PIXELS="5000", CNN_SERVE_MAX_REQUEST_BYTES="200000") as url:
        check_serving(url, "cifar10", images, tmp_path)

        # The README's curl lines, as a user would paste them.
        readme = (PROJECT_ROOT / "README.md").read_text().split("## Serving", 1)[1]
        script = "\n".join(line for line in readme.split("```bash", 1)[1].split("```", 1)[0].splitlines()
                           if "curl" in line or line.startswith("python -c"))
        Image.fromarray(images[0]).save(tmp_path / "cat.jpg")
        answers = subprocess.run(["bash", "-c", script.replace("127.0.0.1:5000", url.removeprefix("http://"))],
                                 cwd=tmp_path, env=python_env(), capture_output=True, text=True, timeout=120)
        replies = [json.loads(line) for line in re.findall(r"\{.*?\]\}\]\}", answers.stdout)]
        assert len(replies) == 2, answers.stdout + answers.stderr
        assert all(len(reply["predictions"]) == 1 for reply in replies)


@pytest.mark.slow
def test_vgg16_head_is_promoted_under_its_own_name_and_served(tiny_cifar, tmp_path, isolated_tracking):
    run_id = trained(tiny_cifar, arch="vgg16_head", weights="none")
    [decision] = registry.promote("cifar10")
    assert (decision.name, decision.action, decision.run_id) == ("cifar10-vgg16", "champion", run_id)
    images = np.random.default_rng(1).integers(0, 255, size=(2, 32, 32, 3), dtype=np.uint8)
    with served("models:/cifar10-vgg16@champion", MLFLOW_TRACKING_URI=isolated_tracking,
                CNN_SERVE_MAX_BATCH="8", CNN_SERVE_MAX_IMAGE_PIXELS="5000", CNN_SERVE_MAX_REQUEST_BYTES="200000") as url:
        check_serving(url, "cifar10-vgg16", images, tmp_path)


@pytest.mark.slow
def test_a_model_holding_python_code_is_not_promoted(capsys):
    """safe_mode: a Lambda layer in a logged model is refused, in one line, and nothing is registered."""
    import keras

    from experiments.run_logging import model_signature

    inputs = keras.Input((32, 32, 3), dtype="uint8")
    outputs = keras.layers.Dense(3, activation="softmax")(
        keras.layers.Lambda(lambda x: keras.ops.mean(keras.ops.cast(x, "float32"), axis=(1, 2)))(inputs))
    mlflow.set_experiment("cifar10")
    with mlflow.start_run() as run:
        mlflow.set_tags({"dataset": "cifar10", "arch": "cnn_simple", "data_digest": "d"})
        mlflow.log_metric("test_accuracy", 0.9)

        class Data:
            image_shape, num_classes = (32, 32, 3), 3

        mlflow.keras.log_model(keras.Model(inputs, outputs), name="model", signature=model_signature(Data),
                               metadata={"class_names": ["a", "b", "c"]})
    assert registry.main(["--dataset", "cifar10"]) == 2
    [line] = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert line == (f"error: the model of run {run.info.run_id} holds Python code (a Lambda layer) that safe mode "
                    "does not load; retrain it with stock layers")
    assert not mlflow.MlflowClient().search_registered_models()


# --- The model's own environment ------------------------------------------------------------------

RUNTIME = {"mlflow", "tensorflow", "keras"}  # pinned to this interpreter's versions: the same answers
NOT_RUNTIME = {"pytest", "pytest-xdist", "selenium", "psycopg", "psycopg-binary", "flask-wtf", "keras-tuner"}


def requirement_names(lines) -> set[str]:
    return {canonicalize_name(Requirement(line).name) for line in lines}


@pytest.mark.slow
def test_logged_models_require_runtime_packages_only(tiny_cifar):
    """What `mlflow models serve` (default env manager) installs: the training run's Keras model and the
    registered pyfunc pin mlflow, tensorflow and keras as installed here, and no test or server package."""
    run_id = trained(tiny_cifar)
    registry.promote("cifar10")
    description = mlflow.MlflowClient().get_registered_model("cifar10").description
    assert "Serve: mlflow models serve -m models:/cifar10@champion (the first start builds" in description
    for uri in (f"runs:/{run_id}/model", "models:/cifar10@champion"):
        folder = Path(mlflow.artifacts.download_artifacts(uri))
        pins = (folder / "requirements.txt").read_text().split()
        assert requirement_names(pins) >= RUNTIME and not requirement_names(pins) & NOT_RUNTIME, (uri, pins)
        assert {f"{package}=={version(package)}" for package in RUNTIME} <= set(pins), (uri, pins)
        python_env = yaml.safe_load((folder / "python_env.yaml").read_text())
        assert python_env["python"] == platform.python_version()
        assert python_env["dependencies"] == ["-r requirements.txt"]
        conda = yaml.safe_load((folder / "conda.yaml").read_text())
        [pip_list] = [item["pip"] for item in conda["dependencies"] if isinstance(item, dict)]
        assert pip_list == pins, uri


@pytest.mark.slow
def test_the_plain_serve_command_builds_the_models_environment_and_answers_the_same(tiny_cifar, tmp_path,
                                                                                    isolated_tracking):
    """`mlflow models serve -m models:/cifar10@champion` without --env-manager: MLflow's default (virtualenv)
    builds the model's environment (pyenv's Python, venv, pip install of its requirements.txt; 1-2 min
    here, BENCHMARKS.md) and serves from it the answers the model gives in this process."""
    if reason := virtualenv_missing():
        pytest.skip(reason)
    trained(tiny_cifar)
    registry.promote("cifar10")
    images = np.random.default_rng(0).integers(0, 255, size=(3, 32, 32, 3), dtype=np.uint8)
    expected = mlflow.pyfunc.load_model("models:/cifar10@champion").predict(images)
    env_root = tmp_path / "envs"  # not ~/.mlflow/envs: each run builds anew, and 3 GB go with the test
    try:
        with serving("models:/cifar10@champion", timeout=480, env_manager=None, MLFLOW_TRACKING_URI=isolated_tracking,
                     MLFLOW_ENV_ROOT=str(env_root)) as url:
            environment = server_environment(int(url.rsplit(":", 1)[1]))
            status, body = post(url, {"inputs": images.tolist()})
        assert status == 200, body
        served_rows = body["predictions"]
        assert [r["class_index"] for r in served_rows] == [r["class_index"] for r in expected]
        np.testing.assert_allclose([r["probabilities"] for r in served_rows], [r["probabilities"] for r in expected],
                                   atol=1e-5)
        # Served from the environment MLflow built, not from this interpreter's.
        assert environment is not None and environment.parent == env_root, environment
        listing = subprocess.run([str(environment / "bin" / "python"), "-m", "pip", "list", "--format=freeze"],
                                 capture_output=True, text=True, timeout=120)
        installed = dict(line.split("==") for line in listing.stdout.split())
        installed = {canonicalize_name(name): pinned for name, pinned in installed.items()}
        assert {package: installed.get(package) for package in RUNTIME} == {p: version(p) for p in RUNTIME}
        assert not set(installed) & NOT_RUNTIME, sorted(set(installed) & NOT_RUNTIME)
    except ServerError as exc:
        pytest.fail(str(exc))
    finally:
        shutil.rmtree(env_root, ignore_errors=True)
