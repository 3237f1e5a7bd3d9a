"""The experiments package: datasets, models, the one training path and its MLflow record."""

import os

# TensorFlow's C++ INFO lines (oneDNN notes, "Could not find cuda drivers", CPU instruction sets) say
# nothing a user can act on; its warnings and errors still show. A user's own setting wins.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")
