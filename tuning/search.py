"""Keras Tuner searches, each one MLflow parent run with every trial a nested child run.

    python -m tuning.search --dataset cifar10 --tuner hyperband --max-epochs 10 --search-name cifar10-hb

Every trial trains through `experiments.train.train()` on the `convnet` architecture, scored on a
held-out part of the training split. After the search the best configuration is retrained on the
whole training split, evaluated on the test split and logged as a model in a child run tagged
`best=true`. Rerunning the same command with the same `search_name` resumes the search.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import os
import signal
import sys
import time

from experiments.cache import atomic_path
from experiments.cli import add_config_flags, run_main
from experiments.errors import UserError
from experiments.tracking import (
    DATASET_TAG,
    ROLE_BEST,
    ROLE_TRIAL,
    SEARCH_NAME_TAG,
    SEARCH_ROLE_TAG,
    TRIAL_ID_TAG,
    check_tracking_server,
    connect,
    start_run,
)
from experiments.train import TrainConfig, load_data, train
from tuning.spaces import choose, get_space, params_of, trial_params
from tuning.state import OBJECTIVE, TUNERS, tuner_dir
from tuning.tracking import Tracker, resolve_parent

# Keras and Keras Tuner (tuning.tuner) are imported where a search starts, so that `--help` and bad
# arguments answer at once, not after TensorFlow's import.


@dataclasses.dataclass
class SearchConfig:
    dataset: str
    tuner: str = "hyperband"
    max_trials: int = 20
    max_epochs: int = 10
    executions_per_trial: int = 1
    time_budget_minutes: float = 0.0  # 0: no limit
    search_name: str = ""  # default: <dataset>-<tuner>
    limit: int = 0  # cap on the training split for the trials; the best is retrained on all of it
    seed: int = 0
    data_dir: str = ""
    image_size: int = 128
    validation_fraction: float = 0.1  # of the training split, scores the trials
    patience: int = 3  # epochs without a better val_accuracy before a trial stops early
    retrain: bool = True  # retrain the best configuration on the full training split
    precision: str = "auto"  # as train()'s; auto is measured once per search, on the default convnet

    def __post_init__(self):
        self.search_name = self.search_name or f"{self.dataset}-{self.tuner}"

    def validate(self) -> None:
        if self.tuner not in TUNERS:
            raise UserError(f"unknown tuner {self.tuner!r}; choose one of: {', '.join(TUNERS)}")
        if self.max_trials < 1:
            raise UserError(f"max_trials must be at least 1, got {self.max_trials}")
        if self.max_epochs < 1:
            raise UserError(f"max_epochs must be at least 1, got {self.max_epochs}")
        if self.executions_per_trial < 1:
            raise UserError(f"executions_per_trial must be at least 1, got {self.executions_per_trial}")
        if self.time_budget_minutes < 0:
            raise UserError(f"time_budget_minutes must be 0 (no limit) or positive, got {self.time_budget_minutes}")
        if not self.search_name.replace("-", "").replace("_", "").replace(".", "").isalnum():
            raise UserError(f"search_name may hold letters, digits, '-', '_' and '.', got {self.search_name!r}")
        get_space(self.dataset)
        self.train_config(1).validate()

    def train_config(self, epochs: int, **choice) -> TrainConfig:
        return TrainConfig(
            dataset=self.dataset, arch="convnet", epochs=epochs, seed=self.seed, data_dir=self.data_dir,
            limit=self.limit, image_size=self.image_size, validation_fraction=self.validation_fraction,
            precision=self.precision, **choice,
        )


def check_fits(image_shape: tuple, config: SearchConfig) -> None:
    """Every block halves the image: the deepest architecture in the space must keep at least 1 pixel."""
    space = get_space(config.dataset)
    side = min(image_shape[:2])
    if side < 2 ** space.max_blocks:
        raise UserError(
            f"{side}x{side} images are too small for the {config.dataset} search space (up to {space.max_blocks} "
            f"pooling blocks need at least {2 ** space.max_blocks} pixels); use a larger image_size"
        )


def check_search_state(config: SearchConfig) -> None:
    """A search_name belongs to one dataset and tuner; reusing it for another is refused."""
    meta = tuner_dir() / config.search_name / "search.json"
    if meta.is_file():
        owner = json.loads(meta.read_text())
        for key in ("dataset", "tuner"):
            if owner[key] != getattr(config, key):
                raise UserError(
                    f"search_name {config.search_name!r} holds a {owner['tuner']} search on {owner['dataset']}; "
                    f"use another search_name, or tuner={owner['tuner']} dataset={owner['dataset']} to resume it"
                )
    else:
        with atomic_path(meta) as staging:  # workers starting together never read a half-written file
            staging.write_text(json.dumps({"dataset": config.dataset, "tuner": config.tuner}))


# --- The search --------------------------------------------------------------------------------------


def run_search(config: SearchConfig, callbacks=()):
    """Run (or resume) the search; returns the best trial's retrained TrainResult, or None.

    `callbacks`: extra Keras callbacks for every trial (for example TensorBoard); each trial gets a copy.
    """
    config.validate()
    check_tracking_server()
    data = load_data(config.train_config(1))  # once per process; trials reuse it
    check_fits(data.image_shape, config)
    check_search_state(config)
    from experiments.precision import for_training

    precision = for_training(config.train_config(1), data.spec)  # the trials' precision: measured once
    config = dataclasses.replace(config, precision=precision.precision)
    connect()
    role = os.environ.get("KERASTUNER_TUNER_ID", "")
    is_chief, is_worker = role == "chief", bool(role) and role != "chief"
    parent_id, owns_parent = resolve_parent(config, wait_seconds=300 if is_worker else 0)
    tracker = Tracker(config, parent_id)
    if not is_worker:
        log_search_params(tracker, config)
        tracker.client.set_tag(parent_id, "precision_reason", precision.reason)
    import keras
    import tensorflow as tf

    from tuning.tuner import Deadline, make_tuner

    tf.get_logger().setLevel("ERROR")  # every trial builds a new model: retracing warnings are expected
    started = time.time()
    tuner = make_tuner(config, None if is_chief else tracker)
    if not is_worker:
        tracker.log_search_space(tuner.oracle.hyperparameters)
        tracker.reconcile(tuner.oracle.trials, started)
    callbacks = [
        keras.callbacks.EarlyStopping(monitor=OBJECTIVE, mode="max", patience=config.patience),
        Deadline(tuner.search_state.deadline),
        *callbacks,
    ]
    status = "FAILED"
    try:
        tuner.search(epochs=config.max_epochs, callbacks=callbacks, verbose=0)
        if is_worker:
            status = "FINISHED"
            return None
        result = summarize(tuner, tracker, config)
        status = "FINISHED"
        return result
    except (KeyboardInterrupt, SystemExit):  # Ctrl-C, or SIGTERM (see main)
        status = "KILLED"
        raise
    finally:
        tracker.abandon_open_trials()
        if owns_parent and not is_worker:
            tracker.client.set_terminated(parent_id, status)


def log_search_params(tracker: Tracker, config: SearchConfig) -> None:
    """The search's settings on the parent; on resume only those not yet logged (params are immutable)."""
    logged = tracker.client.get_run(tracker.parent.info.run_id).data.params
    params = {k: v for k, v in dataclasses.asdict(config).items() if k not in logged}
    for key, value in params.items():
        tracker.client.log_param(tracker.parent.info.run_id, key, value)


def summarize(tuner, tracker: Tracker, config: SearchConfig):
    """Log the trials table, the plot and the best hyperparameters on the parent; retrain the best."""
    from tuning import report as reporting

    parent_id = tracker.parent.info.run_id
    oracle = tuner.oracle
    runs = {r.data.tags.get(TRIAL_ID_TAG): r for r in tracker.children(ROLE_TRIAL) if r.info.status == "FINISHED"}
    table = reporting.trials_table(list(oracle.trials.values()), runs, get_space(config.dataset))
    if table.empty:
        print("no trial finished; nothing to summarize", flush=True)
        return None
    buffer = io.StringIO()
    table.to_csv(buffer, index=False)
    tracker.client.log_text(parent_id, buffer.getvalue(), "trials.csv")
    figure = reporting.plot_scores(table)
    tracker.client.log_figure(parent_id, figure, "plots/score_by_trial.png")

    scored = table[table["status"] == "COMPLETED"].dropna(subset=["score"])
    if scored.empty:
        print("no trial completed with a score; nothing to retrain", flush=True)
        return None
    best_row = scored.sort_values(["score", "trial_id"], ascending=[False, True]).iloc[0]
    best_trial = oracle.trials[best_row["trial_id"]]
    values = {k: v for k, v in best_trial.hyperparameters.values.items() if not k.startswith("tuner/")}
    params = params_of(best_trial.hyperparameters, get_space(config.dataset))
    tracker.client.log_metric(parent_id, "best_score", float(best_row["score"]))
    # The tuner's raw values (they rebuild the point in Keras Tuner) and the flat params the trials log.
    tracker.client.log_dict(parent_id, {"trial_id": best_trial.trial_id, "score": float(best_row["score"]),
                                        "hyperparameters": values, "params": params}, "best_hyperparameters.json")
    for key, value in params.items():
        tracker.client.set_tag(parent_id, f"best.{key}", str(value))
    tracker.client.set_tag(parent_id, "best_trial_id", best_trial.trial_id)
    print(f"best trial {best_trial.trial_id}: {OBJECTIVE}={best_row['score']:.4f} {json.dumps(params)}", flush=True)
    if not config.retrain:
        return None
    # A trial Hyperband stopped short (a low bracket) tells which configuration, not how long:
    # retrain it for the full max_epochs. One that had them all stops at its best epoch.
    budget = int(best_trial.hyperparameters.values.get("tuner/epochs", config.max_epochs))
    epochs = int(best_row["best_epoch"]) if budget >= config.max_epochs else config.max_epochs
    return retrain_best(tracker, config, best_trial, epochs)


def retrain_best(tracker: Tracker, config: SearchConfig, trial, epochs: int):
    """Retrain the best configuration on the whole training split, evaluate on test, log the model."""
    import mlflow

    for run in tracker.children(ROLE_BEST):
        if run.data.tags.get(TRIAL_ID_TAG) == trial.trial_id and run.info.status == "FINISHED":
            print(f"best trial {trial.trial_id} already retrained in run {run.info.run_id}", flush=True)
            return None
    choice = choose(trial.hyperparameters.copy(), get_space(config.dataset))
    # The whole training split: `limit` only makes the trials cheaper.
    train_config = dataclasses.replace(config.train_config(epochs, **choice), validation_fraction=0.0, limit=0)
    tags = {
        "mlflow.parentRunId": tracker.parent.info.run_id,
        SEARCH_NAME_TAG: config.search_name,
        SEARCH_ROLE_TAG: ROLE_BEST,
        "best": "true",
        TRIAL_ID_TAG: trial.trial_id,
        "tuner": config.tuner,
        DATASET_TAG: config.dataset,
    }
    run = tracker.client.create_run(tracker.experiment_id, run_name=f"{config.search_name}-best", tags=tags)
    with start_run(run_id=run.info.run_id):  # system metrics as in every training run
        mlflow.log_params(trial_params(choice))  # the trials' keys; Hyperband's tuner/* say nothing here
        result = train(train_config)
    tracker.client.log_metric(tracker.parent.info.run_id, "best_test_accuracy", result.test_accuracy)
    return result


# --- Command line --------------------------------------------------------------------------------------


def parse_args(argv=None) -> SearchConfig:
    parser = argparse.ArgumentParser(prog="python -m tuning.search", description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", required=True)
    add_config_flags(parser, SearchConfig, skip=("dataset",))
    return SearchConfig(**vars(parser.parse_args(argv)))


def search_command(argv=None) -> None:
    """The command's body: run the search; Keras Tuner giving up on failing trials is a one-line error."""
    try:
        run_search(parse_args(argv))
    except RuntimeError as exc:
        if "consecutive failures" not in str(exc):
            raise
        # Keras Tuner gives up after repeated failed trials; each trial run holds its own traceback.
        raise UserError(f"the search stopped: {str(exc).strip().splitlines()[0]} "
                        "(see error.txt in the failed trial runs)", exit_code=1) from None


def main(argv=None) -> int:
    # SIGTERM unwinds like Ctrl-C, so open trial runs are closed as KILLED rather than left RUNNING.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    return run_main(lambda: search_command(argv))


if __name__ == "__main__":
    sys.exit(main())
