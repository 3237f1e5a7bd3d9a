"""Training survives a kill: per-epoch checkpoints, resumed in the same MLflow run with a continuous history."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import keras
import mlflow
import pytest
from conftest import PROJECT_ROOT, make_npz, python_env

from experiments import checkpoints
from experiments.errors import UserError
from experiments.train import TrainConfig, train

EPOCHS = 12


def steps(run_id: str, metric: str) -> list[int]:
    return [m.step for m in mlflow.MlflowClient().get_metric_history(run_id, metric)]


@pytest.mark.slow
def test_a_sigkilled_training_run_resumes_in_the_same_run(tmp_path):
    make_npz(tmp_path / "mnist.npz", n_train=240, n_test=40)
    command = [sys.executable, "-m", "experiments.train", "--dataset", "mnist", "--arch", "cnn_simple",
               "--epochs", str(EPOCHS), "--batch-size", "16", "--data-dir", str(tmp_path), "--seed", "1"]
    process = subprocess.Popen(command, cwd=PROJECT_ROOT, env=python_env(), stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not list(checkpoints.root().glob(f"*/{checkpoints.PREFIX}0003")):
        assert process.poll() is None and time.time() < deadline, "training ended before its third epoch was saved"
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL

    (run,) = mlflow.search_runs(experiment_names=["mnist"], output_format="list")
    assert run.info.status == "RUNNING"  # a SIGKILL gives MLflow no chance to close the run
    saved = checkpoints.latest(checkpoints.root() / run.info.run_id)
    assert 3 <= saved.epoch < EPOCHS
    # A kill during a save leaves a staging folder: it is never read.
    staging = checkpoints.root() / run.info.run_id / f".staging-{saved.epoch + 1:04d}-1"
    staging.mkdir()
    (staging / "model.keras").write_bytes(b"half a zip")

    resumed = subprocess.run(command + ["--resume", "true"], cwd=PROJECT_ROOT, env=python_env(),
                             capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"resuming run {run.info.run_id} after epoch {saved.epoch} of {EPOCHS}" in resumed.stdout

    (finished,) = mlflow.search_runs(experiment_names=["mnist"], output_format="list")
    assert finished.info.run_id == run.info.run_id and finished.info.status == "FINISHED"
    assert finished.data.tags["resumed_after_epoch"] == str(saved.epoch)
    for metric in ("loss", "accuracy", "val_accuracy"):
        assert steps(run.info.run_id, metric) == list(range(EPOCHS))  # every epoch once: none lost, none twice
    assert "test_accuracy" in finished.data.metrics
    assert mlflow.pyfunc.load_model(f"runs:/{run.info.run_id}/model") is not None
    assert not (checkpoints.root() / run.info.run_id).exists()  # spent once the model is logged


class StopAfter(keras.callbacks.Callback):
    """Stands in for a crash: the fit raises once `epochs` epochs have finished."""

    def __init__(self, epochs: int):
        super().__init__()
        self.epochs = epochs

    def on_epoch_end(self, epoch, logs=None):
        if epoch + 1 == self.epochs:
            raise RuntimeError("power cut")


@pytest.mark.slow
def test_a_run_with_a_checkpoint_continues_by_itself_when_reopened(tiny_npz_dir, monkeypatch):
    config = TrainConfig(dataset="mnist", arch="cnn_simple", epochs=5, batch_size=16, data_dir=str(tiny_npz_dir))
    mlflow.set_experiment("mnist")
    with pytest.raises(RuntimeError, match="power cut"), mlflow.start_run() as run:
        train(config, callbacks=[StopAfter(2)])
    assert checkpoints.latest(checkpoints.root() / run.info.run_id).epoch == 2

    # What `mlflow run --run-id <id>` does: the entry point starts with MLFLOW_RUN_ID=<id>.
    monkeypatch.setenv("MLFLOW_RUN_ID", run.info.run_id)
    result = train(config)
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)  # start_run() consumes it
    assert result.run_id == run.info.run_id and mlflow.get_run(result.run_id).info.status == "FINISHED"
    assert steps(run.info.run_id, "accuracy") == [0, 1, 2, 3, 4]
    assert len(result.history["accuracy"]) == 5  # the learning curves span the whole run

    # Different settings cannot continue someone else's checkpoint.
    with pytest.raises(RuntimeError), mlflow.start_run() as other:
        train(config, callbacks=[StopAfter(1)])
    with mlflow.start_run(run_id=other.info.run_id), pytest.raises(UserError, match="different settings"):
        train(config, epochs=7)
    # resume=True in a brand-new run points at the run to reopen.
    with mlflow.start_run(), pytest.raises(UserError, match=f"--run-id {other.info.run_id}"):
        train(config, resume=True)


def test_resume_without_a_checkpoint_starts_a_new_run(tiny_npz_dir, capsys):
    result = train(dataset="mnist", arch="mlp", epochs=1, batch_size=16, data_dir=str(tiny_npz_dir), resume=True)
    assert "no checkpoint of these settings" in capsys.readouterr().out
    assert mlflow.get_run(result.run_id).info.status == "FINISHED"
