"""`python -m experiments.reproduce RUN_ID`: a logged run rerun from its recorded config.

Training runs in subprocesses: op determinism, once enabled, stays on in the process for good.
"""

from __future__ import annotations

import subprocess
import sys

import mlflow
import pytest
from conftest import PROJECT_ROOT, free_port, python_env

from experiments import reproduce


def run_module(*args: str) -> subprocess.CompletedProcess:
    out = subprocess.run([sys.executable, "-m", *args], cwd=PROJECT_ROOT, env=python_env(), capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return out


@pytest.mark.slow
def test_a_deterministic_run_is_reproduced_exactly(tiny_npz_dir):
    run_module("experiments.train", "--dataset", "mnist", "--arch", "cnn_simple", "--epochs", "2", "--batch-size", "16",
               "--data-dir", str(tiny_npz_dir), "--seed", "5", "--deterministic", "true")
    (original,) = mlflow.search_runs(experiment_names=["mnist"], output_format="list")
    assert original.data.params["deterministic"] == "true" and original.data.params["seed"] == "5"
    assert {"git_commit", "git_dirty", "data_digest", "tensorflow_version", "platform"} <= set(original.data.tags)

    out = run_module("experiments.reproduce", original.info.run_id)
    (new,) = mlflow.search_runs(experiment_names=["mnist"], output_format="list",
                                filter_string=f"tags.reproduces = '{original.info.run_id}'")
    assert new.info.run_id != original.info.run_id and new.info.status == "FINISHED"
    # Nothing here is specific to one run, but the precision: the original asked for auto, and the
    # reproduction trains in what auto chose then, whatever this machine would choose now.
    assert original.data.params["precision"] == "auto"
    assert new.data.params["precision"] == new.data.params["precision_chosen"] == original.data.params["precision_chosen"]
    assert {k: v for k, v in new.data.params.items() if k != "precision"} == \
        {k: v for k, v in original.data.params.items() if k != "precision"}
    assert new.data.tags["data_digest"] == original.data.tags["data_digest"]
    assert new.data.metrics["test_accuracy"] == original.data.metrics["test_accuracy"]  # exactly
    assert new.data.metrics["test_loss"] == original.data.metrics["test_loss"]
    accuracy = f"test_accuracy={original.data.metrics['test_accuracy']:.6f}"
    assert f"original   run {original.info.run_id}: {accuracy}" in out.stdout
    assert f"reproduced run {new.info.run_id}: {accuracy}" in out.stdout
    assert "match: test_accuracy and test_loss are identical" in out.stdout


def errors(argv, capsys) -> list[str]:
    assert reproduce.main(argv) == 2
    return [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]


def test_unknown_run_id_is_one_line(capsys, isolated_tracking):
    (line,) = errors(["0123456789abcdef0123456789abcdef"], capsys)
    assert line.startswith(f"error: no run '0123456789abcdef0123456789abcdef' in {isolated_tracking} (")


def test_a_run_that_is_not_a_training_run_is_refused(capsys):
    with mlflow.start_run() as run:
        mlflow.set_tag("dataset", "cifar10")  # a tuning search's parent, say: no arch
    assert errors([run.info.run_id], capsys) == [
        f"error: run {run.info.run_id} is not a training run (it has no dataset and arch tags)"]


def test_an_unreachable_store_is_one_line(capsys, monkeypatch):
    uri = f"http://127.0.0.1:{free_port()}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    (line,) = errors(["0123456789abcdef0123456789abcdef"], capsys)
    assert line.startswith(f"error: tracking server {uri} is unreachable")


def test_a_run_from_before_calibration_is_reproduced_without_a_calibration_holdout():
    from experiments.reproduce import recorded_config

    for train_config, expected in (({"dataset": "mnist", "arch": "mlp"}, 0.0),
                                   ({"dataset": "mnist", "arch": "mlp", "calibration_fraction": 0.1}, 0.1)):
        with mlflow.start_run() as run:
            mlflow.set_tags({"dataset": "mnist", "arch": "mlp"})
            mlflow.log_dict({"train_config": train_config}, "config.json")
        assert recorded_config(mlflow.get_run(run.info.run_id)).calibration_fraction == expected
