"""Tutorial report: the tutorial's figures beside our best runs, and each registered model's champion.

    python -m experiments.report [--output-dir reports] [--ui-url http://127.0.0.1:5000]

Reads the current tracking store (MLFLOW_TRACKING_URI, else ./mlflow.db) and writes
<output-dir>/tutorial_vs_ours.md and <output-dir>/tutorial_vs_ours.png.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

from experiments.cli import run_main
from experiments.errors import UserError
from experiments.tracking import ARCH_TAG, DATASET_TAG, NOT_CANDIDATES, SEARCH_ROLE_TAG, ui_link

REPORT_NAME = "tutorial_vs_ours"
DEFAULT_UI_URL = "http://127.0.0.1:5000"  # what `make ui` serves


@dataclasses.dataclass
class Run:
    run_id: str
    experiment_id: str
    name: str
    dataset: str
    arch: str
    accuracy: float
    epochs: str
    start_time: int


def percent(value: float) -> str:
    return f"{value:.2%}"


def tutorial_value(figure: str) -> float:
    """The tutorial's figure as a fraction: a range's midpoint ("78-80%" -> 0.79), else its number."""
    numbers = [float(n) for n in re.findall(r"\d+(?:\.\d+)?", figure)]
    return sum(numbers) / len(numbers) / 100


def finished_runs(client) -> list[Run]:
    """Every finished run of the store with a dataset tag and a test_accuracy."""
    experiment_ids = [e.experiment_id for e in client.search_experiments()]
    runs = client.search_runs(experiment_ids, "attributes.status = 'FINISHED'", max_results=50_000)
    return [
        Run(run.info.run_id, run.info.experiment_id, run.info.run_name or run.info.run_id, run.data.tags[DATASET_TAG],
            run.data.tags.get(ARCH_TAG, "?"), run.data.metrics["test_accuracy"], run.data.params.get("epochs", "?"),
            run.info.start_time)
        for run in runs
        if DATASET_TAG in run.data.tags and "test_accuracy" in run.data.metrics
        and run.data.tags.get(SEARCH_ROLE_TAG) not in NOT_CANDIDATES
    ]


def best(runs: list[Run]) -> Run | None:
    return max(runs, key=lambda r: (r.accuracy, r.start_time), default=None)


def champions(client) -> list[tuple[str, object]]:
    """(registered model name, its champion version or None), for every registered model."""
    from mlflow.exceptions import MlflowException

    found, token = [], None
    while True:
        page = client.search_registered_models(max_results=100, page_token=token)
        found += [m.name for m in page]
        token = page.token
        if not token:
            break
    result = []
    for name in sorted(found):
        try:
            result.append((name, client.get_model_version_by_alias(name, "champion")))
        except MlflowException:  # no champion alias
            result.append((name, None))
    return result


# --- Writing -------------------------------------------------------------------------------------


def champion_row(client, ui_url: str, name: str, version, output_dir: Path) -> list[str]:
    """A row of the champions table; the champion's plots/gradcam.png is copied beside the report."""
    from mlflow.exceptions import MlflowException

    latest = max(client.search_model_versions(f"name = '{name}'"), key=lambda v: int(v.version))
    gate = latest.tags.get("gate_decision")
    last_gate = f"v{latest.version} {gate}: {latest.tags.get('gate_reason', '')}" if gate else "not gated"
    if version is None:
        return [name, "no champion", "", "", "", "", "", last_gate, ""]
    tags, source = version.tags, version.tags.get("source_run") or version.run_id
    try:
        accuracy = percent(float(tags["test_accuracy"]))
    except (KeyError, ValueError):
        accuracy = tags.get("test_accuracy", "")
    try:
        run = client.get_run(source)
    except MlflowException:  # the source run was deleted
        return [name, version.version, accuracy, "", "", tags.get(ARCH_TAG, ""), f"{source} (deleted)", last_gate, ""]
    metrics = run.data.metrics
    interval = (f"{percent(metrics['test_accuracy_ci_low'])} to {percent(metrics['test_accuracy_ci_high'])}"
                if "test_accuracy_ci_low" in metrics else "not measured")
    ece = f"{metrics['test_ece']:.4f}" if "test_ece" in metrics else "not measured"
    with tempfile.TemporaryDirectory() as tmp:
        try:
            shutil.copyfile(client.download_artifacts(source, "plots/gradcam.png", tmp), output_dir / f"gradcam_{name}.png")
            gradcam = f"[gradcam_{name}.png](gradcam_{name}.png)"
        except (MlflowException, OSError):  # not logged: an older run, or a network without convolutions
            gradcam = run.data.tags.get("gradcam_note", "not logged")
    return [name, version.version, accuracy, interval, ece, tags.get(ARCH_TAG, ""),
            run_link(ui_url, run.info.experiment_id, source, source), last_gate, gradcam]


def run_link(ui_url: str, experiment_id: str, run_id: str, text: str) -> str:
    return f"[{text}]({ui_link(ui_url, experiment_id, run_id)})"


def table(header: list[str], rows: list[list[str]]) -> list[str]:
    def cells(row):
        return "| " + " | ".join(str(c).replace("|", "\\|") for c in row) + " |"

    return [cells(header), cells(["---"] * len(header)), *map(cells, rows)]


def write_chart(path: Path, figures: dict, ours: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{dataset}\n{arch}" for dataset, arch in figures]
    tutorial = [tutorial_value(f) * 100 for f in figures.values()]
    measured = [ours[key].accuracy * 100 if ours[key] else 0 for key in figures]
    x = range(len(labels))
    fig, ax = plt.subplots(figsize=(1.6 * len(labels) + 2, 4.5))
    bars = ax.bar([i - 0.2 for i in x], tutorial, 0.4, label="the tutorial", color="#9e9e9e")
    ax.bar_label(bars, list(figures.values()), fontsize=8)
    bars = ax.bar([i + 0.2 for i in x], measured, 0.4, label="ours (best run)", color="#1f77b4")
    ax.bar_label(bars, [f"{v:.1f}%" if ours[k] else "not run" for v, k in zip(measured, figures)], fontsize=8)
    ax.set_xticks(list(x), labels, fontsize=9)
    ax.set_ylabel("test accuracy (%)")
    ax.set_ylim(0, 120)
    ax.set_yticks(range(0, 101, 20))
    ax.set_title("Tutorial vs ours: test accuracy per tutorial experiment")
    ax.legend(loc="upper right", fontsize=8, ncols=2)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def redact(uri: str) -> str:
    """A URI without its password (postgresql://user:secret@host -> postgresql://user:***@host)."""
    return re.sub(r"//([^/:@]+):[^/@]*@", r"//\1:***@", uri)


def report(output_dir: str | Path = "reports", ui_url: str = "") -> tuple[Path, Path]:
    """Write <output_dir>/tutorial_vs_ours.md and .png from the current tracking store; returns both paths."""
    import mlflow

    from experiments.tracking import check_tracking_server, default_tracking_uri
    from experiments.tutorial import TUTORIAL_FIGURES

    if ui_url and not ui_url.startswith(("http://", "https://")):
        raise UserError(f"ui_url must start with http:// or https://, got {ui_url!r}")
    uri = check_tracking_server(default_tracking_uri())
    server = re.sub(r"//[^/@]*@", "//", uri)  # the tracking server without its credentials
    ui_url = (ui_url or (server if uri.startswith(("http://", "https://")) else DEFAULT_UI_URL)).rstrip("/")
    output_dir = Path(output_dir)
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"cannot create the output folder {output_dir} ({exc.strerror or exc})") from None
    client = mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)
    runs = finished_runs(client)

    ours = {key: best([r for r in runs if (r.dataset, r.arch) == key]) for key in TUTORIAL_FIGURES}
    lines = [
        "# The tutorial vs ours",
        "",
        f"Generated {time.strftime('%Y-%m-%d %H:%M %Z')} from the tracking store `{redact(uri)}`: "
        "our best finished run (by `test_accuracy`) per tutorial experiment.",
        "",
    ]
    if not runs:
        lines += ["Nothing was run yet: this store holds no finished run with a `test_accuracy`. "
                  "Train one first, e.g. `mlflow run . -e mnist --env-manager local`.", ""]
    rows = []
    for (dataset, arch), figure in TUTORIAL_FIGURES.items():
        run = ours[(dataset, arch)]
        rows.append([dataset, arch, figure, *(
            [percent(run.accuracy), run.epochs, run_link(ui_url, run.experiment_id, run.run_id, run.name)]
            if run else ["not run", "", ""])])
    lines += table(["dataset", "arch", "the tutorial", "ours", "epochs", "run"], rows)

    beyond = []
    for dataset in dict.fromkeys(dataset for dataset, _ in TUTORIAL_FIGURES):
        top = best([r for r in runs if r.dataset == dataset])
        tutorial_best = best([r for r in runs if r.dataset == dataset and (dataset, r.arch) in TUTORIAL_FIGURES])
        if top and (tutorial_best is None or top.accuracy > tutorial_best.accuracy):
            versus = f"{percent(tutorial_best.accuracy)} ({tutorial_best.arch})" if tutorial_best else "not run"
            beyond.append([dataset, top.arch, percent(top.accuracy), top.epochs, versus,
                           run_link(ui_url, top.experiment_id, top.run_id, top.name)])
    lines += ["", "## Beyond the tutorial", "",
              "Per dataset, our best run over every architecture, where it beats the best of the tutorial's.", ""]
    lines += table(["dataset", "arch", "ours", "epochs", "best tutorial arch", "run"], beyond) if beyond else [
        "No run of another architecture beats the tutorial's architectures yet."]

    lines += ["", "## Champions", "",
              "The version behind the alias `champion` of each registered model: its test accuracy with the 95% "
              "bootstrap interval over test images, its expected calibration error (after temperature scaling), "
              "the gate's decision on the model's latest version, and the champion's Grad-CAM plot.", ""]
    rows = [champion_row(client, ui_url, name, version, output_dir) for name, version in champions(client)]
    lines += table(["model", "version", "test_accuracy", "95% CI", "ECE", "arch", "source run", "last gate decision",
                    "Grad-CAM"], rows) if rows else [
        "No registered models yet: `mlflow run . -e promote --env-manager local -P dataset=<dataset>`."]
    lines += ["", f"![The tutorial's test accuracy vs ours]({REPORT_NAME}.png)", ""]

    markdown, chart = output_dir / f"{REPORT_NAME}.md", output_dir / f"{REPORT_NAME}.png"
    try:
        markdown.write_text("\n".join(lines))
        write_chart(chart, TUTORIAL_FIGURES, ours)
    except OSError as exc:
        raise UserError(f"cannot write the report into {output_dir} ({exc.strerror or exc})") from None
    return markdown, chart


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m experiments.report", description=__doc__.splitlines()[0])
    parser.add_argument("--output-dir", default="reports", help="where the .md and .png go (default: reports)")
    parser.add_argument("--ui-url", default="", help=f"MLflow UI for run links (default: the tracking server, "
                        f"else {DEFAULT_UI_URL})")
    args = parser.parse_args(argv)

    def body():
        for path in report(args.output_dir, args.ui_url):
            print(path)

    return run_main(body)


if __name__ == "__main__":
    sys.exit(main())
