"""The MLproject as a user runs it: `mlflow run . -e <dataset> --env-manager local`."""

from __future__ import annotations

import re
import subprocess
import sys

import mlflow
import pytest
import numpy as np
import yaml
from conftest import PROJECT_ROOT, SHARED_DATA, artifact_paths, needs_shared_data, python_env, trained

from experiments.datasets import default_arch

ENTRY_POINTS = ["mnist", "fashion_mnist", "cifar10", "cifar100", "imagenette", "imagewoof", "caltech101", "folder"]
TUNE_ENTRY_POINTS = ["tune_cifar10", "tune_imagenette"]
REGISTRY_ENTRY_POINTS = {"promote": {"dataset", "metric", "dry_run", "experiment", "tta", "alpha", "min_gain", "max_class_drop"},
                        "rollback": {"model_name"}}
OTHER_ENTRY_POINTS = {"reproduce": {"run_id"}, "report": {"output_dir"},
                      "main": {"data_dir", "epochs", "limit", "trials", "seed", "datasets", "vgg16_weights",
                               "output_dir", "precision"}}
TUNE_PARAMS = {"tuner", "max_trials", "max_epochs", "executions_per_trial", "time_budget_minutes", "search_name",
               "limit", "seed", "data_dir", "precision"}
COMMON_PARAMS = {"arch", "epochs", "batch_size", "learning_rate", "seed", "data_dir", "limit", "precision"}


def mlproject() -> dict:
    return yaml.safe_load((PROJECT_ROOT / "MLproject").read_text())


def test_entry_points_and_typed_parameters():
    entries = mlproject()["entry_points"]
    assert list(entries) == ENTRY_POINTS + TUNE_ENTRY_POINTS + list(REGISTRY_ENTRY_POINTS) + list(OTHER_ENTRY_POINTS)
    for name, params in {**REGISTRY_ENTRY_POINTS, **OTHER_ENTRY_POINTS}.items():
        assert set(entries[name]["parameters"]) == params
        assert set(re.findall(r"{(\w+)}", entries[name]["command"])) == params
    for name in TUNE_ENTRY_POINTS:
        params, command = entries[name]["parameters"], entries[name]["command"]
        assert TUNE_PARAMS <= set(params), name
        assert command.startswith(f"python -m tuning.search --dataset {name.removeprefix('tune_')} ")
        assert set(re.findall(r"{(\w+)}", command)) == set(params), name
        assert params["tuner"]["default"] == "hyperband"
    for name in ENTRY_POINTS:
        entry = entries[name]
        params = entry["parameters"]
        assert COMMON_PARAMS <= set(params), name
        assert params["epochs"]["type"] == params["limit"]["type"] == params["batch_size"]["type"] == "int"
        assert params["learning_rate"]["type"] == "float"
        assert params["data_dir"]["default"] == ""
        assert params["deterministic"] == {"type": "string", "default": "false"}
        assert params["precision"] == {"type": "string", "default": "auto"}  # measured on the machine at hand
        assert params["options"] == params["recipe"] == {"type": "string", "default": "{}"}
        assert params["arch"]["default"] == default_arch(name)  # as `python -m experiments.train` without --arch
        assert entry["command"].startswith("python -m experiments.train --dataset " + name)
        # every declared parameter reaches the command
        assert set(re.findall(r"{(\w+)}", entry["command"])) == set(params), name
    for name in ("imagenette", "imagewoof", "caltech101", "folder"):
        assert {"image_size", "weights"} <= set(entries[name]["parameters"])
    assert "default" not in entries["reproduce"]["parameters"]["run_id"]  # required
    # Defaults reproduce the tutorial.
    assert entries["cifar10"]["parameters"]["arch"]["default"] == "cnn_deep"
    assert entries["cifar10"]["parameters"]["epochs"]["default"] == 10
    assert entries["mnist"]["parameters"]["arch"]["default"] == "cnn_simple"
    assert entries["imagenette"]["parameters"]["arch"]["default"] == "cnn_basic"


def test_conda_env_matches_pinned_requirements():
    conda = yaml.safe_load((PROJECT_ROOT / "conda.yaml").read_text())
    pip = next(d["pip"] for d in conda["dependencies"] if isinstance(d, dict))
    requirements = [
        line.strip() for line in (PROJECT_ROOT / "requirements.txt").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert sorted(pip) == sorted(requirements)
    assert "python=3.11.7" in conda["dependencies"]  # pyenv has it offline: `--env-manager virtualenv` works


@pytest.mark.slow
def test_mlflow_run_end_to_end_with_architecture_options_and_recipe_changes_as_json(tiny_npz_dir, isolated_tracking):
    proc = subprocess.run(
        [sys.executable, "-m", "mlflow", "run", ".", "-e", "mnist", "--env-manager", "local", "-P", "arch=convnet",
         "-P", "limit=30", "-P", "epochs=1", "-P", "batch_size=8", "-P", f"data_dir={tiny_npz_dir}",
         "-P", 'options={"kernel_size": 5, "batch_norm": true}', "-P", 'recipe={"optimizer": "sgd"}'],
        cwd=PROJECT_ROOT, env=python_env(), capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = mlflow.search_runs(search_all_experiments=True, output_format="list")
    assert len(runs) == 1
    run = runs[0]
    assert run.info.status == "FINISHED"
    assert 0.0 <= run.data.metrics["test_accuracy"] <= 1.0
    assert "accuracy" in run.data.metrics  # the per-epoch logging was not skipped by a param clash
    params = run.data.params
    assert params["limit"] == "30" and params["num_train"] == "30"
    assert run.data.tags["dataset"] == "mnist" and run.data.tags["arch"] == "convnet"
    assert (params["options.kernel_size"], params["options.batch_norm"], params["recipe.optimizer"]) == ("5", "true", "sgd")
    # One learning rate per epoch, the recipe's (test_recipes checks the recipe builds SGD).
    history = mlflow.MlflowClient().get_metric_history(run.info.run_id, "learning_rate")
    assert [(m.step, round(m.value, 6)) for m in history] == [(0, float(params["recipe.learning_rate"]))]
    # `mlflow run` made the experiment; the training still has the UI open it in the model-training view.
    assert mlflow.get_experiment(run.info.experiment_id).tags["mlflow.experimentKind"] == "custom_model_development"
    assert {"plots/confusion_matrix.png", "plots/learning_curves.png"} <= artifact_paths(run.info.run_id)
    model = mlflow.pyfunc.load_model(f"runs:/{run.info.run_id}/model")
    assert model.metadata.signature.inputs.inputs[0].type == np.dtype("uint8")
    assert np.asarray(model.predict(np.zeros((3, 28, 28, 1), np.uint8))).shape == (3, 10)


@pytest.mark.slow
@needs_shared_data
def test_a_mnist_run_records_its_model_with_test_figures_and_one_value_per_step(isolated_tracking):
    """The issue's acceptance run: `mlflow run . -e mnist -P epochs=2 -P limit=3000`."""
    env = {**python_env(), "MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL": "0.5"}  # samples within a short run
    proc = subprocess.run(
        [sys.executable, "-m", "mlflow", "run", ".", "-e", "mnist", "--env-manager", "local",
         "-P", "epochs=2", "-P", "limit=3000", "-P", f"data_dir={SHARED_DATA}"],
        cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    client = mlflow.MlflowClient()
    run = mlflow.search_runs(search_all_experiments=True, output_format="list")[0]
    assert client.get_experiment(run.info.experiment_id).tags["mlflow.experimentKind"] == "custom_model_development"
    histories = {name: client.get_metric_history(run.info.run_id, name) for name in run.data.metrics}
    for name, history in histories.items():  # at most one value per name and step
        assert len({m.step for m in history}) == len(history), name
    assert not any(name.startswith("validation_") for name in histories)  # no step-less copies of val_*
    for name in ("accuracy", "loss", "val_accuracy", "val_loss", "learning_rate"):
        assert [m.step for m in histories[name]] == [0, 1], name
    assert any(name.startswith("system/") for name in histories)
    assert {"test_macro_f1", "test_precision/0", "test_recall/9"} <= set(histories)

    [model] = mlflow.search_logged_models(experiment_ids=[run.info.experiment_id], output_format="list")
    on_model = {m.key: m for m in model.metrics}
    assert on_model["test_accuracy"].value == run.data.metrics["test_accuracy"]
    assert on_model["test_accuracy"].dataset_name == "mnist-testing"
    assert on_model["test_accuracy"].dataset_digest == run.data.tags["data_digest"]
    for name, metric in on_model.items():  # the final epoch's figures, never the first's
        if name in ("accuracy", "loss", "val_accuracy", "val_loss", "learning_rate"):
            assert (metric.step, metric.value) == (1, histories[name][-1].value), name
    assert not any(name.startswith("system/") for name in on_model)


@pytest.mark.slow
def test_mlflow_run_with_the_virtualenv_env_manager_builds_from_conda_yaml(tiny_npz_dir, isolated_tracking, tmp_path):
    """For machines without conda: MLflow turns conda.yaml's Python and pip list into a pyenv venv
    (about 2 min the first time here) and trains in it."""
    from registry.serve import virtualenv_missing

    if reason := virtualenv_missing("3.11.7"):
        pytest.skip(reason)
    env = {**python_env(), "MLFLOW_ENV_ROOT": str(tmp_path / "envs")}  # built anew, removed with the test
    proc = subprocess.run(
        [sys.executable, "-m", "mlflow", "run", ".", "-e", "mnist", "--env-manager", "virtualenv",
         "-P", "limit=30", "-P", "epochs=1", "-P", "batch_size=8", "-P", f"data_dir={tiny_npz_dir}"],
        cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    [run] = mlflow.search_runs(search_all_experiments=True, output_format="list")
    assert run.info.status == "FINISHED" and "test_accuracy" in run.data.metrics
    # It ran in the environment MLflow built, not in this interpreter's.
    assert str(tmp_path / "envs") in proc.stderr, proc.stderr[-3000:]


@pytest.mark.slow
def test_mlflow_run_with_bad_input_fails_with_one_line():
    proc = subprocess.run(
        [sys.executable, "-m", "mlflow", "run", ".", "-e", "cifar10", "--env-manager", "local", "-P", "epochs=0"],
        cwd=PROJECT_ROOT, env=python_env(), capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode != 0
    assert "error: epochs must be a positive integer, got 0" in proc.stderr
    assert "Traceback" not in proc.stderr.split("error: epochs")[0]  # the training process printed no traceback


@pytest.mark.slow
def test_tune_entry_point_runs_and_resumes_under_one_parent(tmp_path, isolated_tracking):
    from conftest import make_npz

    make_npz(tmp_path / "cifar10.npz", n_train=60, n_test=21, shape=(32, 32, 3), classes=3)

    def tune(max_trials):
        proc = subprocess.run(
            [sys.executable, "-m", "mlflow", "run", ".", "-e", "tune_cifar10", "--env-manager", "local",
             "--experiment-name", "tuning", "-P", "tuner=random", "-P", f"max_trials={max_trials}",
             "-P", "max_epochs=1", "-P", "search_name=entry", "-P", f"data_dir={tmp_path}"],
            cwd=PROJECT_ROOT, env=python_env(), capture_output=True, text=True, timeout=600,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        return proc.stdout

    out = tune(2)
    assert re.search(r"^trial 2 of 2: val_accuracy=\d\.\d{4} best=\d\.\d{4} elapsed=\d+s \{", out, re.M)
    tune(3)  # the same search_name: resumes, runs one more trial
    runs = mlflow.search_runs(experiment_names=["tuning"], output_format="list")
    by_role = {}
    for run in runs:
        by_role.setdefault(run.data.tags.get("search_role"), []).append(run)
    [parent] = by_role["parent"]
    [resume] = by_role["resume"]  # the second `mlflow run` is filed under the first as a resume record
    assert parent.data.params["tuner"] == "random" and parent.info.status == "FINISHED"
    assert mlflow.get_experiment(parent.info.experiment_id).tags["mlflow.experimentKind"] == "custom_model_development"
    assert resume.data.tags["mlflow.parentRunId"] == parent.info.run_id and resume.info.status == "FINISHED"
    assert sorted(r.data.tags["trial_id"] for r in by_role["trial"]) == ["0", "1", "2"]
    assert all(r.data.tags["mlflow.parentRunId"] == parent.info.run_id for r in by_role["trial"] + by_role["best"])
    assert all(r.info.status == "FINISHED" for r in runs)


@pytest.mark.slow
def test_promote_and_rollback_entry_points(tmp_path, isolated_tracking):
    from conftest import make_npz

    make_npz(tmp_path / "cifar10.npz", n_train=40, n_test=20, shape=(32, 32, 3), classes=3)

    def run(entry, *params):
        proc = subprocess.run(
            [sys.executable, "-m", "mlflow", "run", ".", "-e", entry, "--env-manager", "local",
             "--experiment-name", "promotions", *[a for p in params for a in ("-P", p)]],
            cwd=PROJECT_ROOT, env={k: v for k, v in python_env().items() if k != "MLFLOW_EXPERIMENT_ID"}, capture_output=True, text=True, timeout=600,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        return proc.stdout

    first = trained(tmp_path, 0.5)
    assert f"cifar10: version 1 = run {first} (cnn_simple, test_accuracy=0.5000) is now champion" in run(
        "promote", "dataset=cifar10")
    trained(tmp_path, 0.9)
    assert "would be registered as champion" in run("promote", "dataset=cifar10", "dry_run=true")
    assert "cifar10: version 2 = run" in run("promote", "dataset=cifar10")
    assert "champion moves from version 2 back to version 1" in run("rollback", "model_name=cifar10")
    client = mlflow.MlflowClient()
    assert str(client.get_model_version_by_alias("cifar10", "champion").version) == "1"
    launches = mlflow.search_runs(experiment_names=["promotions"], output_format="list")
    assert sorted(r.data.tags["promotion"] for r in launches) == ["promote"] * 3 + ["rollback"]
    assert all(r.info.status == "FINISHED" for r in launches)
