"""Rerun a logged training run from its recorded config, into a new run tagged `reproduces=<run_id>`.

    python -m experiments.reproduce RUN_ID [--deterministic true|false]

The config comes from the run's `config.json` artifact (its `train_config`; older runs: the logged
fields), falling back to the run's params. The new run goes into the original run's experiment (or
the run `mlflow run` launched); both test accuracies and losses are printed, and whether they match.
An exact match needs the same code, data and machine, and `deterministic=true`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys

from experiments.cli import boolean, run_main
from experiments.errors import UserError
from experiments.tracking import ARCH_TAG, DATA_DIGEST_TAG, DATASET_TAG, launched_run_id


def recorded_config(run):
    """The TrainConfig `run` was trained with."""
    import mlflow

    from experiments.train import TrainConfig

    if not {DATASET_TAG, ARCH_TAG} <= set(run.data.tags):
        raise UserError(f"run {run.info.run_id} is not a training run (it has no dataset and arch tags)")
    try:
        logged = json.loads(mlflow.artifacts.load_text(f"{run.info.artifact_uri}/config.json"))
    except Exception:  # noqa: BLE001 - a missing or unreadable artifact: the params say the same, as text
        logged = {}
    if "train_config" in logged:
        config = TrainConfig(**logged["train_config"])
    else:
        flat = {**run.data.params, **logged, "dataset": run.data.tags[DATASET_TAG], "arch": run.data.tags[ARCH_TAG]}
        config = TrainConfig(**_typed_fields(TrainConfig(flat["dataset"], flat["arch"]), flat))
    # Before calibration (issue 20) a run trained on its whole training split.
    uncalibrated = "calibration_fraction" not in {**logged.get("train_config", logged), **run.data.params}
    return dataclasses.replace(config, **_recorded_precision(config, run.data.params, logged.get("train_config", {})),
                               **({"calibration_fraction": 0.0} if uncalibrated else {}))


# Before `precision` was a run parameter (issue 19), these architectures always trained in mixed bfloat16.
BFLOAT16_BEFORE_PRECISION = ("cnn_modern", "xresnet", "airbench", "airbench_s", "airbench_m")


def _recorded_precision(config, params: dict, train_config: dict) -> dict:
    """The precision the run trained in, not `auto`'s choice on this machine: its `precision_chosen`, else
    what an older run's options or architecture implied."""
    options = dict(config.options)
    legacy = options.pop("precision", None)  # a Keras policy name, e.g. "mixed_bfloat16"
    if "precision_chosen" in params:
        precision = params["precision_chosen"]
    elif legacy:
        precision = legacy.removeprefix("mixed_")
    elif "precision" in train_config or "precision" in params:
        precision = config.precision
    else:
        precision = "bfloat16" if config.arch in BFLOAT16_BEFORE_PRECISION else "float32"
    return {"precision": precision, "options": options}


def _typed_fields(config, flat: dict) -> dict:
    """Fields of `config` found in `flat` (typed values or MLflow's param strings), options and recipe included."""
    def typed(value, default):
        if not isinstance(value, str) or isinstance(default, str) or default is None:
            return value
        return boolean(value) if isinstance(default, bool) else type(default)(value)

    fields = {name: typed(flat[name], default) for name, default in dataclasses.asdict(config).items()
              if name in flat and name not in ("options", "recipe")}
    fields["options"] = {k.removeprefix("options."): json.loads(v) for k, v in flat.items() if k.startswith("options.")}
    recipe = config.training_recipe()  # the architecture's own; the run logged the recipe it resolved to
    fields["recipe"] = {k.removeprefix("recipe."): typed(v, getattr(recipe, k.removeprefix("recipe."), None))
                        for k, v in flat.items() if k.startswith("recipe.")}
    return fields


def _code_warning(run) -> str:
    from experiments.tracking import git_state

    here = git_state()
    trained_at = run.data.tags.get("git_commit", "unknown")
    reasons = []
    if here["git_commit"] != trained_at:
        reasons.append(f"this checkout is at {here['git_commit'][:10]}, the run was trained at {trained_at[:10]}")
    if here["git_dirty"] == "true":
        reasons.append("this checkout has uncommitted changes")
    if run.data.tags.get("git_dirty") == "true":
        reasons.append("the run was trained with uncommitted changes")
    return f"warning: the code may differ: {'; '.join(reasons)}" if reasons else ""


def reproduce(run_id: str, deterministic: bool | None = None):
    """Train `run_id`'s config again; returns (original run, new run)."""
    import mlflow
    from mlflow.exceptions import MlflowException

    from experiments import train as training
    from experiments.tracking import check_tracking_server

    uri = check_tracking_server()
    mlflow.set_tracking_uri(uri)
    client = mlflow.MlflowClient()
    try:
        original = client.get_run(run_id)
    except MlflowException as exc:
        raise UserError(f"no run {run_id!r} in {uri} ({str(exc).splitlines()[0]})") from None
    config = recorded_config(original)
    if deterministic is not None:
        config = dataclasses.replace(config, deterministic=deterministic)
    config.validate()
    if warning := _code_warning(original):
        print(warning, file=sys.stderr, flush=True)
    data = training.load_data(config)  # train() reuses it
    if data.test.digest != original.data.tags.get(DATA_DIGEST_TAG):
        print(f"warning: the data differ: test split digest {data.test.digest}, the run had "
              f"{original.data.tags.get('data_digest', 'none')}", file=sys.stderr, flush=True)
    # Under `mlflow run` its launched run (MLFLOW_RUN_ID) is the new run; else one in the original's experiment.
    launched = launched_run_id()
    with mlflow.start_run(**({} if launched else {"experiment_id": original.info.experiment_id})) as active:
        mlflow.set_tag("reproduces", run_id)
        training.train(config)
    return original, client.get_run(active.info.run_id)


def show(original, new) -> None:
    """Both runs' test figures, and whether they match."""
    figures = []
    for name, run in (("original", original), ("reproduced", new)):
        metrics = run.data.metrics
        figures.append((metrics.get("test_accuracy"), metrics.get("test_loss")))
        shown = "  ".join(f"{k}={metrics[k]:.6f}" if k in metrics else f"{k}=none"
                          for k in ("test_accuracy", "test_loss"))
        print(f"{name:10} run {run.info.run_id}: {shown}")
    if figures[0] == figures[1]:
        print("match: test_accuracy and test_loss are identical")
    else:
        hint = "" if new.data.params.get("deterministic") == "true" else " (not deterministic: --deterministic true)"
        print(f"no match: the test figures differ{hint}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m experiments.reproduce", description=__doc__.splitlines()[0])
    parser.add_argument("run_id")
    parser.add_argument("--deterministic", type=boolean, default=None, help="default: as the run was trained")
    args = parser.parse_args(argv)
    return run_main(lambda: show(*reproduce(args.run_id, args.deterministic)))


if __name__ == "__main__":
    sys.exit(main())
