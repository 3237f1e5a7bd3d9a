"""The whole tutorial end to end at a small budget: `mlflow run . -e main`.

    python -m experiments.pipeline [--data-dir DIR] [--epochs 2] [--limit 5000] [--trials 2]

Steps, each a child run of this one and each the same command its own entry point runs:
the tutorial's experiments (experiments/train.py), a short Keras Tuner search on CIFAR-10
(tuning/search.py), promotion of every trained dataset's best run (registry/promote.py), and the
report (experiments/report.py), whose files are logged to this run. A step that fails is recorded
and the others go on; the exit code says whether all of them passed.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

from experiments.cli import boolean, run_main
from experiments.errors import UserError
from experiments.precision import check_precision
from experiments.tutorial import TUTORIAL_DATASETS, TUTORIAL_EXPERIMENTS

# Where Keras keeps the ImageNet VGG16 weights once downloaded.
VGG16_CACHE = Path.home() / ".keras" / "models" / "vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5"


def steps(args) -> list[tuple[str, list[str]]]:
    """(title, python -m argv) for each step, or (title, []) for a step skipped, with the reason in the title."""
    data = ["--data-dir", args.data_dir] if args.data_dir else []
    datasets = [d for d in args.datasets.split(",") if d]
    plan = []
    for dataset, arch in TUTORIAL_EXPERIMENTS:
        if dataset not in datasets:
            continue
        title = f"train {dataset} / {arch}: {args.epochs} epochs" + (f" on {args.limit:,} images" if args.limit else "")
        extra = []
        if arch == "vgg16_head":
            weights = args.vgg16_weights or (str(VGG16_CACHE) if VGG16_CACHE.is_file() else "")
            if not weights:
                plan.append((f"skip {dataset} / {arch}: no ImageNet VGG16 weights here (set vgg16_weights to a "
                             "weights file, or to imagenet to download them)", []))
                continue
            extra = ["--weights", weights]
        plan.append((title, ["experiments.train", "--dataset", dataset, "--arch", arch, "--epochs", str(args.epochs),
                             "--limit", str(args.limit), "--seed", str(args.seed), "--precision", args.precision,
                             *extra, *data]))
    if args.trials and args.search_dataset:
        plan.append((f"search {args.search_dataset}: {args.trials} random trials of {args.epochs} epochs, best retrained",
                     ["tuning.search", "--dataset", args.search_dataset, "--tuner", "random",
                      "--max-trials", str(args.trials), "--max-epochs", str(args.epochs), "--limit", str(args.limit),
                      "--seed", str(args.seed), "--search-name", f"main-{args.run_id[:8]}",
                      "--precision", args.precision, *data]))
    for dataset in (d for d in TUTORIAL_DATASETS if d in datasets):
        plan.append((f"promote {dataset}", ["registry.promote", "--dataset", dataset]))
    plan.append(("report", ["experiments.report", "--output-dir", args.output_dir]))
    return plan


def run_step(client, parent, number: int, total: int, title: str, argv: list[str], env: dict) -> dict:
    """Run one step as a child run of `parent`; its output goes to the console and its result is returned."""
    print(f"\n=== [{number}/{total}] {title}", flush=True)
    if not argv:
        return {"step": title, "status": "SKIPPED", "seconds": 0.0, "result": ""}
    child = client.create_run(parent.info.experiment_id, run_name=title.split(":")[0].replace(" / ", "-"),
                              tags={"mlflow.parentRunId": parent.info.run_id, "pipeline_step": str(number)})
    start = time.perf_counter()
    process = subprocess.Popen([sys.executable, "-u", "-m", *argv], env={**env, "MLFLOW_RUN_ID": child.info.run_id},
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
    lines = []
    for line in process.stdout:
        print(line, end="", flush=True)
        lines.append(line)
    code = process.wait()
    seconds = time.perf_counter() - start
    status = "FINISHED" if code == 0 else "FAILED"
    if client.get_run(child.info.run_id).info.status == "RUNNING":  # train ends its run; the others do not
        client.set_terminated(child.info.run_id, status)
    errors = [line.strip() for line in lines if line.startswith("error:")]
    result = test_accuracy(client, child.info.run_id) or (errors[-1] if errors else "")
    print(f"=== [{number}/{total}] {'done' if code == 0 else 'FAILED'} in {seconds:.0f} s {result}", flush=True)
    return {"step": title, "status": status, "seconds": round(seconds, 1), "result": result,
            "run_id": child.info.run_id}


def test_accuracy(client, run_id: str) -> str:
    """The step's test accuracy: a training's own, or a search's retrained best (its child tagged best=true)."""
    run = client.get_run(run_id)
    if "test_accuracy" not in run.data.metrics:
        best = client.search_runs([run.info.experiment_id],
                                  f"tags.mlflow.parentRunId = '{run_id}' and tags.best = 'true'", max_results=1)
        run = best[0] if best else run
    figure = run.data.metrics.get("test_accuracy")
    return f"test_accuracy={figure:.4f}" if figure is not None else ""


def run(args) -> list[dict]:
    import mlflow

    from experiments.tracking import check_tracking_server, default_tracking_uri, open_run

    check_tracking_server()
    started = time.perf_counter()
    with open_run("tutorial") as parent:  # `mlflow run`'s run, else a new one in the experiment "tutorial"
        client = mlflow.MlflowClient()
        args.run_id = parent.info.run_id
        mlflow.set_tags({"mlflow.runName": f"tutorial-end-to-end-{time.strftime('%Y%m%d-%H%M%S')}",
                         "mlflow.note.content": "The tutorial end to end at a small budget: each step is a child run."})
        env = {**os.environ, "MLFLOW_TRACKING_URI": default_tracking_uri(),
               "MLFLOW_EXPERIMENT_ID": parent.info.experiment_id}
        plan = steps(args)
        results = [run_step(client, parent, n, len(plan), title, argv, env) for n, (title, argv) in
                   enumerate(plan, start=1)]
        wall = time.perf_counter() - started
        mlflow.log_metrics({"wall_seconds": wall, "failed_steps": sum(r["status"] == "FAILED" for r in results)})
        mlflow.log_table({k: [r.get(k, "") for r in results] for k in ("step", "status", "seconds", "result",
                                                                       "run_id")}, "steps.json")
        report = Path(args.output_dir)
        if report.is_dir():
            mlflow.log_artifacts(str(report), "report")
    print(f"\n{'step':<70} {'status':<9} {'seconds':>8}  result")
    for r in results:
        print(f"{r['step'][:70]:<70} {r['status']:<9} {r['seconds']:>8.0f}  {r['result']}")
    print(f"total {wall / 60:.1f} min; report in {report}", flush=True)
    return results


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="python -m experiments.pipeline", description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default="", help="the local data folder (else CNN_DATA_DIR, else download)")
    parser.add_argument("--epochs", type=int, default=2, help="epochs of every training and search trial")
    parser.add_argument("--limit", type=int, default=5000, help="training images per experiment (0: all)")
    parser.add_argument("--trials", type=int, default=2, help="search trials (0: no search)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--datasets", default="mnist,cifar10,imagenette", help="which tutorial datasets to run")
    parser.add_argument("--search-dataset", default="cifar10", help="the dataset searched ('' for none)")
    parser.add_argument("--vgg16-weights", default="", help="imagenet or a weights file; default: Keras' cached copy")
    parser.add_argument("--output-dir", default="reports", help="where the report goes")
    parser.add_argument("--precision", default="auto", help="of every training: auto, float32, bfloat16 or float16")
    parser.add_argument("--dry-run", type=boolean, default=False, nargs="?", const=True, help="print the plan only")
    args = parser.parse_args(argv)
    unknown = set(args.datasets.split(",")) - set(TUTORIAL_DATASETS) - {""}
    if unknown:
        raise UserError(f"unknown datasets {', '.join(sorted(unknown))}; the tutorial's are "
                        f"{', '.join(TUTORIAL_DATASETS)}")
    for name in ("epochs", "limit", "trials", "seed"):
        if getattr(args, name) < (1 if name == "epochs" else 0):
            raise UserError(f"{name} must be {'positive' if name == 'epochs' else '0 or more'}, got {getattr(args, name)}")
    check_precision(args.precision)
    return args


def main(argv=None) -> int:
    def body():
        args = parse_args(argv)
        if args.dry_run:
            args.run_id = "dry-run"
            for n, (title, argv_) in enumerate(steps(args), start=1):
                print(f"[{n}] {title}" + (f"\n    python -m {' '.join(argv_)}" if argv_ else ""))
            return
        failed = [r["step"] for r in run(args) if r["status"] == "FAILED"]
        if failed:
            raise UserError(f"{len(failed)} step(s) failed: {'; '.join(failed)}; see their child runs", exit_code=1)

    return run_main(body)


if __name__ == "__main__":
    sys.exit(main())
