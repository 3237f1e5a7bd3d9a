"""Keras Tuner searches on tiny synthetic data, tracked in a real sqlite store (and a real mlflow server)."""

from __future__ import annotations

import dataclasses
import json
import re
import signal
import subprocess
import sys
import time

import mlflow
import numpy as np
import pytest

from conftest import PROJECT_ROOT, make_npz, python_env
from tuning.search import SearchConfig, check_search_state, main, run_search


def errors(capsys) -> list[str]:
    return [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]


def search_runs(client=None, **tags):
    client = client or mlflow.MlflowClient()
    query = " and ".join(f"tags.{k} = '{v}'" for k, v in tags.items())
    experiments = [e.experiment_id for e in client.search_experiments()]
    return client.search_runs(experiments, query, max_results=1000)


TUTORIAL_POINT = {  # cnn_deep with the tutorial's recipe, as a trial's flat params are logged (strings)
    "optimizer": "adam", "learning_rate": "0.001", "schedule": "constant", "batch_size": "128",
    "weight_decay": "0.0", "label_smoothing": "0.0", "warmup_fraction": "0.0", "blocks": "2", "widths": "50,75|125",
    "block_dropouts": "0.25|0.25", "dense_layers": "2", "dense_units": "500,250", "dense_dropouts": "0.4,0.3",
    "kernel_size": "3", "batch_norm": "false", "augment": "0.0",
}


@pytest.mark.parametrize("tuner", ["hyperband", "bayesian", "random"])
@pytest.mark.slow
def test_search_logs_parent_trials_and_retrained_best(tuner, tiny_cifar):
    result = run_search(SearchConfig("cifar10", tuner=tuner, max_trials=3, max_epochs=2, data_dir=str(tiny_cifar)))
    client = mlflow.MlflowClient()

    [parent] = search_runs(client, search_role="parent")
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["search_name"] == f"cifar10-{tuner}"
    assert (parent.data.tags["dataset"], parent.data.tags["tuner"]) == ("cifar10", tuner)
    assert parent.data.params["max_trials"] == "3"

    trials = search_runs(client, search_role="trial")
    assert 2 <= len(trials) <= 3
    assert all(r.data.tags["mlflow.parentRunId"] == parent.info.run_id for r in trials)
    assert sorted(r.data.tags["trial_id"] for r in trials) == sorted({r.data.tags["trial_id"] for r in trials})
    for run in trials:
        assert run.info.status == "FINISHED"
        assert 0.0 <= run.data.metrics["score"] <= 1.0
        assert set(TUTORIAL_POINT) <= set(run.data.params)
        history = client.get_metric_history(run.info.run_id, "val_accuracy")  # per epoch, from autolog
        assert 1 <= len(history) <= 2
        assert run.data.metrics["score"] == pytest.approx(max(m.value for m in history))
        contexts = {tag.value for d in client.get_run(run.info.run_id).inputs.dataset_inputs for tag in d.tags
                    if tag.key == "mlflow.data.context"}
        assert contexts == {"training", "validation"}  # trials never see the test split
    # The first trial is the tutorial's cnn_deep with its recipe; the next ones change one thing each.
    by_id = {int(r.data.tags["trial_id"]): r.data.params for r in trials}
    assert {k: by_id[0][k] for k in TUTORIAL_POINT} == TUTORIAL_POINT
    changed = [{"batch_norm": "true"}, {"schedule": "cosine", "warmup_fraction": "0.05"}]
    for trial_id, change in enumerate(changed, start=1):
        if trial_id in by_id:
            assert {k: by_id[trial_id][k] for k in TUTORIAL_POINT} == {**TUTORIAL_POINT, **change}

    experiment_ids = [parent.info.experiment_id]
    for run in trials:  # no model per trial
        assert not mlflow.search_logged_models(experiment_ids, f"source_run_id = '{run.info.run_id}'",
                                               output_format="list")
    [best] = search_runs(client, best="true")
    assert best.data.tags["mlflow.parentRunId"] == parent.info.run_id
    assert best.info.status == "FINISHED"
    assert best.data.metrics["test_accuracy"] == pytest.approx(result.test_accuracy)
    best_params = by_id[int(best.data.tags["trial_id"])]  # the retrained best logs its trial's flat params
    assert {k: best.data.params[k] for k in TUTORIAL_POINT} == {k: best_params[k] for k in TUTORIAL_POINT}
    [model] = mlflow.search_logged_models(experiment_ids, f"source_run_id = '{best.info.run_id}'",
                                          output_format="list")
    images = np.zeros((2, 32, 32, 3), np.uint8)
    assert mlflow.pyfunc.load_model(model.model_uri).predict(images).shape == (2, 10)  # the CIFAR-10 class names

    scores = [r.data.metrics["score"] for r in trials]
    assert parent.data.metrics["best_score"] == pytest.approx(max(scores))
    best_trial = max(trials, key=lambda r: (r.data.metrics["score"], -int(r.data.tags["trial_id"])))
    assert best.data.tags["trial_id"] == parent.data.tags["best_trial_id"] == best_trial.data.tags["trial_id"]
    artifacts = {f.path for f in client.list_artifacts(parent.info.run_id)}
    assert {"trials.csv", "best_hyperparameters.json", "plots"} <= artifacts
    table = client.download_artifacts(parent.info.run_id, "trials.csv")
    assert len(open(table).read().strip().splitlines()) == len(trials) + 1
    assert not search_runs(client) or all(r.info.status != "RUNNING" for r in search_runs(client))


NUMBERS = ("learning_rate", "batch_size", "weight_decay", "label_smoothing", "warmup_fraction", "blocks",
           "dense_layers", "kernel_size", "augment")


def assert_documented_format(params: dict) -> None:
    """Numbers as plain numbers; widths "50,75|125" (',' within a block, '|' between), one dropout per block
    ("0.25|0.25"), one unit count and dropout per dense layer ("500,250")."""
    for key in NUMBERS:
        float(params[key])
    blocks, dense_layers = int(params["blocks"]), int(params["dense_layers"])
    assert re.fullmatch(r"\d+(,\d+)*(\|\d+(,\d+)*)*", params["widths"]), params["widths"]
    assert len(params["widths"].split("|")) == blocks
    assert [float(d) for d in params["block_dropouts"].split("|")] and len(params["block_dropouts"].split("|")) == blocks
    assert [int(u) for u in params["dense_units"].split(",")] and len(params["dense_units"].split(",")) == dense_layers
    assert len([float(d) for d in params["dense_dropouts"].split(",")]) == dense_layers
    assert params["batch_norm"] in ("true", "false")
    assert params["optimizer"] in ("adam", "adamw", "sgd") and params["schedule"] in ("constant", "cosine")


@pytest.mark.slow
def test_every_trial_logs_the_same_flat_params_whatever_its_optimizer(tiny_cifar, monkeypatch):
    """Adam, SGD and AdamW trials (forced by the steps) and a Hyperband trial continuing another: one set of
    param keys, no conditional hyperparameter's name, and the raw space kept on the parent."""
    import keras_tuner as kt

    from tuning.spaces import SPACES, TRIAL_PARAMS, choose

    space = dataclasses.replace(SPACES["cifar10"], steps=({"optimizer": "sgd"}, {"optimizer": "adamw"}))
    monkeypatch.setitem(SPACES, "cifar10", space)
    # max_epochs 3: bracket 1 trains trials 0-2 for 1 epoch, then trial 3 continues the best for 3.
    run_search(SearchConfig("cifar10", tuner="hyperband", max_trials=4, max_epochs=3, retrain=False,
                            data_dir=str(tiny_cifar)))
    client = mlflow.MlflowClient()
    trials = {r.data.tags["trial_id"]: r for r in search_runs(client, search_role="trial")}
    assert sorted(trials) == ["0", "1", "2", "3"] and all(r.info.status == "FINISHED" for r in trials.values())
    keys = {name: set(r.data.params) for name, r in trials.items()}
    assert all(k == keys["0"] for k in keys.values()), {name: k ^ keys["0"] for name, k in keys.items()}

    hp = kt.HyperParameters()
    choose(hp, space)
    names = {p.name for p in hp.space}
    assert {"adam_learning_rate", "sgd_learning_rate", "block3_width1"} <= names
    assert not keys["0"] & (names - set(TRIAL_PARAMS))  # no raw hyperparameter beside the flat ones
    hyperband = {"tuner/epochs", "tuner/initial_epoch", "tuner/bracket", "tuner/round", "tuner/trial_id"}
    assert set(TRIAL_PARAMS) | hyperband <= keys["0"]
    assert not {k for k in keys["0"] if k.startswith(("options.", "recipe.", "optimizer_"))}

    params = {name: r.data.params for name, r in trials.items()}
    assert [params[n]["optimizer"] for n in "012"] == ["adam", "sgd", "adamw"]
    assert [params[n]["learning_rate"] for n in "012"] == ["0.001", "0.05", "0.001"]
    assert [params[n]["weight_decay"] for n in "012"] == ["0.0", "0.0005", "0.05"]
    for trial_params in params.values():
        assert_documented_format(trial_params)
    assert [params[n]["tuner/trial_id"] for n in "012"] == ["none"] * 3
    assert params["3"]["tuner/trial_id"] in "012" and params["3"]["tuner/epochs"] == "3"
    assert {k: params["3"][k] for k in TRIAL_PARAMS} == {k: params[params["3"]["tuner/trial_id"]][k] for k in TRIAL_PARAMS}

    [parent] = search_runs(client, search_role="parent")
    space_file = json.load(open(client.download_artifacts(parent.info.run_id, "search_space.json")))
    assert {p["config"]["name"] for p in space_file["space"]} == names
    assert kt.HyperParameters.from_config(space_file).values == hp.values  # it rebuilds the space
    best = json.load(open(client.download_artifacts(parent.info.run_id, "best_hyperparameters.json")))
    assert {k: str(v) for k, v in best["params"].items()} == {k: params[best["trial_id"]][k] for k in TRIAL_PARAMS}
    assert "optimizer" in best["hyperparameters"]  # the raw values too
    assert parent.data.tags["best.widths"] == params[best["trial_id"]]["widths"]


def test_trial_params_are_flat_and_the_same_keys_at_every_point():
    import keras_tuner as kt

    from tuning.spaces import SPACES, TRIAL_PARAMS, choose, params_of, trial_params

    assert trial_params(choose(kt.HyperParameters(), SPACES["cifar10"])) == {
        "optimizer": "adam", "learning_rate": 0.001, "schedule": "constant", "batch_size": 128, "weight_decay": 0.0,
        "label_smoothing": 0.0, "warmup_fraction": 0.0, "blocks": 2, "widths": "50,75|125",
        "block_dropouts": "0.25|0.25", "dense_layers": 2, "dense_units": "500,250", "dense_dropouts": "0.4,0.3",
        "kernel_size": 3, "batch_norm": "false", "augment": 0.0}
    hp = kt.HyperParameters()
    hp.values.update(conv_blocks=3, block2_convs=2, dense_layers=1, optimizer="sgd", schedule="cosine", batch_norm=True)
    params = params_of(hp, SPACES["cifar10"])
    assert params == {**params, "optimizer": "sgd", "learning_rate": 0.05, "weight_decay": 0.0005,
                      "schedule": "cosine", "warmup_fraction": 0.05, "blocks": 3, "widths": "50,75|125,125|256",
                      "block_dropouts": "0.25|0.25|0.25", "dense_layers": 1, "dense_units": "500",
                      "dense_dropouts": "0.4", "batch_norm": "true"}
    assert "sgd_learning_rate" not in hp.values  # params_of leaves the trial's hyperparameters alone
    imagenette = params_of(kt.HyperParameters(), SPACES["imagenette"])
    assert tuple(params) == tuple(imagenette) == TRIAL_PARAMS
    assert imagenette["widths"] == "32|64|128|128|256" and imagenette["dense_units"] == "256"
    for values in (params, imagenette):
        assert_documented_format({k: str(v) for k, v in values.items()})


def test_the_tutorial_models_are_points_of_the_search_spaces():
    import keras_tuner as kt

    from experiments.models import DataSpec, create_model
    from tuning.spaces import SPACES, choose

    for dataset, shape in (("cifar10", (32, 32, 3)), ("imagenette", (128, 128, 3))):
        space = SPACES[dataset]
        spec = DataSpec(shape, 10, True)
        options = choose(kt.HyperParameters(), space)["options"]
        searched, tutorial = create_model("convnet", spec, **options), create_model(space.tutorial_arch, spec)

        def layers(model):
            return [(type(l).__name__, {k: v for k, v in l.get_config().items() if k != "name"}) for l in model.layers]

        assert layers(searched) == layers(tutorial)
        assert searched.count_params() == tutorial.count_params()


def test_every_step_from_the_tutorial_sets_real_hyperparameters_to_legal_values():
    import keras_tuner as kt

    from tuning.spaces import SPACES, choose

    for dataset, space in SPACES.items():
        hp = kt.HyperParameters()
        choose(hp, space)
        params = {p.name: p for p in hp.space}
        assert space.steps, dataset
        for step in space.steps:
            for name, value in step.items():
                param = params[name]  # a KeyError here is a misspelt step
                assert hp.is_active(param), (dataset, name)  # active at the tutorial's point
                if isinstance(param, kt.engine.hyperparameters.Choice):
                    assert value in param.values, (dataset, name, value)
                elif isinstance(param, kt.engine.hyperparameters.Boolean):
                    assert isinstance(value, bool), (dataset, name, value)
                else:
                    assert param.min_value <= value <= param.max_value, (dataset, name, value)
                assert value != param.default, (dataset, name)  # a step changes something


def test_imagenette_trials_never_stack_two_convs_at_full_resolution():
    import keras_tuner as kt

    from tuning.spaces import SPACES, choose

    hp = kt.HyperParameters()
    choose(hp, SPACES["imagenette"])
    space = {p.name: p for p in hp.space}
    assert isinstance(space["block1_convs"], kt.engine.hyperparameters.Fixed) and space["block1_convs"].value == 1
    assert "block1_width2" not in space
    assert (space["block2_convs"].min_value, space["block2_convs"].max_value) == (1, 2)


class FailSecondTrial:
    """A real Keras callback that raises in the second trial it sees (each trial gets a deep copy)."""

    trials_seen = 0

    def __new__(cls):
        import keras

        class Callback(keras.callbacks.Callback):
            def on_train_begin(self, logs=None):
                FailSecondTrial.trials_seen += 1
                if FailSecondTrial.trials_seen == 2:
                    raise RuntimeError("disk full while writing a checkpoint")

        return Callback()


@pytest.mark.slow
def test_a_failing_trial_is_failed_with_its_error_and_the_search_goes_on(tiny_cifar):
    run_search(SearchConfig("cifar10", tuner="random", max_trials=3, max_epochs=1, data_dir=str(tiny_cifar)),
               callbacks=[FailSecondTrial()])
    trials = search_runs(search_role="trial")
    statuses = {r.data.tags["trial_id"]: r.info.status for r in trials}
    assert statuses == {"0": "FINISHED", "1": "FAILED", "2": "FINISHED"}
    [failed] = [r for r in trials if r.info.status == "FAILED"]
    assert failed.data.tags["error"] == "RuntimeError: disk full while writing a checkpoint"
    error = mlflow.MlflowClient().download_artifacts(failed.info.run_id, "error.txt")
    assert "Traceback" in open(error).read()
    assert "score" not in failed.data.metrics
    assert all(r.info.status != "RUNNING" for r in search_runs())
    [best] = search_runs(best="true")
    assert best.data.tags["trial_id"] in ("0", "2")


@pytest.mark.slow
def test_time_budget_stops_the_search_cleanly_and_reports_what_it_has(tiny_cifar, capsys):
    started = time.time()
    result = run_search(SearchConfig("cifar10", tuner="random", max_trials=50, max_epochs=50, patience=50,
                                     time_budget_minutes=0.1, data_dir=str(tiny_cifar)))
    assert time.time() - started < 120
    trials = search_runs(search_role="trial")
    assert 1 <= len(trials) < 50
    assert all(r.info.status == "FINISHED" for r in trials)
    # The running trial stopped after the epoch in which the budget ran out, long before 50 epochs.
    assert all(len(mlflow.MlflowClient().get_metric_history(r.info.run_id, "val_accuracy")) < 50 for r in trials)
    [parent] = search_runs(search_role="parent")
    assert parent.info.status == "FINISHED" and "best_score" in parent.data.metrics
    assert result is not None and search_runs(best="true")


def test_images_too_small_for_the_space_fail_in_one_line(tmp_path, capsys):
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    make_npz(data_dir / "cifar10.npz", n_train=30, n_test=9, shape=(4, 4, 3), classes=3)
    assert main(["--dataset", "cifar10", "--data-dir", str(data_dir)]) == 2
    assert not search_runs()
    assert errors(capsys) == [
        "error: 4x4 images are too small for the cifar10 search space (up to 3 pooling blocks need at least "
        "8 pixels); use a larger image_size"]


@pytest.mark.slow
def test_resume_after_sigkill_keeps_finished_trials_and_duplicates_nothing(tmp_path, isolated_tracking):
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    make_npz(data_dir / "cifar10.npz", n_train=300, n_test=30, shape=(32, 32, 3), classes=3)
    command = [sys.executable, "-m", "tuning.search", "--dataset", "cifar10", "--tuner", "random",
               "--max-trials", "3", "--max-epochs", "4", "--patience", "10", "--data-dir", str(data_dir),
               "--search-name", "resumable"]
    client = mlflow.MlflowClient()
    process = subprocess.Popen(command, cwd=PROJECT_ROOT, env=python_env(),
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 240
        while time.time() < deadline:  # kill once trial 0 has finished and a later trial is mid-training
            runs = search_runs(client, search_role="trial")
            finished = [r for r in runs if r.info.status == "FINISHED"]
            running = [r for r in runs if r.info.status == "RUNNING"]
            if finished and running and client.get_metric_history(running[0].info.run_id, "loss"):
                break
            assert process.poll() is None, "the search ended before it could be killed"
            time.sleep(0.5)
        else:
            pytest.fail("no trial was mid-training within 240 s")
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()

    finished_before = {r.data.tags["trial_id"]: r.info.run_id for r in finished}
    killed_id = running[0].info.run_id
    resumed = subprocess.run(command, cwd=PROJECT_ROOT, env=python_env(), capture_output=True, text=True,
                             timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "Reloading Tuner" in resumed.stdout + resumed.stderr

    runs = search_runs(client, search_role="trial")
    finished_after = [r for r in runs if r.info.status == "FINISHED"]
    ids = [r.data.tags["trial_id"] for r in finished_after]
    assert sorted(ids) == ["0", "1", "2"]  # every trial once, none repeated
    for trial_id, run_id in finished_before.items():  # finished trials kept their runs
        assert {r.data.tags["trial_id"]: r.info.run_id for r in finished_after}[trial_id] == run_id
    assert client.get_run(killed_id).info.status == "KILLED"
    assert all(r.info.status != "RUNNING" for r in search_runs(client))
    [parent] = search_runs(client, search_role="parent")
    assert parent.info.status == "FINISHED"
    assert len(search_runs(client, best="true")) == 1
    assert "search_space.json" in {f.path for f in client.list_artifacts(parent.info.run_id)}


@pytest.mark.slow
def test_distributed_chief_and_two_workers_log_every_trial_once(tmp_path, tiny_cifar, tracking_server):
    uri = tracking_server.uri
    env = {**python_env(), "MLFLOW_TRACKING_URI": uri}
    launched = subprocess.run(
        [sys.executable, "-m", "tuning.distributed", "--workers", "2", "--",
         "--dataset", "cifar10", "--tuner", "random", "--max-trials", "4", "--max-epochs", "1",
         "--data-dir", str(tiny_cifar), "--search-name", "spread"],
        cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, timeout=600,
    )
    assert launched.returncode == 0, launched.stderr[-3000:]
    client = mlflow.MlflowClient(uri)
    [parent] = search_runs(client, search_role="parent")
    assert parent.info.status == "FINISHED"
    trials = search_runs(client, search_role="trial")
    assert sorted(r.data.tags["trial_id"] for r in trials) == ["0", "1", "2", "3"]
    assert all(r.info.status == "FINISHED" for r in trials)
    assert all(r.data.tags["mlflow.parentRunId"] == parent.info.run_id for r in trials)
    assert {r.data.tags["tuner_id"] for r in trials} <= {"tuner0", "tuner1"}
    [best] = search_runs(client, best="true")
    assert best.data.tags["mlflow.parentRunId"] == parent.info.run_id
    assert (tmp_path / "tuner" / "spread" / "oracle.json").is_file()  # the shared state was kept


@pytest.mark.parametrize("argv, message", [
    (["--tuner", "grid"], "error: unknown tuner 'grid'; choose one of: hyperband, bayesian, random"),
    (["--max-trials", "0"], "error: max_trials must be at least 1, got 0"),
    (["--time-budget-minutes", "-5"], "error: time_budget_minutes must be 0 (no limit) or positive, got -5.0"),
])
def test_bad_search_arguments_fail_in_one_line_before_anything_runs(argv, message, capsys, tiny_cifar):
    assert main(["--dataset", "cifar10", "--data-dir", str(tiny_cifar), *argv]) == 2
    assert errors(capsys) == [message]
    assert not search_runs()


def test_a_search_name_of_another_dataset_is_refused(capsys, tiny_cifar):
    check_search_state(SearchConfig("imagenette", search_name="shared-name"))
    assert main(["--dataset", "cifar10", "--data-dir", str(tiny_cifar), "--tuner", "hyperband",
                 "--search-name", "shared-name"]) == 2
    assert errors(capsys) == ["error: search_name 'shared-name' holds a hyperband search on imagenette; use another "
                   "search_name, or tuner=hyperband dataset=imagenette to resume it"]
    assert not search_runs()
