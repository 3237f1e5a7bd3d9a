"""`mlflow run . -e main`: the tutorial end to end (trainings, a search, promotion, the report) as child runs."""

from __future__ import annotations

import json
import subprocess

import mlflow
import pytest
from conftest import PROJECT_ROOT, make_npz, python_env

from experiments.pipeline import main


@pytest.mark.slow
def test_main_entry_point_runs_every_step_as_a_child_run(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    make_npz(data / "cifar10.npz", n_train=90, n_test=30, shape=(32, 32, 3), classes=3)
    report = tmp_path / "reports"
    command = ["mlflow", "run", ".", "-e", "main", "--env-manager", "local", "--experiment-name", "tutorial",
               "-P", f"data_dir={data}", "-P", "datasets=cifar10", "-P", "epochs=1", "-P", "limit=0",
               "-P", "trials=2", "-P", f"output_dir={report}",
               "-P", "precision=float32"]  # auto's measurement has tests of its own (test_precision)
    done = subprocess.run(command, cwd=PROJECT_ROOT, env=python_env(), capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "=== [5/5] done" in done.stdout  # 2 trainings, a search, a promotion, the report

    client = mlflow.MlflowClient()
    experiment = client.get_experiment_by_name("tutorial")
    runs = client.search_runs([experiment.experiment_id], max_results=1000)
    [parent] = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert parent.info.status == "FINISHED" and parent.data.metrics["failed_steps"] == 0
    steps = sorted((r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id),
                   key=lambda r: int(r.data.tags["pipeline_step"]))
    assert [r.data.tags["pipeline_step"] for r in steps] == [str(n) for n in range(1, 6)]
    assert all(r.info.status == "FINISHED" for r in runs)
    trained = [(r.data.tags.get("dataset"), r.data.tags.get("arch")) for r in steps[:2]]
    assert trained == [("cifar10", "cnn_simple"), ("cifar10", "cnn_deep")]
    assert all("test_accuracy" in r.data.metrics for r in steps[:2])
    assert [r.data.params["precision_chosen"] for r in steps[:2]] == ["float32"] * 2  # the pipeline's precision
    search = steps[2]
    assert search.data.tags["search_role"] == "parent"
    trials = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == search.info.run_id]
    assert sum(r.data.tags.get("search_role") == "trial" for r in trials) == 2
    [retrained] = [r for r in trials if r.data.tags.get("best") == "true"]
    champion = client.get_model_version_by_alias("cifar10", "champion")  # the best of the three, promoted
    best = max((*steps[:2], retrained), key=lambda r: r.data.metrics["test_accuracy"])
    assert float(champion.tags["test_accuracy"]) == best.data.metrics["test_accuracy"]

    written = (report / "tutorial_vs_ours.md").read_text()
    assert "| mnist | mlp | about 97% | not run |" in written and "| cifar10 | cnn_deep | 78-80% |" in written
    artifacts = {f.path for f in client.list_artifacts(parent.info.run_id, "report")}
    # The champion is convolutional: its Grad-CAM plot sits beside the report, linked from it.
    assert artifacts == {"report/tutorial_vs_ours.md", "report/tutorial_vs_ours.png", "report/gradcam_cifar10.png"}
    assert "[gradcam_cifar10.png](gradcam_cifar10.png)" in written
    table = json.load(open(client.download_artifacts(parent.info.run_id, "steps.json")))
    assert [row[1] for row in table["data"]] == ["FINISHED"] * 5
    results = [row[3] for row in table["data"]]  # each training's and the search's test accuracy, from its run
    figures = [f"test_accuracy={r.data.metrics['test_accuracy']:.4f}" for r in (*steps[:2], retrained)]
    assert results[:3] == figures


def test_bad_settings_fail_in_one_line_before_any_run(capsys):
    assert main(["--datasets", "mnist,imagenet"]) == 2
    assert main(["--epochs", "0"]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line]
    assert errors == ["error: unknown datasets imagenet; the tutorial's are mnist, cifar10, imagenette",
                      "error: epochs must be positive, got 0"]
    assert not mlflow.search_runs(search_all_experiments=True, output_format="list")
