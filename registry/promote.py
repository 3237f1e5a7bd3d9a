"""Promote the best finished run of a dataset to the MLflow model registry, behind the alias `champion`.

    python -m registry.promote --dataset cifar10 [--metric test_accuracy] [--dry-run true] [--experiment NAME]
                               [--tta as_trained|none|flip|full] [--alpha 0.05] [--min-gain 0] [--max-class-drop 5]
    python -m registry.promote --rollback cifar10        # champion back to the previous champion

Candidates are the dataset's finished training runs and the tuning searches' `best=true` runs that
logged the metric and a model. Only runs scored on the same test split are compared (tag
`data_digest`: `--data-digest` if given, else the champion's, else the newest candidate's). Models trained from
scratch register as `<dataset>`, the VGG16 transfer model as `<dataset>-vgg16`.

The best run not yet registered becomes a new version (its Keras model wrapped in
registry/classifier.py, the pyfunc that serves raw pixels or encoded images). With no champion yet it
becomes champion. Otherwise it takes `champion` only if it passes the gate (registry/gate.py): on the
two runs' per-image test predictions, an exact McNemar p below `--alpha` (0.05), an accuracy gain of at
least `--min-gain` points (0), and no class losing more than `--max-class-drop` points of recall (5).
Otherwise it gets `challenger`. The version's `gate_*` tags hold the figures, the decision and its
reason; `--dry-run` prints the same. Runs without usable predictions (older runs) are compared by the
metric alone, and the reason says so. Promoting again with no new runs changes nothing. A rolled-back version is tagged `rolled_back=true`; its run, like
every registered run, is not considered again.

`--tta` chooses the test-time views the registered model serves: `as_trained` (default: the recipe's),
or `none`, `flip` (it and its mirror) or `full` (airbench's six). Each view is a forward pass, so `none`
serves a six-view model at a sixth of its cost; the run's `test_accuracy_tta_<level>` says what that
costs in accuracy, and becomes the version's `served_test_accuracy` tag. Candidates are still ranked
by their runs' metric as trained.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
from pathlib import Path

from experiments.cli import boolean, run_main
from experiments.errors import UserError
from registry.gate import GateSettings, Verdict, judge
from experiments.tracking import (ARCH_TAG, DATA_DIGEST_TAG, DATASET_TAG, NOT_CANDIDATES, SEARCH_ROLE_TAG,
                                  check_tracking_server, connect, launched_run_id)

CHAMPION = "champion"
AS_TRAINED = "as_trained"
CHALLENGER = "challenger"
CLASSIFIER_CODE = Path(__file__).with_name("classifier.py")
GRADCAM_CODE = Path(__file__).parents[1] / "experiments" / "gradcam.py"  # shipped with it, for `explain`


@dataclasses.dataclass
class Candidate:
    run_id: str
    arch: str
    value: float
    data_digest: str
    git_commit: str
    start_time: int


@dataclasses.dataclass
class Decision:
    name: str  # registered model
    action: str  # "champion", "challenger", "unchanged", "none", or "would ..." in a dry run
    version: str | None
    run_id: str | None
    value: float | None
    message: str
    gate: dict = dataclasses.field(default_factory=dict)  # the gate's tags (empty when nothing was judged)

    def __post_init__(self):
        self.version = None if self.version is None else str(self.version)  # MLflow returns int or str


def registered_name(dataset: str, arch: str) -> str:
    return f"{dataset}-vgg16" if arch == "vgg16_head" else dataset


def lower_is_better(metric: str) -> bool:
    return "loss" in metric or "error" in metric


# --- Promotion -----------------------------------------------------------------------------------


def promote(dataset: str, metric: str = "test_accuracy", dry_run: bool = False, experiment: str = "",
            data_digest: str = "", client=None, tta: str = AS_TRAINED,
            gate: GateSettings = GateSettings()) -> list[Decision]:
    """Promote the best candidate of each registered model of `dataset`; returns what was decided."""
    from experiments.models import TTA_LEVELS

    if tta != AS_TRAINED and tta not in TTA_LEVELS:
        raise UserError(f"unknown tta {tta!r}; choose one of: {AS_TRAINED}, {', '.join(TTA_LEVELS)}")
    gate.check()
    client = client or _client()
    candidates = find_candidates(client, dataset, metric, experiment)
    if not candidates:
        where = f"experiment {experiment!r}" if experiment else "any experiment"
        raise UserError(
            f"no finished run of dataset {dataset!r} with metric {metric!r} in {where}; "
            f"train one first, e.g. mlflow run . -e {dataset}"
        )
    groups: dict[str, list[Candidate]] = {}
    for candidate in candidates:
        groups.setdefault(registered_name(dataset, candidate.arch), []).append(candidate)
    return [_promote_group(client, name, group, metric, dry_run, data_digest, tta, gate)
            for name, group in sorted(groups.items())]


def find_candidates(client, dataset: str, metric: str, experiment: str = "") -> list[Candidate]:
    if experiment:
        found = client.get_experiment_by_name(experiment)
        if found is None:
            raise UserError(f"no experiment named {experiment!r}; leave `experiment` empty to search them all")
        experiment_ids = [found.experiment_id]
    else:
        experiment_ids = [e.experiment_id for e in client.search_experiments()]
    runs = client.search_runs(
        experiment_ids, f"tags.dataset = '{dataset}' and attributes.status = 'FINISHED'", max_results=50_000
    )
    return [
        Candidate(
            run_id=run.info.run_id,
            arch=run.data.tags.get(ARCH_TAG, ""),
            value=run.data.metrics[metric],
            data_digest=run.data.tags.get(DATA_DIGEST_TAG, ""),
            git_commit=run.data.tags.get("git_commit", "unknown"),
            start_time=run.info.start_time,
        )
        for run in runs
        if metric in run.data.metrics and run.data.tags.get(SEARCH_ROLE_TAG) not in NOT_CANDIDATES
    ]


def _promote_group(client, name: str, candidates: list[Candidate], metric: str, dry_run: bool,
                   data_digest: str, tta: str, gate: GateSettings) -> Decision:
    champion = _alias(client, name, CHAMPION)
    champion_value = None
    if champion is not None:
        metrics = client.get_run(champion.run_id).data.metrics
        if metric not in metrics:
            raise UserError(f"{name}@{CHAMPION} (version {champion.version}) has no metric {metric!r}; "
                            f"promote by the metric it was chosen by (default test_accuracy)")
        champion_value = metrics[metric]
    newest = max(candidates, key=lambda c: c.start_time)
    digest = data_digest or (champion.tags.get(DATA_DIGEST_TAG) if champion else "") or newest.data_digest
    comparable = [c for c in candidates if c.data_digest == digest]
    skipped = len(candidates) - len(comparable)
    note = f" ({skipped} run(s) on another test split not compared)" if skipped else ""
    versus = "no champion yet" if champion is None else (
        f"champion version {champion.version} has {metric}={champion_value:.4f}")
    # Runs already registered (as champion, challenger, or rolled back) have had their turn.
    registered = {v.run_id for v in _versions(client, name)}
    fresh = [c for c in comparable if c.run_id not in registered]
    if not fresh:
        return _report(Decision(name, "unchanged", champion.version if champion else None, None, None,
                                f"{name}: no new run on test split {digest} since the last promotion; {versus}{note}"))

    sign = 1 if lower_is_better(metric) else -1
    best = min(fresh, key=lambda c: (sign * c.value, c.start_time))
    beats = champion is None or sign * best.value < sign * champion_value
    verdict = (Verdict(True, "no champion yet: the best candidate becomes champion") if champion is None
               else judge(best.run_id, champion.run_id, metric, beats, digest, gate))
    alias = CHAMPION if verdict.passed else CHALLENGER
    gate_tags = verdict.tags(alias)
    summary = f"run {best.run_id} ({best.arch}, {metric}={best.value:.4f})"
    if dry_run:
        return _report(Decision(name, f"would be {alias}", None, best.run_id, best.value,
                                f"{name}: dry run: {summary} would be registered as {alias}; {versus}{note}; "
                                f"gate {verdict.reason}", gate_tags))
    version = _register(client, name, best, metric, tta, gate_tags)
    client.set_registered_model_alias(name, alias, version.version)
    if verdict.passed:
        history = _champion_history(client, name) + [str(version.version)]
        client.set_registered_model_tag(name, "champion_history", json.dumps(history))
    return _report(Decision(name, alias, version.version, best.run_id, best.value,
                            f"{name}: version {version.version} = {summary} is now {alias}; {versus}{note}; "
                            f"gate {verdict.reason}", gate_tags))


def rollback(name: str, dry_run: bool = False, client=None) -> Decision:
    """Move `champion` back to the version that held it before; the demoted version is never promoted again."""
    client = client or _client()
    champion = _alias(client, name, CHAMPION)
    if champion is None:
        raise UserError(f"{name} has no {CHAMPION} to roll back; run promote first")
    history = _champion_history(client, name)
    while history and history[-1] == str(champion.version):
        history.pop()
    if not history:
        raise UserError(f"{name}: version {champion.version} is the first recorded {CHAMPION}; nothing to roll back to")
    previous = history[-1]
    message = f"{name}: {CHAMPION} moves from version {champion.version} back to version {previous}"
    if dry_run:
        return _report(Decision(name, "would roll back", previous, None, None, f"dry run: {message}"))
    client.set_registered_model_alias(name, CHAMPION, previous)
    client.set_model_version_tag(name, champion.version, "rolled_back", "true")
    client.set_registered_model_tag(name, "champion_history", json.dumps(history))
    restored = client.get_model_version(name, previous)
    return _report(Decision(name, "rolled back", previous, restored.run_id, None,
                            f"{message}; version {champion.version} is tagged rolled_back=true"))


# --- Registry helpers ----------------------------------------------------------------------------


def _client():
    import mlflow

    check_tracking_server()
    mlflow.set_registry_uri(connect())
    return mlflow.MlflowClient()


def _alias(client, name: str, alias: str):
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException:  # no such registered model or alias
        return None


def _versions(client, name: str) -> list:
    return list(client.search_model_versions(f"name = '{name}'", max_results=10_000))


def _champion_history(client, name: str) -> list[str]:
    return json.loads(client.get_registered_model(name).tags.get("champion_history", "[]"))


def _register(client, name: str, best: Candidate, metric: str, tta: str, gate_tags: dict):
    import mlflow

    uri, served = log_serving_model(client, best.run_id, tta)
    run = client.get_run(best.run_id)
    tags = {
        DATASET_TAG: run.data.tags.get(DATASET_TAG, ""),
        ARCH_TAG: best.arch,
        "test_accuracy": str(run.data.metrics.get("test_accuracy", "")),
        # what the views it serves score: test_accuracy unless --tta changed them
        "served_test_accuracy": "" if served["test_accuracy"] is None else str(served["test_accuracy"]),
        "tta": served["tta"],
        DATA_DIGEST_TAG: best.data_digest,
        "git_commit": best.git_commit,
        "source_run": best.run_id,
        metric: str(best.value),
        **gate_tags,
    }
    if not client.search_registered_models(f"name = '{name}'"):
        client.create_registered_model(name, description=(
            f"Image classifier for {name}. Serve: mlflow models serve -m models:/{name}@{CHAMPION} (the first "
            "start builds the model's environment from its requirements.txt, 1-2 min; --env-manager local "
            "reuses the current one). Input: uint8 pixels (N, H, W, C) or base64 JPEG/PNG images."))
    version = mlflow.register_model(uri, name, tags=tags)
    client.update_model_version(name, version.version, description=(
        f"{best.arch} from run {best.run_id}: {metric}={best.value:.4f} on test split {best.data_digest}, "
        f"commit {best.git_commit}."))
    return client.get_model_version(name, version.version)


def log_serving_model(client, run_id: str, tta: str = "as_trained") -> tuple[str, dict]:
    """Wrap the run's Keras model, with the test-time views `tta`, in the serving pyfunc (registry/classifier.py);
    log it to the same run. Returns its URI and {"tta": the views served, "test_accuracy": their figure}."""
    import mlflow
    import numpy as np
    from mlflow.models import Model, ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema
    from mlflow.types.schema import Array

    from experiments import gradcam
    from experiments.models import one_view_net
    from experiments.run_logging import MODEL_STEP, link_metrics, pinned_requirements

    source = f"runs:/{run_id}/model"
    info = mlflow.models.get_model_info(source)
    class_names = list(info.metadata["class_names"])
    image_shape = [int(d) for d in info.signature.inputs.inputs[0].shape[1:]]
    outputs = Schema([
        ColSpec("long", "class_index"),
        ColSpec("string", "label"),
        ColSpec("float", "confidence"),
        ColSpec(Array("float"), "probabilities"),
        ColSpec("string", "heatmap", required=False),  # with params {"explain": true}
    ])
    packages = ["mlflow", "tensorflow", "keras", "numpy", "pandas", "pillow"]
    with tempfile.TemporaryDirectory() as tmp:
        keras_path = Path(tmp) / "model.keras"
        # safe_mode: a model from the tracking store may not run arbitrary code (lambdas) while loading.
        try:
            model = mlflow.keras.load_model(source, load_model_kwargs={"safe_mode": True})
        except ValueError as exc:
            if "safe_mode" not in str(exc):
                raise
            raise UserError(f"the model of run {run_id} holds Python code (a Lambda layer) that safe mode "
                            "does not load; retrain it with stock layers") from None
        model, served = served_views(model, client.get_run(run_id), tta, image_shape, len(class_names))
        model.save(keras_path)
        # Created first, in the run's experiment: Model.log alone would file it in the active (Default) one.
        serving = mlflow.initialize_logged_model(name="serving", source_run_id=run_id, model_type="classifier",
                                                 experiment_id=client.get_run(run_id).info.experiment_id)
        logged = Model.log(
            artifact_path=None,
            name="serving",
            model_id=serving.model_id,
            flavor=mlflow.pyfunc,
            run_id=run_id,
            python_model=str(CLASSIFIER_CODE),
            artifacts={"keras_model": str(keras_path)},
            code_paths=[str(GRADCAM_CODE)],
            model_config={"class_names": class_names, "image_shape": image_shape,
                          "explain": gradcam.serving_settings(model, one_view_net(model))},
            signature=ModelSignature(outputs=outputs, params=ParamSchema([ParamSpec("explain", "boolean", False)])),
            input_example=np.zeros((1, *image_shape), np.uint8),  # also checks the wrapper loads and predicts
            metadata={**info.metadata, "input": f"uint8 (N, {', '.join(map(str, image_shape))}) or base64 images"},
            pip_requirements=pinned_requirements(packages),
            step=MODEL_STEP,  # no run metric copied at random: the training model's figures, linked below
        )
    figures = mlflow.get_logged_model(info.model_id).metrics or []  # none on a model logged without figures
    if served["views_changed"]:  # the training model's test figures are of other views: only those of these
        figures = [m for m in figures if not m.key.startswith("test_") or m.key == f"test_accuracy_tta_{served['tta']}"]
    link_metrics(client, run_id, logged.model_id, figures)
    client.set_logged_model_tags(logged.model_id, {"tta": served["tta"]})
    return logged.model_uri, served


def served_views(model, run, tta: str, image_shape: list, num_classes: int):
    """(the model with the views `tta`, {"tta", "test_accuracy" of those views or None, "views_changed"})."""
    from experiments.datasets import dataset_entry
    from experiments.models import DataSpec, Recipe, tta_level, with_views

    params = run.data.params
    recipe = Recipe(**{field: params.get(f"recipe.{field}") == "True"
                       for field in ("test_time_flip", "test_time_shift", "test_time_logits")})
    dataset = run.data.tags.get(DATASET_TAG, "")
    spec = DataSpec(tuple(image_shape), num_classes, dataset_entry(dataset).hflip if dataset else True)
    trained = tta_level(recipe, spec)
    if tta in (AS_TRAINED, trained):
        return model, {"tta": trained, "test_accuracy": run.data.metrics.get("test_accuracy"), "views_changed": False}
    accuracy = run.data.metrics.get(f"test_accuracy_tta_{tta}")
    if accuracy is None:
        print(f"note: run {run.info.run_id} did not measure its test accuracy with tta={tta} (it was trained to "
              f"serve {trained}); the version's served_test_accuracy tag is left empty", flush=True)
    return with_views(model, tta, recipe, spec), {"tta": tta, "test_accuracy": accuracy, "views_changed": True}


def _report(decision: Decision) -> Decision:
    print(decision.message, flush=True)
    return decision


# --- Command line --------------------------------------------------------------------------------


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m registry.promote", description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="", help="promote the best runs of this dataset")
    parser.add_argument("--metric", default="test_accuracy")
    parser.add_argument("--dry-run", type=boolean, default=False, nargs="?", const=True)
    parser.add_argument("--experiment", default="", help="only runs of this experiment (default: all)")
    parser.add_argument("--data-digest", default="", help="compare runs on this test split (default: the champion's)")
    parser.add_argument("--rollback", default="", metavar="NAME", help="move NAME@champion back instead")
    parser.add_argument("--tta", default=AS_TRAINED, help="test-time views served: as_trained, none, flip or full")
    parser.add_argument("--alpha", type=float, default=GateSettings.alpha,
                        help="McNemar p-value a new champion must be below")
    parser.add_argument("--min-gain", type=float, default=GateSettings.min_gain,
                        help="accuracy points a new champion must gain")
    parser.add_argument("--max-class-drop", type=float, default=GateSettings.max_class_drop,
                        help="points of recall any one class may lose to a new champion")
    args = parser.parse_args(argv)

    def body():
        if args.rollback:
            decisions = [rollback(args.rollback, args.dry_run)]
        elif args.dataset:
            decisions = promote(args.dataset, args.metric, args.dry_run, args.experiment, args.data_digest,
                                tta=args.tta, gate=GateSettings(args.alpha, args.min_gain, args.max_class_drop))
        else:
            raise UserError("give --dataset NAME to promote, or --rollback NAME")
        if launched_run_id():  # under `mlflow run`: the launcher's run records the decisions
            import mlflow

            client = mlflow.MlflowClient()
            client.set_tag(launched_run_id(), "promotion", "rollback" if args.rollback else "promote")
            client.log_dict(launched_run_id(), [dataclasses.asdict(d) for d in decisions], "promotion.json")

    return run_main(body)


if __name__ == "__main__":
    sys.exit(main())
