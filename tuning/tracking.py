"""A search's MLflow runs: the parent run, one child run per trial, and which experiment they live in."""

from __future__ import annotations

import os
import time
from typing import TYPE_CHECKING

from experiments.tracking import (
    DATASET_TAG,
    ROLE_PARENT,
    ROLE_RESUME,
    ROLE_TRIAL,
    SEARCH_NAME_TAG,
    SEARCH_ROLE_TAG,
    TRIAL_ID_TAG,
    launched_run_id,
    mark_experiment_kind,
    start_run,
    use_experiment,
)
from tuning.spaces import get_space, params_of

if TYPE_CHECKING:
    from tuning.search import SearchConfig

PARENT_RUN_ENV = "CNN_SEARCH_PARENT_RUN_ID"  # set by tuning.distributed for the chief and its workers
SEARCH_SPACE_ARTIFACT = "search_space.json"  # on the parent: the tuner's raw space, HyperParameters.get_config()
# Hyperband's bookkeeping in a trial's values: its epoch budget, where it starts, its bracket and round
# (all always set), and the trial whose model it trains on (set from round 1 on; "none" before).
HYPERBAND_PARAMS = ("tuner/epochs", "tuner/initial_epoch", "tuner/bracket", "tuner/round", "tuner/trial_id")


def tuner_params(values: dict, tuner: str) -> dict:
    """A trial's Keras Tuner bookkeeping as params: Hyperband's, the same keys in every one of its trials."""
    if tuner != "hyperband":
        return {}
    return {key: values.get(key, "none") for key in HYPERBAND_PARAMS}


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
        mark_experiment_kind(self.experiment_id)  # `mlflow run`'s experiment too
        self.runs: dict[str, str] = {}  # trial id -> child run id, for this process's trials

    def children(self, role: str | None = None) -> list:
        query = f"tags.mlflow.parentRunId = '{self.parent.info.run_id}'"
        if role:
            query += f" and tags.{SEARCH_ROLE_TAG} = '{role}'"
        return self.client.search_runs([self.experiment_id], query, max_results=10_000)

    def begin_trial(self, trial) -> None:
        import mlflow

        hp = trial.hyperparameters
        tags = {
            "mlflow.parentRunId": self.parent.info.run_id,
            SEARCH_NAME_TAG: self.config.search_name,
            SEARCH_ROLE_TAG: ROLE_TRIAL,
            TRIAL_ID_TAG: trial.trial_id,
            "tuner": self.config.tuner,
            "tuner_id": os.environ.get("KERASTUNER_TUNER_ID", "tuner0"),
            DATASET_TAG: self.config.dataset,
        }
        run = self.client.create_run(self.experiment_id, run_name=f"trial-{trial.trial_id}", tags=tags)
        self.runs[trial.trial_id] = run.info.run_id
        start_run(run_id=run.info.run_id)  # with system metrics, as every training run
        # Flat params, not hp.values: a conditional hyperparameter (adam_/sgd_learning_rate, block3_*) is set
        # only in the trials that use it, which leaves half-empty columns in MLflow's compare view.
        params = params_of(hp, get_space(self.config.dataset))
        mlflow.log_params({**params, **tuner_params(hp.values, self.config.tuner)})

    def log_search_space(self, hyperparameters) -> None:
        """The tuner's search space (names, ranges, conditions, defaults) on the parent, once: a resumed
        search reloads the same space, and one started before this artifact existed gets it now."""
        parent_id = self.parent.info.run_id
        if SEARCH_SPACE_ARTIFACT not in {f.path for f in self.client.list_artifacts(parent_id)}:
            self.client.log_dict(parent_id, hyperparameters.get_config(), SEARCH_SPACE_ARTIFACT)

    def end_trial(self, trial, score: float | None, best_epoch: int | None) -> None:
        import mlflow
        from keras_tuner.engine.trial import TrialStatus

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
        for run in self.children(ROLE_TRIAL):
            if run.info.status != "RUNNING" or run.info.start_time >= started_before * 1000:
                continue
            trial = completed.get(run.data.tags.get(TRIAL_ID_TAG))
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
            search_experiment_ids(client, config),
            f"tags.{SEARCH_NAME_TAG} = '{config.search_name}' and tags.{SEARCH_ROLE_TAG} = '{ROLE_PARENT}'",
            order_by=["attributes.start_time ASC"],
            max_results=1,
        )
        if existing or time.time() >= deadline:
            break
        time.sleep(2)
    launcher = launched_run_id()
    if existing:
        parent = existing[0].info.run_id
        if launcher and launcher != parent:
            # `mlflow run` made a new run for this resume: file it under the search as a record of the resume.
            client.set_tag(launcher, "mlflow.parentRunId", parent)
            client.set_tag(launcher, SEARCH_ROLE_TAG, ROLE_RESUME)
            client.set_tag(launcher, SEARCH_NAME_TAG, config.search_name)
        if client.get_run(parent).info.status != "RUNNING":
            client.update_run(parent, status="RUNNING")  # resumed: running again until this process ends it
        return parent, True
    if launcher:
        parent = launcher
    else:
        parent = client.create_run(search_experiment_ids(client, config)[0], run_name=config.search_name).info.run_id
    tags = {SEARCH_NAME_TAG: config.search_name, SEARCH_ROLE_TAG: ROLE_PARENT, DATASET_TAG: config.dataset,
            "tuner": config.tuner, "mlflow.runName": config.search_name,
            "mlflow.note.content": f"Keras Tuner `{config.tuner}` search of the `convnet` family on `{config.dataset}`: "
                                   f"trial 0 is the tutorial's `{get_space(config.dataset).tutorial_arch}`, each "
                                   "trial is a child run, and the best is retrained as the child tagged best=true."}
    for key, value in tags.items():
        client.set_tag(parent, key, value)
    return parent, not launcher


def search_experiment_ids(client, config: SearchConfig) -> list[str]:
    """`mlflow run`'s experiment, else one named after the dataset (as for training runs)."""
    if os.environ.get("MLFLOW_EXPERIMENT_ID"):
        return [os.environ["MLFLOW_EXPERIMENT_ID"]]
    if launched_run_id():
        return [client.get_run(launched_run_id()).info.experiment_id]
    return [use_experiment(config.dataset)]
