"""Per-epoch checkpoints: a killed training run continues from its last finished epoch, in the same MLflow run.

Each finished epoch is one folder, `<cache>/checkpoints/<run_id>/epoch-NNNN/`, holding the model with its
optimizer state (`model.keras`) and `state.json` (the config key and every epoch's metrics so far). It is
written under a staging name and renamed into place, so a kill leaves whole epochs only.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
from pathlib import Path

from experiments.cache import cache_dir
from experiments.errors import UserError

PREFIX = "epoch-"


def root() -> Path:
    return cache_dir() / "checkpoints"


def config_key(config) -> str:
    """What must match for a checkpoint to continue a run: every training setting."""
    text = json.dumps(dataclasses.asdict(config), sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclasses.dataclass
class Checkpoint:
    run_id: str
    epoch: int  # epochs finished: training continues at this (0-based) epoch
    history: dict  # metric -> [value per finished epoch]
    folder: Path
    config_key: str  # the settings it was trained with (see config_key())

    def load_model(self):
        return load_keras(self.folder / "model.keras")


def load_keras(path: Path):
    """A model saved by Keras, with its optimizer state and the project's own layers."""
    import keras

    from experiments.models import AlternatingFlip, EpochGatedBias, FastBatchNorm, RandomShift

    custom = {layer.__name__: layer for layer in (FastBatchNorm, AlternatingFlip, RandomShift, EpochGatedBias)}
    return keras.models.load_model(path, safe_mode=True, custom_objects=custom)


def throwaway_save(model, load: bool = False):
    """Save `model` into a temporary folder, deleted after; with `load`, the copy loaded back (else None).
    Under MultiWorkerMirroredStrategy saving is a collective op: every worker saves when the chief does."""
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        model.save(Path(folder) / "model.keras")
        return load_keras(Path(folder) / "model.keras") if load else None


def latest(run_folder: Path) -> Checkpoint | None:
    """The last whole epoch saved for a run (staging folders of a killed save are ignored)."""
    epochs = sorted(p for p in run_folder.glob(f"{PREFIX}*") if p.name[len(PREFIX):].isdigit())
    if not epochs:
        return None
    state = json.loads((epochs[-1] / "state.json").read_text())
    return Checkpoint(run_folder.name, state["epoch"], state["history"], epochs[-1], state["config_key"])


def find(config, active_run_id: str | None, resume: bool) -> Checkpoint | None:
    """The checkpoint this training continues, or None to start afresh.

    In a run that has a checkpoint (`mlflow run --run-id <id>` after a kill), training continues
    automatically. Outside any run, `resume=True` picks the newest checkpoint of the same settings.
    """
    key = config_key(config)
    if active_run_id:
        checkpoint = latest(root() / active_run_id)
        if checkpoint and checkpoint.config_key != key:
            raise UserError(f"run {active_run_id} has a checkpoint of different settings; rerun it with the settings "
                            f"it started with, or start a new run")
        if checkpoint is None and resume:
            stopped = _newest_with_key(key)
            if stopped:
                raise UserError(f"this is a new run; to continue run {stopped.run_id} (stopped after epoch "
                                f"{stopped.epoch}), rerun with `mlflow run ... --run-id {stopped.run_id}`")
        return checkpoint
    if not resume:
        return None
    checkpoint = _newest_with_key(key)
    if checkpoint is None:
        print("resume: no checkpoint of these settings; starting a new run", flush=True)
    return checkpoint


def _newest_with_key(key: str) -> Checkpoint | None:
    found = [c for c in (latest(p) for p in root().glob("*") if p.is_dir()) if c and c.config_key == key]
    return max(found, key=lambda c: (c.folder / "state.json").stat().st_mtime, default=None)


def remove(run_id: str) -> None:
    """A finished run's checkpoints are spent: its model is logged in MLflow."""
    shutil.rmtree(root() / run_id, ignore_errors=True)


def callback(run_id: str | None, config, history: dict | None = None):
    """A Keras callback that saves each finished epoch; it must run before MLflow logs the epoch.

    run_id None: a multi-worker training's other workers, whose saves are thrown away (`throwaway_save`).
    """
    import keras

    key = config_key(config)

    class EpochCheckpoint(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.history = {k: list(v) for k, v in (history or {}).items()}

        def on_epoch_end(self, epoch, logs=None):
            if run_id is None:
                throwaway_save(self.model)
                return
            for name, value in (logs or {}).items():
                self.history.setdefault(name, []).append(float(value))
            folder = root() / run_id
            staging = folder / f".staging-{epoch + 1:04d}-{os.getpid()}"
            target = folder / f"{PREFIX}{epoch + 1:04d}"
            try:
                shutil.rmtree(staging, ignore_errors=True)
                staging.mkdir(parents=True)
                self.model.save(staging / "model.keras")
                state = {"run_id": run_id, "config_key": key, "epoch": epoch + 1, "history": self.history}
                (staging / "state.json").write_text(json.dumps(state))
                shutil.rmtree(target, ignore_errors=True)
                os.replace(staging, target)  # the epoch appears whole or not at all
            except OSError as exc:  # a full disk costs the checkpoint, not the training
                shutil.rmtree(staging, ignore_errors=True)
                print(f"epoch {epoch + 1} not checkpointed ({exc.strerror or exc}); free space in {folder} "
                      "to make this run resumable", flush=True)
                return
            for older in folder.glob(f"{PREFIX}*"):
                if older != target:
                    shutil.rmtree(older, ignore_errors=True)

    return EpochCheckpoint()


def log_missing_epochs(checkpoint: Checkpoint) -> int:
    """Log the checkpointed epochs' metrics the run lacks (a kill can come between the save and the log)."""
    import mlflow

    client = mlflow.MlflowClient()
    logged = 0
    for name, values in checkpoint.history.items():
        steps = {m.step for m in client.get_metric_history(checkpoint.run_id, name)}
        for step, value in enumerate(values[: checkpoint.epoch]):
            if step not in steps:
                mlflow.log_metric(name, value, step=step)
                logged += 1
    return logged
