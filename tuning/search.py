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
from pathlib import Path

from experiments.cli import add_config_flags
from experiments.errors import UserError
from experiments.tracking import PROJECT_ROOT, check_tracking_server, default_tracking_uri, use_experiment
from experiments.train import TrainConfig, load_data, train
from tuning.spaces import choose, get_space

TUNERS = ("hyperband", "bayesian", "random")
OBJECTIVE = "val_accuracy"
PARENT_RUN_ENV = "CNN_SEARCH_PARENT_RUN_ID"  # set by tuning.distributed for the chief and its workers


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
            limit=self.limit, image_size=self.image_size, validation_fraction=self.validation_fraction, **choice,
        )


def tuner_dir() -> Path:
    """Where Keras Tuner keeps each search's state: <dir>/<search_name>/."""
    return Path(os.environ.get("CNN_TUNER_DIR") or PROJECT_ROOT / "tuner_state")


# --- MLflow runs -----------------------------------------------------------------------------------


class Tracker:
    """The search's parent run and one child run per trial, created and ended through the client.

    The parent run is never the process's active run, so workers on other machines can log children
    under it at the same time, and a crash never leaves the fluent run stack in a bad state.
    """

    def __init__(self, config: SearchConfig, parent_run_id: str):
        import mlflow

        self.config = config
        self.client = mlflow.MlflowClient()
        self.parent = self.client.get_run(parent_run_id)
        self.experiment_id = self.parent.info.experiment_id
        self.runs: dict[str, str] = {}  # trial id -> child run id, for this process's trials

    def children(self, role: str | None = None) -> list:
        query = f"tags.mlflow.parentRunId = '{self.parent.info.run_id}'"
        if role:
            query += f" and tags.search_role = '{role}'"
        return self.client.search_runs([self.experiment_id], query, max_results=10_000)

    def begin_trial(self, trial) -> None:
        import mlflow

        hp = trial.hyperparameters
        tags = {
            "mlflow.parentRunId": self.parent.info.run_id,
            "search_name": self.config.search_name,
            "search_role": "trial",
            "trial_id": trial.trial_id,
            "tuner": self.config.tuner,
            "tuner_id": os.environ.get("KERASTUNER_TUNER_ID", "tuner0"),
            "dataset": self.config.dataset,
        }
        run = self.client.create_run(self.experiment_id, run_name=f"trial-{trial.trial_id}", tags=tags)
        self.runs[trial.trial_id] = run.info.run_id
        mlflow.start_run(run_id=run.info.run_id)
        mlflow.log_params({name: value for name, value in hp.values.items()})

    def end_trial(self, trial, score: float | None, best_epoch: int | None) -> None:
        import mlflow

        from keras_tuner.src.engine.trial import TrialStatus

        if trial.trial_id not in self.runs:
            return
        if trial.status == TrialStatus.COMPLETED and score is not None:
            mlflow.log_metrics({"score": score, "best_epoch": best_epoch})
            status = "FINISHED"
        else:
            message = trial.message or "the trial ended without a score"
            mlflow.log_text(message, "error.txt")
            mlflow.set_tag("error", message.strip().splitlines()[-1][:500])
            status = "FAILED"
        mlflow.end_run(status)
        del self.runs[trial.trial_id]

    def abandon_open_trials(self) -> None:
        """End this process's open trial runs as KILLED (a stop signal, a fatal error)."""
        import mlflow

        for run_id in list(self.runs.values()):
            self.client.set_tag(run_id, "error", "the search process stopped during this trial")
            self.client.set_terminated(run_id, "KILLED")
        self.runs.clear()
        while mlflow.active_run():
            mlflow.end_run("KILLED")

    def reconcile(self, completed: dict[str, object], started_before: float) -> None:
        """Runs a killed search left RUNNING: FINISHED if Keras Tuner recorded the trial, else KILLED.

        Only runs older than this process are touched, so live workers' trials are left alone.
        """
        for run in self.children("trial"):
            if run.info.status != "RUNNING" or run.info.start_time >= started_before * 1000:
                continue
            trial = completed.get(run.data.tags.get("trial_id"))
            if trial is not None and trial.score is not None:
                self.client.log_metric(run.info.run_id, "score", trial.score)
                self.client.set_terminated(run.info.run_id, "FINISHED")
            else:
                self.client.set_tag(run.info.run_id, "error", "interrupted (process killed); the trial is retried")
                self.client.set_terminated(run.info.run_id, "KILLED")


def resolve_parent(config: SearchConfig, wait_seconds: float = 0) -> tuple[str, bool]:
    """The search's parent run id, and whether this process owns (and must end) it.

    Order: the id the distributed launcher passed; the existing parent of this search_name (resume);
    the `mlflow run` run this process runs in; a new run. Workers wait for the chief's parent.
    """
    import mlflow

    client = mlflow.MlflowClient()
    if os.environ.get(PARENT_RUN_ENV):
        return os.environ[PARENT_RUN_ENV], False
    deadline = time.time() + wait_seconds
    while True:
        existing = client.search_runs(
            _experiment_ids(client, config),
            f"tags.search_name = '{config.search_name}' and tags.search_role = 'parent'",
            order_by=["attributes.start_time ASC"],
            max_results=1,
        )
        if existing or time.time() >= deadline:
            break
        time.sleep(2)
    launcher = os.environ.get("MLFLOW_RUN_ID")
    if existing:
        parent = existing[0].info.run_id
        if launcher and launcher != parent:
            # `mlflow run` made a new run for this resume: file it under the search as a record of the resume.
            client.set_tag(launcher, "mlflow.parentRunId", parent)
            client.set_tag(launcher, "search_role", "resume")
            client.set_tag(launcher, "search_name", config.search_name)
        if client.get_run(parent).info.status != "RUNNING":
            client.update_run(parent, status="RUNNING")  # resumed: running again until this process ends it
        return parent, True
    if launcher:
        parent = launcher
    else:
        parent = client.create_run(_experiment_ids(client, config)[0], run_name=config.search_name).info.run_id
    tags = {"search_name": config.search_name, "search_role": "parent", "dataset": config.dataset,
            "tuner": config.tuner, "mlflow.runName": config.search_name,
            "mlflow.note.content": f"Keras Tuner `{config.tuner}` search of the `convnet` family on `{config.dataset}`: "
                                   f"trial 0 is the tutorial's `{get_space(config.dataset).tutorial_arch}`, each "
                                   "trial is a child run, and the best is retrained as the child tagged best=true."}
    for key, value in tags.items():
        client.set_tag(parent, key, value)
    return parent, not launcher


def _experiment_ids(client, config: SearchConfig) -> list[str]:
    """`mlflow run`'s experiment, else one named after the dataset (as for training runs)."""
    if os.environ.get("MLFLOW_EXPERIMENT_ID"):
        return [os.environ["MLFLOW_EXPERIMENT_ID"]]
    if os.environ.get("MLFLOW_RUN_ID"):
        return [client.get_run(os.environ["MLFLOW_RUN_ID"]).info.experiment_id]
    return [use_experiment(config.dataset)]


# --- Keras Tuner -----------------------------------------------------------------------------------


def make_tuner(config: SearchConfig, tracker: Tracker | None):
    """A Keras Tuner of the chosen kind, whose hooks log to `tracker` and whose trials call train()."""
    import keras
    import keras_tuner as kt

    class HyperModel(kt.HyperModel):
        def __init__(self):
            super().__init__(name=f"{config.dataset}-convnet")
            self.executions: dict[str, int] = {}

        def build(self, hp):
            from experiments.models import DataSpec, create_model

            data = load_data(config.train_config(1))
            spec = DataSpec(data.image_shape, data.num_classes, data.hflip)
            return create_model("convnet", spec, **choose(hp, get_space(config.dataset))["options"])

        def fit(self, hp, model, *args, epochs=1, initial_epoch=0, callbacks=(), **kwargs):
            trial_id = tuner.current_trial.trial_id
            execution = self.executions[trial_id] = self.executions.get(trial_id, -1) + 1
            train_config = config.train_config(epochs, **choose(hp, get_space(config.dataset)))
            # Each execution of a trial is a fresh seed, else repeats would be identical.
            train_config.seed = config.seed + execution
            result = train(train_config, model=model, callbacks=callbacks, initial_epoch=initial_epoch,
                           evaluate=False)
            scores = result.history[OBJECTIVE]
            best = max(range(len(scores)), key=scores.__getitem__)
            tuner.results.setdefault(trial_id, []).append((scores[best], initial_epoch + best + 1))
            history = keras.callbacks.History()
            history.history = result.history
            return history

    class Deadline(keras.callbacks.Callback):
        """Stops a trial after the epoch in which the search's time budget runs out."""

        def __init__(self, deadline: float):
            super().__init__()
            self.deadline = deadline

        def on_epoch_end(self, epoch, logs=None):
            if self.deadline and time.time() > self.deadline:
                self.model.stop_training = True

    base = {"hyperband": kt.Hyperband, "bayesian": kt.BayesianOptimization, "random": kt.RandomSearch}[config.tuner]
    oracle_base = {"hyperband": kt.oracles.HyperbandOracle, "bayesian": kt.oracles.BayesianOptimizationOracle,
                   "random": kt.oracles.RandomSearchOracle}[config.tuner]

    class Oracle(oracle_base):
        """Runs the tutorial's point first, then its one-change steps; stops handing out trials at
        max_trials or the deadline."""

        deadline = 0.0

        def _random_values(self):
            steps = get_space(config.dataset).steps
            if len(self.trials) <= len(steps):
                import keras_tuner as kt

                # Every hyperparameter at its (tutorial) default, but for this trial's one change.
                step = steps[len(self.trials) - 1] if self.trials else {}
                hps = kt.HyperParameters()
                for hp in self.hyperparameters.space:
                    hps.merge([hp])
                    if hps.is_active(hp):
                        hps.values[hp.name] = step.get(hp.name, hp.default)
                return hps.values
            return super()._random_values()

        def create_trial(self, tuner_id):
            if self.deadline and time.time() > self.deadline and tuner_id not in self.ongoing_trials:
                from keras_tuner.src.engine.trial import Trial, TrialStatus

                self.tuner_ids.discard(tuner_id)
                return Trial(self.hyperparameters.copy(), status=TrialStatus.STOPPED)
            return super().create_trial(tuner_id)

    class Tuner(base):
        def __init__(self, oracle, **kwargs):
            # The tuner classes build their own oracle; ours wraps it, so skip to the common base.
            kt.Tuner.__init__(self, oracle=oracle, **kwargs)

        def on_trial_begin(self, trial):
            self.current_trial = trial
            super().on_trial_begin(trial)
            if tracker:
                tracker.begin_trial(trial)

        def on_trial_end(self, trial):
            # Keras Tuner records the result first: a kill between the two steps is repaired on resume
            # (Tracker.reconcile) without rerunning the trial.
            runs = self.results.pop(trial.trial_id, [])
            score = sum(s for s, _ in runs) / len(runs) if runs else None
            best_epoch = max(runs)[1] if runs else None
            try:
                super().on_trial_end(trial)
            finally:
                if tracker:
                    tracker.end_trial(trial, score, best_epoch)
            report(self, trial, score)

    oracle_args = {"objective": kt.Objective(OBJECTIVE, "max"), "seed": config.seed}
    if config.tuner == "hyperband":
        oracle = Oracle(max_epochs=config.max_epochs, factor=3, **oracle_args)
    else:
        oracle = Oracle(max_trials=config.max_trials, **oracle_args)
    tuner = Tuner(
        hypermodel=HyperModel(),
        oracle=oracle,
        executions_per_trial=config.executions_per_trial,
        directory=str(tuner_dir()),
        project_name=config.search_name,
        overwrite=False,  # never wipe: resume, and workers share this directory
    )
    tuner.results = {}
    tuner.started = time.time()
    tuner.search_config = config
    # Keras Tuner does not save these in its state; they are this invocation's budget.
    oracle = getattr(tuner.oracle, "_oracle", tuner.oracle)  # a worker's OracleClient wraps the local one
    oracle.max_trials = config.max_trials
    if config.time_budget_minutes:
        oracle.deadline = tuner.started + 60 * config.time_budget_minutes
    tuner.deadline_callback = Deadline(oracle.deadline)
    return tuner


def check_fits(image_shape: tuple, config: SearchConfig) -> None:
    """Every block halves the image: the deepest architecture in the space must keep at least 1 pixel."""
    space = get_space(config.dataset)
    side = min(image_shape[:2])
    if side < 2 ** space.max_blocks:
        raise UserError(
            f"{side}x{side} images are too small for the {config.dataset} search space (up to {space.max_blocks} "
            f"pooling blocks need at least {2 ** space.max_blocks} pixels); use a larger image_size"
        )


def report(tuner, trial, score) -> None:
    """One progress line per trial: n of N, hyperparameters, score, best so far, elapsed."""
    oracle = tuner.oracle
    done = [t for t in getattr(oracle, "trials", {}).values() if t.score is not None]
    best = max([t.score for t in done] + ([score] if score is not None else []), default=None)
    values = {k: v for k, v in trial.hyperparameters.values.items() if not k.startswith("tuner/")}
    score_text = f"{score:.4f}" if score is not None else f"none ({trial.status})"
    best_text = f"{best:.4f}" if best is not None else "none"
    print(
        f"trial {int(trial.trial_id) + 1} of {tuner.search_config.max_trials}: {OBJECTIVE}={score_text} "
        f"best={best_text} elapsed={time.time() - tuner.started:.0f}s {json.dumps(values)}",
        flush=True,
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
        meta.parent.mkdir(parents=True, exist_ok=True)
        tmp = meta.with_suffix(".partial")
        tmp.write_text(json.dumps({"dataset": config.dataset, "tuner": config.tuner}))
        os.replace(tmp, meta)


# --- The search --------------------------------------------------------------------------------------


def run_search(config: SearchConfig, callbacks=()):
    """Run (or resume) the search; returns the best trial's retrained TrainResult, or None.

    `callbacks`: extra Keras callbacks for every trial (for example TensorBoard); each trial gets a copy.
    """
    import mlflow

    config.validate()
    check_tracking_server()
    data = load_data(config.train_config(1))  # once per process; trials reuse it
    check_fits(data.image_shape, config)
    check_search_state(config)
    mlflow.set_tracking_uri(default_tracking_uri())
    role = os.environ.get("KERASTUNER_TUNER_ID", "")
    is_chief, is_worker = role == "chief", bool(role) and role != "chief"
    parent_id, owns_parent = resolve_parent(config, wait_seconds=300 if is_worker else 0)
    tracker = Tracker(config, parent_id)
    if not is_worker:
        _log_search_params(tracker, config)
    started = time.time()
    tuner = make_tuner(config, None if is_chief else tracker)
    if not is_worker:
        tracker.reconcile(tuner.oracle.trials, started)

    import keras

    callbacks = [
        keras.callbacks.EarlyStopping(monitor=OBJECTIVE, mode="max", patience=config.patience),
        tuner.deadline_callback,
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


def _log_search_params(tracker: Tracker, config: SearchConfig) -> None:
    """The search's settings on the parent; on resume only those not yet logged (params are immutable)."""
    logged = tracker.client.get_run(tracker.parent.info.run_id).data.params
    params = {k: v for k, v in dataclasses.asdict(config).items() if k not in logged}
    for key, value in params.items():
        tracker.client.log_param(tracker.parent.info.run_id, key, value)


def summarize(tuner, tracker: Tracker, config: SearchConfig):
    """Log the trials table, the plot and the best hyperparameters on the parent; retrain the best."""
    import mlflow

    from tuning import report as reporting

    parent_id = tracker.parent.info.run_id
    oracle = tuner.oracle
    runs = {r.data.tags.get("trial_id"): r for r in tracker.children("trial") if r.info.status == "FINISHED"}
    table = reporting.trials_table(list(oracle.trials.values()), runs)
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
    tracker.client.log_metric(parent_id, "best_score", float(best_row["score"]))
    tracker.client.log_dict(parent_id, {"trial_id": best_trial.trial_id, "score": float(best_row["score"]),
                                        "hyperparameters": values}, "best_hyperparameters.json")
    for key, value in values.items():
        tracker.client.set_tag(parent_id, f"best.{key}", str(value))
    tracker.client.set_tag(parent_id, "best_trial_id", best_trial.trial_id)
    print(f"best trial {best_trial.trial_id}: {OBJECTIVE}={best_row['score']:.4f} {json.dumps(values)}", flush=True)
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

    for run in tracker.children("best"):
        if run.data.tags.get("trial_id") == trial.trial_id and run.info.status == "FINISHED":
            print(f"best trial {trial.trial_id} already retrained in run {run.info.run_id}", flush=True)
            return None
    choice = choose(trial.hyperparameters.copy(), get_space(config.dataset))
    # The whole training split: `limit` only makes the trials cheaper.
    train_config = dataclasses.replace(config.train_config(epochs, **choice), validation_fraction=0.0, limit=0)
    tags = {
        "mlflow.parentRunId": tracker.parent.info.run_id,
        "search_name": config.search_name,
        "search_role": "best",
        "best": "true",
        "trial_id": trial.trial_id,
        "tuner": config.tuner,
        "dataset": config.dataset,
    }
    run = tracker.client.create_run(tracker.experiment_id, run_name=f"{config.search_name}-best", tags=tags)
    with mlflow.start_run(run_id=run.info.run_id):
        mlflow.log_params({k: v for k, v in trial.hyperparameters.values.items() if not k.startswith("tuner/")})
        result = train(train_config)
    tracker.client.log_metric(tracker.parent.info.run_id, "best_test_accuracy", result.test_accuracy)
    return result


# --- Command line --------------------------------------------------------------------------------------


def parse_args(argv=None) -> SearchConfig:
    parser = argparse.ArgumentParser(prog="python -m tuning.search", description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", required=True)
    add_config_flags(parser, SearchConfig, skip=("dataset",))
    return SearchConfig(**vars(parser.parse_args(argv)))


def main(argv=None) -> int:
    # SIGTERM unwinds like Ctrl-C, so open trial runs are closed as KILLED rather than left RUNNING.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    import tensorflow as tf

    tf.get_logger().setLevel("ERROR")  # every trial builds a new model: retracing warnings are expected
    try:
        run_search(parse_args(argv))
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except RuntimeError as exc:
        if "consecutive failures" not in str(exc):
            raise
        # Keras Tuner gives up after repeated failed trials; each trial run holds its own traceback.
        print(f"error: the search stopped: {str(exc).strip().splitlines()[0]} "
              "(see error.txt in the failed trial runs)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
