"""Where runs go, who owns them, what they are tagged, and which code made them.

Light (no Keras): every command's start-up imports it. The tag names and search roles that training,
tuning, promotion and the report write and read are defined here and nowhere else.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import subprocess
import sys
from pathlib import Path

from experiments.errors import UserError

PROJECT_ROOT = Path(__file__).resolve().parent.parent

# MLflow probes for Databricks' `dbruntime` on every request to a tracking server, from whichever
# thread sends it (system metrics, async metric logging): an import attempt that, under MLflow 3.17's
# import hooks, can deadlock with an import on the main thread (a training hung in CI). Where it is not
# installed, a None entry makes the probe fail at once, without the import machinery's locks. (Its
# `pyspark` probe cannot be silenced so: MLflow reads a None entry as Spark being loaded. evaluate.py
# keeps the main thread from importing while it holds MLflow's import-hook lock instead.)
if importlib.util.find_spec("dbruntime") is None:
    sys.modules.setdefault("dbruntime", None)

# Tags every training run carries, and the registry reads.
DATASET_TAG = "dataset"
ARCH_TAG = "arch"
DATA_DIGEST_TAG = "data_digest"
# A search is one parent run; its children are trials, the best configuration's retraining, and resumes.
SEARCH_NAME_TAG = "search_name"
SEARCH_ROLE_TAG = "search_role"
TRIAL_ID_TAG = "trial_id"
ROLE_PARENT, ROLE_TRIAL, ROLE_BEST, ROLE_RESUME = "parent", "trial", "best", "resume"
NOT_CANDIDATES = {ROLE_TRIAL, ROLE_PARENT, ROLE_RESUME}  # search runs that hold no test-scored model
# Without this tag MLflow 3's UI opens an experiment in its GenAI view; the value is the model-training
# view's, as the pinned MLflow's UI bundle spells it.
EXPERIMENT_KIND_TAG, EXPERIMENT_KIND = "mlflow.experimentKind", "custom_model_development"
# Yet that UI picks the view per browser, not from the tag (mlflow PR #20161): GenAI until the user
# picks "Model training" in its sidebar. A link can ask for the model-training view; ui_link() does.
MODEL_TRAINING_VIEW = "workflowType=machine_learning"
# MLflow's own switch for system metrics (CPU, memory, disk, network), which this project turns on
# unless it is set to false; sampled every SYSTEM_METRICS_INTERVAL seconds unless MLflow's
# MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL says otherwise (a short run still gets a few samples).
SYSTEM_METRICS_ENV, SYSTEM_METRICS_INTERVAL_ENV = "MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING", "MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL"
SYSTEM_METRICS_INTERVAL = 2


def default_tracking_uri() -> str:
    """The embedded store in the project root, unless MLFLOW_TRACKING_URI says otherwise."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{PROJECT_ROOT / 'mlflow.db'}"


def launched_run_id() -> str | None:
    """The run `mlflow run` created for this process (it owns the run and its experiment), or None."""
    return os.environ.get("MLFLOW_RUN_ID") or None


def connect() -> str:
    """Point MLflow at the project's store (or MLFLOW_TRACKING_URI); returns the URI."""
    import mlflow

    uri = default_tracking_uri()
    mlflow.set_tracking_uri(uri)
    return uri


def open_run(experiment: str, run_id: str | None = None):
    """The run to log into, as a context manager: the active run if there is one (a tuner trial, a
    caller's run), else `run_id`, else the run `mlflow run` launched, else a new run in `experiment`."""
    import mlflow

    if mlflow.active_run() is not None:
        return contextlib.nullcontext(mlflow.active_run())
    connect()
    if run_id or launched_run_id():  # a run to reopen, or `mlflow run`'s: their experiment is not ours to pick
        run = start_run(run_id=run_id or None)
        mark_experiment_kind(run.info.experiment_id)
        return run
    use_experiment(experiment)  # one per dataset (it marks the kind)
    return start_run()


def start_run(**kwargs):
    """mlflow.start_run with the run's system metrics on, unless switched off (see SYSTEM_METRICS_ENV)."""
    import mlflow

    enabled = system_metrics_enabled()
    if enabled and not os.environ.get(SYSTEM_METRICS_INTERVAL_ENV):
        mlflow.set_system_metrics_sampling_interval(SYSTEM_METRICS_INTERVAL)
    # Its start and stop are INFO lines at every run; its warnings still show.
    logging.getLogger("mlflow.system_metrics").setLevel(logging.WARNING)
    return mlflow.start_run(log_system_metrics=enabled, **kwargs)


def system_metrics_enabled() -> bool:
    """Whether runs log system metrics; a bad switch or interval is a UserError (checked before a run starts)."""
    value = os.environ.get(SYSTEM_METRICS_ENV, "true").strip().lower()
    if value not in ("true", "false"):
        raise UserError(f"{SYSTEM_METRICS_ENV} must be true or false, got {value!r}; "
                        "unset it to log system metrics, or set it to false to switch them off")
    interval = os.environ.get(SYSTEM_METRICS_INTERVAL_ENV)
    try:
        if interval and not float(interval) > 0:
            raise ValueError
    except ValueError:
        raise UserError(f"{SYSTEM_METRICS_INTERVAL_ENV} must be a number of seconds > 0, got {interval!r}") from None
    return value == "true"


def ui_link(ui_url: str, experiment_id: str, run_id: str | None = None) -> str:
    """A link into the MLflow UI that opens the experiment (or run) in the model-training view."""
    page = f"{ui_url.rstrip('/')}/#/experiments/{experiment_id}"
    return f"{page}/runs/{run_id}?{MODEL_TRAINING_VIEW}" if run_id else f"{page}?{MODEL_TRAINING_VIEW}"


def mark_experiment_kind(experiment_id: str) -> None:
    """Have the UI open the experiment in its model-training view, unless the user chose another kind."""
    import mlflow
    from mlflow.exceptions import MlflowException

    client = mlflow.MlflowClient()
    if EXPERIMENT_KIND_TAG in client.get_experiment(experiment_id).tags:
        return
    try:
        client.set_experiment_tag(experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
    except MlflowException:  # workers starting together: another one set it first
        if EXPERIMENT_KIND_TAG not in client.get_experiment(experiment_id).tags:
            raise


def check_tracking_server(uri: str = "") -> str:
    """A tracking server must answer before data is read or a run is created: MLflow itself would retry
    for about 4 minutes, then end in a traceback."""
    import urllib.error
    import urllib.request

    uri = uri or default_tracking_uri()
    if uri.startswith(("http://", "https://")):
        try:
            urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=10).close()
        except urllib.error.HTTPError:
            pass  # it answered (401 behind basic auth, say): reachable
        except OSError as exc:
            reason = getattr(exc, "reason", exc)
            reason = getattr(reason, "strerror", None) or reason
            raise UserError(f"tracking server {uri} is unreachable ({reason}); start it, "
                            "or unset MLFLOW_TRACKING_URI to use ./mlflow.db") from None
    return uri


def use_experiment(name: str) -> str:
    """`mlflow.set_experiment(name)` that survives a race: when several workers start at once, each may
    find no experiment and try to create it; the losers get RESOURCE_ALREADY_EXISTS and take the winner's.
    (set_experiment's own race path returns the winner's experiment without making it active, so the
    loser's run would land in Default: create first, then set.)"""
    import mlflow
    from mlflow.exceptions import MlflowException

    experiment = mlflow.get_experiment_by_name(name)
    if experiment is None:
        try:
            mlflow.create_experiment(name)
        except MlflowException as exc:
            if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
    experiment_id = mlflow.set_experiment(name).experiment_id
    mark_experiment_kind(experiment_id)
    return experiment_id


def git_state() -> dict:
    """The checkout's `git_commit` and `git_dirty` (tracked files changed), "unknown" without git."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=PROJECT_ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()

    try:
        return {"git_commit": git("rev-parse", "HEAD"),
                "git_dirty": str(bool(git("status", "--porcelain", "--untracked-files=no"))).lower()}
    except (OSError, subprocess.CalledProcessError):
        return {"git_commit": "unknown", "git_dirty": "unknown"}
