"""What every part of a search agrees on without TensorFlow: the tuner kinds, the objective, and where Keras
Tuner keeps each search's state. `python -m tuning.search --help` and the argument checks need only these."""

from __future__ import annotations

import os
from pathlib import Path

from experiments.tracking import PROJECT_ROOT

TUNERS = ("hyperband", "bayesian", "random")  # tuning.tuner.KINDS builds each
OBJECTIVE = "val_accuracy"


def tuner_dir() -> Path:
    """Where Keras Tuner keeps each search's state: <dir>/<search_name>/."""
    return Path(os.environ.get("CNN_TUNER_DIR") or PROJECT_ROOT / "tuner_state")
