"""Full-length named runs, each one `mlflow run` exactly as a user types it, timed.

    python -m benchmarks run seed_runs names=mnist_mlp,cifar10_cnn_deep data_dir=../shared/data
    python -m benchmarks run tuning_runs names=cifar10_hyperband data_dir=../shared/data

A named run is `mlflow run . --env-manager local --experiment-name <experiment> <its args>`, started
from the project root with `data_dir` as CNN_DATA_DIR (how the shell scripts these replace took it),
so what is timed is the whole `mlflow run`: environment start, decoding the images, training with
tracking on, evaluation, plots and model logging. One table row per named run: its wall seconds, the
`test_accuracy=` it printed (searches: also the `best trial` line's score), its exit code and the
MLflow run it made; its full output is an artifact (`output/<name>.out`) of the benchmark's run.
The overrides (0: as named) shrink a run for a smoke test: each replaces or adds one `-P key=value`.
"""

from __future__ import annotations

import math
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.harness import PROJECT_ROOT, benchmark
from experiments.errors import UserError

SEED_EXPERIMENT = "benchmarks-seed"
# The tutorial's experiments and the stronger CNN.
SEED_RUNS = {
    "mnist_mlp": "-e mnist -P arch=mlp",
    "mnist_cnn_simple": "-e mnist -P arch=cnn_simple",
    "fashion_mnist_cnn_simple": "-e fashion_mnist -P arch=cnn_simple",
    "cifar10_cnn_deep": "-e cifar10 -P arch=cnn_deep",
    "cifar10_cnn_modern": "-e cifar10 -P arch=cnn_modern -P epochs=30 -P learning_rate=0.002",
    "imagenette_cnn_basic": "-e imagenette -P arch=cnn_basic -P image_size=128",
}
SEED_DEFAULT = ("cifar10_cnn_modern,cifar10_cnn_deep,mnist_mlp,mnist_cnn_simple,fashion_mnist_cnn_simple,"
                "imagenette_cnn_basic")

TUNING_EXPERIMENT = "benchmarks-tuning"
# Full-size Keras Tuner searches on the shared data.
TUNING_RUNS = {
    # Trials on a 10k stratified slice of the training split (9k train / 1k validation), the best
    # retrained on all 50k images and scored on the 10k test images.
    "cifar10_hyperband": "-e tune_cifar10 -P tuner=hyperband -P max_epochs=10 -P limit=10000 "
                         "-P time_budget_minutes=30 -P search_name=bench-cifar10-hyperband",
    # Imagenette at the tutorial's 128 px (cnn_basic: 72.54% in 10 epochs): a 6k slice (5.4k / 600),
    # an hour of search, the best retrained on all 9,469 images and scored on the 3,925 val images.
    # The same comparison with full 10-epoch trials (Hyperband's 2-epoch first round favoured fast
    # starters that overfit by epoch 10), block 1 kept to one conv for cost.
    "imagenette_bayesian": "-e tune_imagenette -P tuner=bayesian -P max_trials=12 -P max_epochs=10 -P limit=6000 "
                           "-P image_size=128 -P time_budget_minutes=75 -P search_name=bench-imagenette-bayes",
    # The tutorial's point and its one-change steps (tuning/spaces.py), 10 epochs each. Run first with
    # max_trials=4 (the three modern changes), then resumed with 8 for the four faster-learning ones.
    "imagenette_steps": "-e tune_imagenette -P tuner=bayesian -P max_trials=8 -P max_epochs=10 -P limit=6000 "
                        "-P image_size=128 -P time_budget_minutes=60 -P search_name=bench-imagenette-steps",
    "imagenette_hyperband": "-e tune_imagenette -P tuner=hyperband -P max_epochs=10 -P limit=6000 "
                            "-P image_size=128 -P time_budget_minutes=60 -P search_name=bench-imagenette-128",
}
TUNING_DEFAULT = "cifar10_hyperband,imagenette_hyperband"

TEST_ACCURACY = re.compile(r"^test_accuracy=(\S+)(?:.*\brun_id=(\w+))?", re.M)
BEST_TRIAL = re.compile(r"^best trial \S+: \w+=(\S+)", re.M)
MLFLOW_RUN = re.compile(r"=== Run \(ID '(\w+)'\)")


def choose(table: dict, names: str) -> list[str]:
    """Comma-separated names -> a list; any name not in `table` is a UserError (nothing has run yet)."""
    chosen = [n for n in re.split(r"[,\s]+", names) if n]
    unknown = [n for n in chosen if n not in table]
    if unknown or not chosen:
        raise UserError(f"unknown run {', '.join(map(repr, unknown)) or '(none given)'}; "
                        f"choose from: {', '.join(table)}")
    return chosen


def with_overrides(args: str, overrides: dict) -> list[str]:
    """A named run's args with each non-zero override as `-P key=value`, in place of its own value."""
    tokens = shlex.split(args)
    for key, value in overrides.items():
        if not value:
            continue
        pair = f"{key}={value}"
        at = [i for i in range(1, len(tokens)) if tokens[i - 1] == "-P" and tokens[i].startswith(f"{key}=")]
        if at:
            tokens[at[0]] = pair
        else:
            tokens += ["-P", pair]
    return tokens


def mlflow_run_args(experiment: str, args: list[str]) -> list[str]:
    """What the user types after `mlflow`."""
    return ["run", ".", "--env-manager", "local", "--experiment-name", experiment, *args]


def last_float(pattern: re.Pattern, text: str) -> float:
    """The number the last match of `pattern` captured first, or NaN (the run printed none)."""
    found = pattern.findall(text)
    if not found:
        return math.nan
    value = found[-1][0] if isinstance(found[-1], tuple) else found[-1]
    try:
        return float(value)
    except ValueError:
        return math.nan


def run_one(name: str, experiment: str, args: list[str], data_dir: str) -> tuple[dict, str]:
    """Run and time one `mlflow run`, its output streamed through; returns its row and its output."""
    from mlflow.environment_variables import MLFLOW_EXPERIMENT_ID, MLFLOW_EXPERIMENT_NAME, MLFLOW_RUN_ID

    # As from a shell: not in this process's experiment or run (set_experiment exports its id; the
    # command names its own experiment), and this interpreter's bin first, so that `mlflow` and the
    # `python` its entry points call are this one.
    unset = {MLFLOW_EXPERIMENT_ID.name, MLFLOW_EXPERIMENT_NAME.name, MLFLOW_RUN_ID.name}
    env = {k: v for k, v in os.environ.items() if k not in unset}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    if data_dir:
        env["CNN_DATA_DIR"] = data_dir
    print(f"\n== {name}: mlflow {shlex.join(mlflow_run_args(experiment, args))}", flush=True)
    lines = []
    start = time.perf_counter()
    with subprocess.Popen([sys.executable, "-m", "mlflow", *mlflow_run_args(experiment, args)], cwd=PROJECT_ROOT,
                          env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as process:
        for line in process.stdout:
            sys.stdout.write(line)
            lines.append(line)
        code = process.wait()
    wall = time.perf_counter() - start
    output = "".join(lines)
    launched = MLFLOW_RUN.findall(output)
    printed = [run_id for _, run_id in TEST_ACCURACY.findall(output) if run_id]
    row = {"name": name, "wall_s": wall, "test_accuracy": last_float(TEST_ACCURACY, output)}
    return row | {"exit_code": code, "mlflow_run": (launched or printed or [""])[-1], "args": shlex.join(args)}, output


def named_runs(table: dict, experiment: str, names: str, data_dir: str, overrides: dict,
               best_trial: bool = False) -> list[dict]:
    """Each chosen named run in turn, one row each; a failed run is a row with its exit code, and the
    next still runs (one failure does not waste the hours of the others)."""
    import mlflow

    chosen = choose(table, names)
    if data_dir:
        data_dir = str(Path(data_dir).expanduser().resolve())
        if not Path(data_dir).is_dir():
            raise UserError(f"data_dir {data_dir} is not a folder")
    rows = []
    for name in chosen:
        row, output = run_one(name, experiment, with_overrides(table[name], overrides), data_dir)
        if best_trial:
            row = {"name": name, "wall_s": row["wall_s"], "best_score": last_float(BEST_TRIAL, output)} | row
        if mlflow.active_run():
            mlflow.log_text(output, f"output/{name}.out")
        print(f"== {name}: wall_s={row['wall_s']:.0f} test_accuracy={row['test_accuracy']:.4f} "
              f"exit_code={row['exit_code']} mlflow_run={row['mlflow_run']}", flush=True)
        rows.append(row)
    return rows


@benchmark("seed_runs", f"The tutorial's experiments and the stronger CNN at full length, each a timed `mlflow run` "
                        f"into {SEED_EXPERIMENT}")
def seed_runs(names: str = SEED_DEFAULT, data_dir: str = "", epochs: int = 0, limit: int = 0) -> list[dict]:
    """`names` from SEED_RUNS, comma-separated; `data_dir` as CNN_DATA_DIR; `epochs` and `limit`
    (0: as named) override the named runs' -P values."""
    return named_runs(SEED_RUNS, SEED_EXPERIMENT, names, data_dir, {"epochs": epochs, "limit": limit})


@benchmark("tuning_runs", f"Full-size Keras Tuner searches, each a timed `mlflow run` into {TUNING_EXPERIMENT}")
def tuning_runs(names: str = TUNING_DEFAULT, data_dir: str = "", max_epochs: int = 0, max_trials: int = 0,
                limit: int = 0) -> list[dict]:
    """`names` from TUNING_RUNS, comma-separated; `data_dir` as CNN_DATA_DIR; `max_epochs`,
    `max_trials` and `limit` (0: as named) override the named runs' -P values."""
    return named_runs(TUNING_RUNS, TUNING_EXPERIMENT, names, data_dir,
                      {"max_epochs": max_epochs, "max_trials": max_trials, "limit": limit}, best_trial=True)
