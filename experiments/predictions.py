"""A run's per-image test predictions, `evaluation/predictions.npz`: what lets two runs scored on the same
test split be compared image by image (the promotion gate, registry/gate.py).

The file holds the test images' positions in the split (`indices`), their true classes (`labels`), the
predicted classes (`predicted`, from the float32 probabilities), the probabilities as float16 (enough
to rank and calibrate; 200 KB for CIFAR-10's 10,000 images at 10 classes) and the split's
`data_digest`. Runs on a different digest are never compared.
"""

from __future__ import annotations

import dataclasses
import tempfile
import zipfile
from pathlib import Path

import numpy as np

ARTIFACT = "evaluation/predictions.npz"


@dataclasses.dataclass(frozen=True)
class Predictions:
    indices: np.ndarray
    labels: np.ndarray
    predicted: np.ndarray
    probabilities: np.ndarray
    data_digest: str

    @property
    def correct(self) -> np.ndarray:
        return self.predicted == self.labels


def save(path: Path, labels: np.ndarray, probabilities: np.ndarray, data_digest: str) -> None:
    np.savez_compressed(path, indices=np.arange(len(labels), dtype=np.int32), labels=labels.astype(np.int32),
                        predicted=probabilities.argmax(axis=1).astype(np.int32),
                        probabilities=probabilities.astype(np.float16), data_digest=np.array(data_digest))


def read(path: Path) -> Predictions:
    """The file's predictions; ValueError if it is damaged or incomplete."""
    try:
        with np.load(path, allow_pickle=False) as stored:
            found = Predictions(stored["indices"], stored["labels"], stored["predicted"], stored["probabilities"],
                                str(stored["data_digest"]))
    except (OSError, EOFError, KeyError, zipfile.BadZipFile) as exc:
        raise ValueError(f"unreadable ({type(exc).__name__}: {exc})") from None
    count = len(found.indices)
    if not (len(found.labels) == len(found.predicted) == len(found.probabilities) == count):
        raise ValueError("its arrays have different lengths")
    return found


def log(labels: np.ndarray, probabilities: np.ndarray, data_digest: str) -> None:
    """Log the predictions to the active run."""
    import mlflow

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / Path(ARTIFACT).name
        save(path, labels, probabilities, data_digest)
        mlflow.log_artifact(str(path), str(Path(ARTIFACT).parent))


def load(run_id: str, data_digest: str) -> tuple[Predictions | None, str]:
    """(the run's predictions on the test split `data_digest`, "") or (None, why they cannot be used)."""
    import mlflow
    from mlflow.exceptions import MlflowException

    with tempfile.TemporaryDirectory() as tmp:
        try:
            path = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=ARTIFACT, dst_path=tmp)
        except (MlflowException, OSError):
            return None, f"run {run_id} has no {ARTIFACT} (logged before it existed?)"
        try:
            found = read(Path(path))
        except ValueError as exc:
            return None, f"run {run_id}'s {ARTIFACT} is {exc}"
    if found.data_digest != data_digest:
        return None, f"run {run_id}'s {ARTIFACT} is of test split {found.data_digest}, not {data_digest}"
    return found, ""
