"""One training on two workers (experiments/distributed.py launching experiments.train under
MultiWorkerMirroredStrategy on loopback): one MLflow run, equal weights on both workers, and a killed
run resumed in the same run."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import time

import mlflow
import numpy as np
import psutil
import pytest
from conftest import PROJECT_ROOT, make_npz, python_env

from experiments import checkpoints
from experiments.errors import UserError
from experiments.train import train

EPOCH_METRICS = ("loss", "accuracy", "val_loss", "val_accuracy", "learning_rate")


def launcher(data_dir, epochs: int, *extra: str) -> list[str]:
    return [sys.executable, "-m", "experiments.distributed", "--workers", "2", "--", "--dataset", "mnist",
            "--arch", "cnn_simple", "--epochs", str(epochs), "--batch-size", "16", "--data-dir", str(data_dir),
            "--precision", "float32", *extra]


def digests(output: str) -> dict[int, str]:
    """worker index -> the weights digest it printed at the end of training (found anywhere in a line: the
    two workers share one stdout)."""
    return {int(index): digest for index, digest in
            re.findall(r"worker (\d) of 2: training done, weights (sha256:[0-9a-f]{16})", output)}


def steps(run_id: str, metric: str) -> list[int]:
    return [m.step for m in mlflow.MlflowClient().get_metric_history(run_id, metric)]


@pytest.mark.slow
def test_two_workers_train_as_one_run_with_equal_weights(tmp_path):
    make_npz(tmp_path / "mnist.npz", n_train=64, n_test=16)
    done = subprocess.run(launcher(tmp_path, 2), cwd=PROJECT_ROOT, env=python_env(), capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]

    (run,) = mlflow.search_runs(search_all_experiments=True, output_format="list")  # the chief's only
    assert run.info.status == "FINISHED"
    assert {k: run.data.params[k] for k in ("strategy", "strategy_built", "num_workers", "replicas",
                                            "global_batch_size", "per_replica_batch_size")} == {
        "strategy": "multi_worker", "strategy_built": "multi_worker", "num_workers": "2", "replicas": "2",
        "global_batch_size": "16", "per_replica_batch_size": "8"}
    assert len(run.data.tags["cluster_workers"].split(",")) == 2
    for metric in EPOCH_METRICS:
        assert steps(run.info.run_id, metric) == [0, 1], metric  # one value per epoch, not one per worker
    assert "test_accuracy" in run.data.metrics

    printed = digests(done.stdout)
    assert set(printed) == {0, 1} and printed[0] == printed[1], done.stdout[-3000:]  # synchronous: equal weights

    model = mlflow.pyfunc.load_model(f"runs:/{run.info.run_id}/model")
    images = np.random.default_rng(0).integers(0, 256, (5, 28, 28, 1), dtype=np.uint8)
    probabilities = np.asarray(model.predict(images))
    assert probabilities.shape == (5, 10) and np.allclose(probabilities.sum(axis=1), 1, atol=1e-3)
    assert not list(checkpoints.root().glob("*/epoch-*"))  # a finished run's checkpoints are spent


@pytest.mark.slow
def test_a_killed_worker_stops_the_launcher_and_the_run_resumes_in_the_same_run(tmp_path):
    """A worker dies (SIGKILL) after the first checkpoint: the launcher stops the chief and exits non-zero
    with one line; `--resume true` then finishes the same run, no epoch lost or logged twice."""
    epochs = 4
    make_npz(tmp_path / "mnist.npz", n_train=96, n_test=16)
    with open(tmp_path / "launcher.err", "w") as errors:
        process = subprocess.Popen(launcher(tmp_path, epochs), cwd=PROJECT_ROOT, env=python_env(),
                                   stdout=subprocess.DEVNULL, stderr=errors)
        deadline = time.time() + 400
        while not list(checkpoints.root().glob(f"*/{checkpoints.PREFIX}*")):
            assert process.poll() is None and time.time() < deadline, "training ended before its first epoch was saved"
            time.sleep(0.02)
        workers = {child.cmdline()[-1]: child for child in psutil.Process(process.pid).children()}
        workers["1"].send_signal(signal.SIGKILL)
        assert process.wait(timeout=120) == 1
        assert not workers["0"].is_running() or workers["0"].status() == psutil.STATUS_ZOMBIE  # the chief stopped
    [line] = [line for line in (tmp_path / "launcher.err").read_text().splitlines() if line.startswith("error:")]
    assert re.fullmatch(r"error: worker 1 \(127\.0\.0\.1:\d+\) exited with code -9; stopped the others\. .*--resume "
                        r"true to continue", line), line

    (run,) = mlflow.search_runs(search_all_experiments=True, output_format="list")
    assert run.info.status != "FINISHED"
    saved = checkpoints.latest(checkpoints.root() / run.info.run_id)
    assert 1 <= saved.epoch < epochs

    resumed = subprocess.run(launcher(tmp_path, epochs, "--resume", "true"), cwd=PROJECT_ROOT, env=python_env(),
                             capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming run {run.info.run_id} after epoch {saved.epoch} of {epochs}" in resumed.stdout
    (finished,) = mlflow.search_runs(search_all_experiments=True, output_format="list")
    assert finished.info.run_id == run.info.run_id and finished.info.status == "FINISHED"
    for metric in EPOCH_METRICS:
        assert steps(run.info.run_id, metric) == list(range(epochs)), metric  # none lost, none twice
    printed = digests(resumed.stdout)
    # Both workers resumed from the same checkpoint.
    assert set(printed) == {0, 1} and printed[0] == printed[1], resumed.stdout[-3000:]


@pytest.mark.parametrize("args, message", [
    (["--strategy", "multi_worker"], "error: --strategy multi_worker needs its workers: set TF_CONFIG, or pass"),
    (["--strategy", "multi_worker", "--workers", "127.0.0.1:1,127.0.0.1:2", "--worker-index", "3"],
     "error: --worker-index 3 is outside the 2 workers of --workers"),
])
def test_bad_cluster_settings_fail_in_one_line_before_a_run(tiny_npz_dir, capsys, args, message):
    from experiments.train import main

    assert main(["--dataset", "mnist", "--data-dir", str(tiny_npz_dir), *args]) == 2
    errors = capsys.readouterr().err.splitlines()
    assert len(errors) == 1 and errors[0].startswith(message), errors
    assert mlflow.search_runs(search_all_experiments=True, output_format="list") == []


def test_a_batch_that_does_not_split_over_the_workers_fails_before_joining(tiny_npz_dir):
    with pytest.raises(UserError, match="batch_size 15 does not split evenly over 2 replicas; use a multiple of 2"):
        train(dataset="mnist", arch="cnn_simple", data_dir=str(tiny_npz_dir), batch_size=15, strategy="multi_worker",
              workers="127.0.0.1:1,127.0.0.1:2", worker_index=0)
    assert mlflow.search_runs(search_all_experiments=True, output_format="list") == []


def test_the_launcher_refuses_what_it_sets_and_a_bad_batch_in_one_line(tiny_npz_dir):
    from experiments.distributed import launch

    with pytest.raises(UserError, match="--worker-index is the launcher's to set"):
        launch(2, ["--dataset", "mnist", "--worker-index", "1"])
    with pytest.raises(UserError, match="batch_size 15 does not split evenly over 2 replicas"):
        launch(2, ["--dataset", "mnist", "--data-dir", str(tiny_npz_dir), "--batch-size", "15"])
    with pytest.raises(UserError, match="--workers must be at least 1, got 0"):
        launch(0, ["--dataset", "mnist"])


def test_mirrored_trains_in_one_run_on_this_machines_devices(tiny_npz_dir):
    """`mirrored` on a machine without GPUs: MirroredStrategy over its one CPU device, tracked as usual."""
    result = train(dataset="mnist", arch="cnn_simple", epochs=1, batch_size=16, data_dir=str(tiny_npz_dir),
                   strategy="mirrored")
    run = mlflow.get_run(result.run_id)
    assert run.info.status == "FINISHED" and 0 <= result.test_accuracy <= 1
    assert {k: run.data.params[k] for k in ("strategy", "strategy_built", "num_workers", "replicas",
                                            "per_replica_batch_size")} == {
        "strategy": "mirrored", "strategy_built": "mirrored", "num_workers": "1", "replicas": "1",
        "per_replica_batch_size": "16"}
    assert steps(result.run_id, "loss") == [0]
