"""The tutorial report (experiments/report.py) on a real sqlite store with a few tiny real runs."""

from __future__ import annotations

import mlflow
import pytest
from PIL import Image

from conftest import artifact_paths, free_port
from experiments import report as tutorial_report
from experiments.train import train
from registry.promote import promote


def logged_run(dataset: str, arch: str, accuracy: float | None, status: str = "FINISHED") -> str:
    """A run as train() tags it, made directly: to rank architectures without training them."""
    client = mlflow.MlflowClient()
    experiment = client.get_experiment_by_name(dataset) or client.get_experiment(client.create_experiment(dataset))
    run = client.create_run(experiment.experiment_id, run_name=f"{dataset}-{arch}-logged",
                            tags={"dataset": dataset, "arch": arch})
    client.log_param(run.info.run_id, "epochs", 30)
    if accuracy is not None:
        client.log_metric(run.info.run_id, "test_accuracy", accuracy)
    client.set_terminated(run.info.run_id, status)
    return run.info.run_id


def row(markdown: str, *cells: str) -> str:
    """The one table row that starts with these cells."""
    start = "| " + " | ".join(cells) + " |"
    [found] = [line for line in markdown.splitlines() if line.startswith(start)]
    return found


@pytest.mark.slow
def test_report_compares_tutorial_runs_and_names_champions(tiny_npz_dir, tmp_path, isolated_tracking):
    client = mlflow.MlflowClient()
    mlp = train(dataset="mnist", arch="mlp", epochs=1, batch_size=16, data_dir=str(tiny_npz_dir))
    cnn = train(dataset="mnist", arch="cnn_simple", epochs=1, batch_size=16, data_dir=str(tiny_npz_dir))
    # Grad-CAM: the convolutional run plots it; the mlp, without convolutions, says why not.
    assert "plots/gradcam.png" in artifact_paths(cnn.run_id) and "plots/gradcam.png" not in artifact_paths(mlp.run_id)
    assert client.get_run(mlp.run_id).data.tags["gradcam_note"] == "no Grad-CAM: mlp has no convolutions"
    [decision] = promote("mnist")
    # CIFAR-10: the tutorial's cnn_simple against a stronger architecture; a failed run and a run
    # without test_accuracy are not results.
    cifar_simple = logged_run("cifar10", "cnn_simple", 0.61)
    cifar_modern = logged_run("cifar10", "cnn_modern", 0.8889)
    logged_run("cifar10", "cnn_deep", 0.99, status="FAILED")
    logged_run("cifar10", "cnn_deep", None)

    markdown_path, chart_path = tutorial_report.report(tmp_path / "out", ui_url="http://ui.example:5000/")
    markdown = markdown_path.read_text()
    print(markdown)

    assert markdown.startswith("# The tutorial vs ours")
    assert f"`{isolated_tracking}`" in markdown
    mlp_run = client.get_run(mlp.run_id)
    accuracy = mlp_run.data.metrics["test_accuracy"]
    link = (f"(http://ui.example:5000/#/experiments/{mlp_run.info.experiment_id}/runs/{mlp.run_id}"
            "?workflowType=machine_learning)")
    assert row(markdown, "mnist", "mlp", "about 97%") == (
        f"| mnist | mlp | about 97% | {accuracy * 100:.2f}% | 1 | [{mlp_run.info.run_name}]{link} |")
    assert cnn.run_id in row(markdown, "mnist", "cnn_simple", "98%+")
    assert row(markdown, "cifar10", "cnn_deep", "78-80%") == "| cifar10 | cnn_deep | 78-80% | not run |  |  |"
    assert cifar_simple in row(markdown, "cifar10", "cnn_simple", "about 60%")
    assert "61.00%" in row(markdown, "cifar10", "cnn_simple", "about 60%")

    beyond = markdown.split("## Beyond the tutorial")[1].split("## Champions")[0]
    assert cifar_modern in row(beyond, "cifar10", "cnn_modern", "88.89%", "30", "61.00% (cnn_simple)")
    assert "| mnist |" not in beyond  # mnist's best is a tutorial architecture

    champions = markdown.split("## Champions")[1]
    champion = client.get_model_version_by_alias("mnist", "champion")
    assert (decision.action, str(champion.version)) == ("champion", "1")
    expected = f"{float(champion.tags['test_accuracy']) * 100:.2f}%"
    metrics = client.get_run(decision.run_id).data.metrics
    interval = f"{metrics['test_accuracy_ci_low'] * 100:.2f}% to {metrics['test_accuracy_ci_high'] * 100:.2f}%"
    line = row(champions, "mnist", "1", expected, interval, f"{metrics['test_ece']:.4f}", champion.tags["arch"])
    assert " | v1 champion: no champion yet: the best candidate becomes champion | " in line
    if champion.tags["arch"] == "mlp":  # whichever of the two runs won
        assert line.endswith(" | no Grad-CAM: mlp has no convolutions |")
    else:
        assert line.endswith(" | [gradcam_mnist.png](gradcam_mnist.png) |")
        with Image.open(tmp_path / "out" / "gradcam_mnist.png") as image:
            assert image.format == "PNG"
    assert f"runs/{decision.run_id}?workflowType=machine_learning)" in row(champions, "mnist", "1")
    assert "![The tutorial's test accuracy vs ours](tutorial_vs_ours.png)" in markdown

    with Image.open(chart_path) as image:
        image.verify()
    with Image.open(chart_path) as image:
        assert image.format == "PNG" and 600 <= image.width <= 2000 and 300 <= image.height <= 1000


def test_empty_store_writes_a_report_that_says_nothing_was_run(tmp_path, capsys):
    folder = tmp_path / "reports"
    assert tutorial_report.main(["--output-dir", str(folder)]) == 0
    assert capsys.readouterr().out.split() == [str(folder / "tutorial_vs_ours.md"), str(folder / "tutorial_vs_ours.png")]
    markdown = (folder / "tutorial_vs_ours.md").read_text()
    assert "Nothing was run yet" in markdown
    assert row(markdown, "mnist", "mlp", "about 97%", "not run")
    assert "No registered models yet" in markdown
    assert (folder / "tutorial_vs_ours.png").stat().st_size > 0


def test_bad_input_fails_in_one_line(tmp_path, monkeypatch, capsys):
    (tmp_path / "a-file").write_text("")
    assert tutorial_report.main(["--output-dir", str(tmp_path / "a-file" / "reports")]) == 2
    [line] = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("error: cannot create the output folder")
    assert tutorial_report.main(["--ui-url", "localhost:5000", "--output-dir", str(tmp_path / "r")]) == 2
    assert capsys.readouterr().err.strip() == "error: ui_url must start with http:// or https://, got 'localhost:5000'"

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{free_port()}")  # nothing listens there
    assert tutorial_report.main(["--output-dir", str(tmp_path / "r")]) == 2
    [line] = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("error: tracking server http://127.0.0.1:") and "unreachable" in line
    assert not (tmp_path / "r").exists()
