"""Shared fixtures: a temp sqlite tracking store, a temp cache, and tiny synthetic datasets."""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from experiments.network import free_port  # noqa: F401 - for the tests
from experiments.tracking import PROJECT_ROOT
from registry.serve import ServerError, serving

SHARED_DATA = Path(os.environ.get("CNN_DATA_DIR") or PROJECT_ROOT.parent / "shared" / "data")

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


@pytest.fixture(scope="session")
def empty_store(tmp_path_factory) -> Path:
    """An empty sqlite store, made once per session: a new store runs MLflow's schema migrations (2-4 s
    here), and most tests open one. Each test gets a copy (`fresh_store`)."""
    import mlflow

    folder = tmp_path_factory.mktemp("empty-store")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("_MLFLOW_SERVER_ARTIFACT_ROOT", str(folder / "artifacts"))
        mlflow.MlflowClient(f"sqlite:///{folder / 'mlflow.db'}").search_experiments()
    return folder / "mlflow.db"


def fresh_store(template: Path, path: Path, artifact_location: str) -> str:
    """A copy of the empty store at `path`, its Default experiment's artifacts at `artifact_location`
    (where MLflow would have put them); returns its URI."""
    import shutil
    import sqlite3

    shutil.copyfile(template, path)
    with contextlib.closing(sqlite3.connect(path)) as db, db:
        db.execute("UPDATE experiments SET artifact_location = ? WHERE experiment_id = 0", (artifact_location,))
    return f"sqlite:///{path}"


@pytest.fixture(autouse=True)
def isolated_tracking(tmp_path, monkeypatch, empty_store):
    """Every test gets its own sqlite store and cache; nothing touches the user's mlflow.db."""
    import mlflow

    uri = fresh_store(empty_store, tmp_path / "mlflow.db", str(tmp_path / "artifacts" / "0"))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("CNN_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("CNN_TUNER_DIR", str(tmp_path / "tuner"))
    # A sqlite store puts artifacts in ./mlruns of whichever directory the process runs in; MLflow's
    # own (private) override keeps them, in this process and its children, with the test.
    monkeypatch.setenv("_MLFLOW_SERVER_ARTIFACT_ROOT", str(tmp_path / "artifacts"))
    for name in ("KERASTUNER_TUNER_ID", "KERASTUNER_ORACLE_IP", "KERASTUNER_ORACLE_PORT", "CNN_SEARCH_PARENT_RUN_ID"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_ID", raising=False)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)  # promote sets it process-wide: a later test must not see an old store
    # set_experiment (train() calls it outside `mlflow run`) also sets a module global: a later test's
    # fresh store has no such experiment.
    monkeypatch.setattr(mlflow.tracking.fluent, "_active_experiment_id", None)
    yield uri
    while mlflow.active_run():
        mlflow.end_run()


@pytest.fixture(scope="session")
def machine_precision_timings(tmp_path_factory) -> Path:
    """This test session's measured precision timings (`precision-<machine>.json`), kept as a user's cache
    keeps them: each model scale is measured once per session, not once per test."""
    return tmp_path_factory.mktemp("precision")


@pytest.fixture(autouse=True)
def fixed_precision_timings(request, monkeypatch, tmp_path, isolated_tracking, machine_precision_timings):
    """In-process runs with precision=auto choose float32 without timing anything (in a cache of their
    own): their figures stay the same on every CPU, and no test pays the few seconds of measurement.
    Subprocesses measure for real, into the session's shared timings. Tests marked `measured_precision`
    start from an empty cache and measure."""
    if request.node.get_closest_marker("measured_precision"):
        yield
        return
    import json
    import shutil

    from experiments import precision

    monkeypatch.setattr(precision, "measure_both", lambda timer, rounds=2: {"float32": 1.0, "bfloat16": 2.0})
    monkeypatch.setattr(precision, "cache_dir", lambda: tmp_path / "in-process-precision")
    own = Path(os.environ["CNN_CACHE_DIR"])
    own.mkdir(parents=True, exist_ok=True)
    for shared in machine_precision_timings.glob("precision-*.json"):
        shutil.copy(shared, own / shared.name)
    yield
    for measured in own.glob("precision-*.json"):
        shared = machine_precision_timings / measured.name
        try:
            entries = json.loads(shared.read_text()) if shared.exists() else {}
            entries.update(json.loads(measured.read_text()))
        except (OSError, ValueError, TypeError):  # a test that damaged its cache on purpose
            continue
        shared.write_text(json.dumps(entries))


def make_npz(path: Path, n_train=60, n_test=20, shape=(28, 28), classes=3, seed=0) -> Path:
    """A Keras-layout .npz whose classes differ in brightness, so a model can learn them."""
    rng = np.random.default_rng(seed)

    def split(n):
        y = np.arange(n) % classes
        x = rng.integers(0, 60, size=(n, *shape)) + (y * 90).reshape(-1, *[1] * len(shape))
        return x.astype(np.uint8), y.astype(np.uint8)

    x_train, y_train = split(n_train)
    x_test, y_test = split(n_test)
    np.savez(path, x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test)
    return path


def make_image_tree(root: Path, classes=("cat", "dog"), per_class=(6, 3), size=(20, 24), splits=("train", "test")):
    """`root/<split>/<class>/*.png|jpg` with a colour per class; `splits=()` makes an unsplit tree."""
    rng = np.random.default_rng(0)
    colours = [(220, 40, 40), (40, 40, 220), (40, 220, 40), (220, 220, 40)]
    for split, count in zip(splits or ("",), per_class):
        for c, name in enumerate(classes):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                pixels = np.clip(rng.normal(colours[c % 4], 20, size=(*size, 3)), 0, 255).astype(np.uint8)
                ext = "png" if i % 2 else "jpg"
                Image.fromarray(pixels).save(folder / f"{name}_{i}.{ext}")
    return root


@pytest.fixture
def tiny_npz_dir(tmp_path) -> Path:
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    make_npz(data_dir / "mnist.npz")
    return data_dir


@pytest.fixture
def tiny_cifar(tmp_path) -> Path:
    """A folder with a 3-class, CIFAR-10-shaped cifar10.npz (90 train, 30 test images)."""
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    make_npz(data_dir / "cifar10.npz", n_train=90, n_test=30, shape=(32, 32, 3), classes=3)
    return data_dir


@pytest.fixture
def image_tree(tmp_path) -> Path:
    return make_image_tree(tmp_path / "shapes")


def python_env() -> dict:
    """Environment for subprocesses: this interpreter's bin first, so `mlflow` and `python` match."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env


needs_shared_data = pytest.mark.skipif(
    not (SHARED_DATA / "mnist.npz").exists(), reason=f"shared data not found at {SHARED_DATA}"
)


@contextlib.contextmanager
def served(model_uri: str, **env):
    """A real `mlflow models serve` of `model_uri` on a free loopback port; yields its base URL."""
    try:
        with serving(model_uri, timeout=180, **env) as url:
            yield url
    except ServerError as exc:
        pytest.fail(str(exc))


class TrackingServer:
    """A real `mlflow server` on loopback with a sqlite store and proxied artifacts; stop() and start()
    again bring it back on the same port and store, as after an outage."""

    def __init__(self, folder: Path, template: Path, backend_uri: str | None = None, app_name: str = "",
                 env: dict | None = None):
        folder.mkdir(parents=True, exist_ok=True)
        self.folder, self.port = folder, free_port()
        # Without `backend_uri`: a sqlite store copied from `template`, the session's empty store.
        self.backend_uri = backend_uri or fresh_store(template, folder / "server.db", "mlflow-artifacts:/0")
        self.uri = f"http://127.0.0.1:{self.port}"
        # As scripts/server.sh runs it: without MLflow's job runner (7 huey consumers, half a core while idle).
        self.app_name, self.env = app_name, {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", **(env or {})}
        self.process = None

    def start(self) -> "TrackingServer":
        import subprocess
        import time
        import urllib.error
        import urllib.request

        self.process = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(self.port),
             "--backend-store-uri", self.backend_uri, "--artifacts-destination", str(self.folder / "artifacts"),
             "--workers", "1", *(["--app-name", self.app_name] if self.app_name else [])],
            env={**python_env(), **self.env}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                if urllib.request.urlopen(f"{self.uri}/health", timeout=2).status == 200:
                    return self
            except urllib.error.HTTPError:  # it answers (401 behind basic auth): it is up
                return self
            except OSError:
                if self.process.poll() is not None:
                    break
                time.sleep(0.3)
        self.stop()
        pytest.fail(f"mlflow server did not start on port {self.port}")

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=30)


@pytest.fixture
def tracking_server(tmp_path, empty_store):
    server = TrackingServer(tmp_path / "server", empty_store).start()
    try:
        yield server
    finally:
        server.stop()


def outside_addresses() -> list[str]:
    """This machine's non-loopback IPv4 addresses (what another host would connect to)."""
    import fcntl
    import socket
    import struct

    addresses = set()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        for _, name in socket.if_nameindex():
            try:  # SIOCGIFADDR: the interface's IPv4 address
                packed = fcntl.ioctl(probe.fileno(), 0x8915, struct.pack("256s", name[:15].encode()))
            except OSError:
                continue  # no IPv4 address
            addresses.add(socket.inet_ntoa(packed[20:24]))
    return sorted(a for a in addresses if not a.startswith("127."))


def assert_loopback_only(port: int) -> None:
    """`port` answers on 127.0.0.1 and refuses every other address of this machine."""
    import socket

    socket.create_connection(("127.0.0.1", port), timeout=5).close()
    for address in outside_addresses():
        with pytest.raises(OSError):
            socket.create_connection((address, port), timeout=5).close()


@pytest.fixture
def postgres_uri():
    """A throwaway PostgreSQL database; CNN_TEST_POSTGRES_URI (set by .ci/run) names a user that may create them."""
    import uuid

    base = os.environ.get("CNN_TEST_POSTGRES_URI")
    if not base:
        pytest.skip("CNN_TEST_POSTGRES_URI is not set: `export CNN_TEST_POSTGRES_URI=$(CNN_PG_CREATEDB=1 bash "
                    "scripts/server.sh db)`")
    import psycopg

    name = f"cnn_test_{uuid.uuid4().hex[:12]}"
    admin = psycopg.connect(base, autocommit=True)
    with admin.cursor() as cursor:
        cursor.execute(f'CREATE DATABASE "{name}"')
    try:
        yield f"{base.rsplit('/', 1)[0]}/{name}"
    finally:
        with admin.cursor() as cursor:
            cursor.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.close()


# --- Helpers shared by test modules -------------------------------------------------------------


def artifact_paths(run_id: str, path: str = "") -> set[str]:
    """Every artifact file of a run, as relative paths."""
    import mlflow

    client = mlflow.MlflowClient()
    found = set()
    for item in client.list_artifacts(run_id, path):
        found |= artifact_paths(run_id, item.path) if item.is_dir else {item.path}
    return found


def trained(data_dir, accuracy=None, arch="cnn_simple", **options) -> str:
    """A real tiny training run; `accuracy` overrides its test_accuracy to set the ranking."""
    import mlflow

    from experiments.train import train

    result = train(dataset="cifar10", arch=arch, epochs=1, batch_size=16, data_dir=str(data_dir), **options)
    if accuracy is not None:  # the first `accuracy` of the test images right: rankings agree image by image
        labels = np.load(mlflow.artifacts.download_artifacts(run_id=result.run_id,
                                                             artifact_path="evaluation/predictions.npz"))["labels"]
        correct = np.arange(len(labels)) < round(accuracy * len(labels))
        with_predictions(result.run_id, labels, correct, int(labels.max()) + 1)
        mlflow.MlflowClient().log_metric(result.run_id, "test_accuracy", accuracy, step=1)  # the latest value
    return result.run_id


def with_predictions(run_id: str, labels: np.ndarray, correct: np.ndarray, num_classes: int) -> str:
    """Replace a run's per-image predictions (on its own test digest) by constructed ones, right where
    `correct`; its test_accuracy becomes their accuracy."""
    import tempfile

    import mlflow

    from experiments import predictions

    client = mlflow.MlflowClient()
    predicted = np.where(correct, labels, (labels + 1) % num_classes)
    probabilities = np.full((len(labels), num_classes), 0.1 / (num_classes - 1), np.float32)
    probabilities[np.arange(len(labels)), predicted] = 0.9
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "predictions.npz"
        predictions.save(path, labels, probabilities, client.get_run(run_id).data.tags["data_digest"])
        client.log_artifact(run_id, str(path), "evaluation")
    client.log_metric(run_id, "test_accuracy", float(correct.mean()), step=1)
    return run_id


def pytest_collection_modifyitems(items):
    """The longest tests first, by their last recorded times (tests/durations.json, scripts/test_durations.py),
    a slow test not yet recorded before the fast tier: `make test`'s two work-stealing xdist workers then
    end together, on short tests, instead of one idling while the other finishes a long one."""
    import json

    recorded = json.loads((Path(__file__).parent / "durations.json").read_text())
    items.sort(key=lambda item: -recorded.get(item.nodeid, 30.0 if item.get_closest_marker("slow") else 0.5))
