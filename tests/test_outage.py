"""A tracking server outage mid-run: training goes on, and the outage epochs' metrics arrive afterwards."""

from __future__ import annotations

import subprocess
import sys
import time

import mlflow
import numpy as np
import pytest
from conftest import PROJECT_ROOT, make_npz, python_env

from experiments import checkpoints
from experiments.train import train

OUTAGE_SECONDS = 30
EPOCH_SECONDS = 2  # the pace the training is sized to on this machine
EPOCHS = 2 + 2 * OUTAGE_SECONDS // EPOCH_SECONDS + 4  # room for twice as many outage epochs as planned


def finished_epochs() -> int:
    saved = [checkpoints.latest(folder) for folder in checkpoints.root().glob("*")]
    return max((c.epoch for c in saved if c), default=0)


def images_for_an_epoch_of(seconds: float, tmp_path) -> int:
    """How many training images make one epoch last `seconds` here: a short tracked run of the same
    network and batch gives this machine's pace (CPUs here differ fivefold from day to day)."""
    folder = tmp_path / "pace"
    folder.mkdir()
    make_npz(folder / "mnist.npz", n_train=480, n_test=20)
    run_id = train(dataset="mnist", arch="cnn_simple", epochs=3, batch_size=16, data_dir=str(folder),
                   precision="float32").run_id
    stamps = sorted(m.timestamp for m in mlflow.MlflowClient().get_metric_history(run_id, "loss"))
    epoch = (stamps[2] - stamps[1]) / 1000  # the first epoch also traces the model
    return int(np.clip(seconds / epoch * 480, 400, 6000))


@pytest.mark.slow
def test_training_outlives_a_30_second_tracking_server_outage(tmp_path, tracking_server):
    # Tracking never blocks training, so epochs far shorter than the outage would all fit inside it,
    # and far longer ones would make the test long on a slow machine: size them to this machine.
    make_npz(tmp_path / "mnist.npz", n_train=images_for_an_epoch_of(EPOCH_SECONDS, tmp_path), n_test=100)
    log = open(tmp_path / "train.log", "w")
    training = subprocess.Popen(
        [sys.executable, "-m", "experiments.train", "--dataset", "mnist", "--arch", "cnn_simple",
         "--epochs", str(EPOCHS), "--batch-size", "16", "--precision", "float32", "--data-dir", str(tmp_path)],
        cwd=PROJECT_ROOT, env={**python_env(), "MLFLOW_TRACKING_URI": tracking_server.uri}, stdout=log,
        stderr=subprocess.STDOUT,
    )
    client = mlflow.MlflowClient(tracking_server.uri)
    deadline = time.time() + 300
    while finished_epochs() < 2:
        assert training.poll() is None and time.time() < deadline, (tmp_path / "train.log").read_text()[-2000:]
        time.sleep(0.1)
    (run,) = client.search_runs([client.get_experiment_by_name("mnist").experiment_id])

    tracking_server.stop()
    before = finished_epochs()
    time.sleep(OUTAGE_SECONDS)
    during = finished_epochs() - before
    tracking_server.start()

    assert training.wait(timeout=600) == 0, (tmp_path / "train.log").read_text()[-3000:]
    assert during >= 3, f"training stalled while the server was down ({during} epochs in {OUTAGE_SECONDS} s)"
    assert before + during < EPOCHS  # the outage fell inside training
    finished = client.get_run(run.info.run_id)
    assert finished.info.status == "FINISHED"
    for metric in ("loss", "accuracy", "val_loss", "val_accuracy"):
        history = client.get_metric_history(run.info.run_id, metric)
        assert sorted(m.step for m in history) == list(range(EPOCHS)), metric  # none lost, none twice
    assert "test_accuracy" in finished.data.metrics
    mlflow.set_tracking_uri(tracking_server.uri)  # the model reached the server, and loads from it
    model = mlflow.pyfunc.load_model(f"runs:/{run.info.run_id}/model")
    assert np.asarray(model.predict(np.zeros((2, 28, 28, 1), np.uint8))).shape == (2, 10)
