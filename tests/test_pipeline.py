"""`mlflow run . -e main`: the tutorial end to end (trainings, a search, promotion, the report) as child runs."""

from __future__ import annotations

import json
import subprocess
import sys

import mlflow
from conftest import PROJECT_ROOT, make_npz, python_env

from experiments.pipeline import main


def test_main_entry_point_runs_every_step_as_a_child_run(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    make_npz(data / "mnist.npz")
    make_npz(data / "cifar10.npz", n_train=90, n_test=30, shape=(32, 32, 3), classes=3)
    report = tmp_path / "reports"
    command = ["mlflow", "run", ".", "-e", "main", "--env-manager", "local", "--experiment-name", "tutorial",
               "-P", f"data_dir={data}", "-P", "datasets=mnist,cifar10", "-P", "epochs=1", "-P", "limit=0",
               "-P", "trials=2", "-P", f"output_dir={report}"]
    done = subprocess.run(command, cwd=PROJECT_ROOT, env=python_env(), capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "=== [8/8] done" in done.stdout  # 4 trainings, a search, 2 promotions, the report

    client = mlflow.MlflowClient()
    experiment = client.get_experiment_by_name("tutorial")
    runs = client.search_runs([experiment.experiment_id], max_results=1000)
    [parent] = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert parent.info.status == "FINISHED" and parent.data.metrics["failed_steps"] == 0
    steps = sorted((r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id),
                   key=lambda r: int(r.data.tags["pipeline_step"]))
    assert [r.data.tags["pipeline_step"] for r in steps] == [str(n) for n in range(1, 9)]
    assert all(r.info.status == "FINISHED" for r in runs)
    trained = [(r.data.tags.get("dataset"), r.data.tags.get("arch")) for r in steps[:4]]
    assert trained == [("mnist", "mlp"), ("mnist", "cnn_simple"), ("cifar10", "cnn_simple"), ("cifar10", "cnn_deep")]
    assert all("test_accuracy" in r.data.metrics for r in steps[:4])
    search = steps[4]
    assert search.data.tags["search_role"] == "parent"
    trials = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == search.info.run_id]
    assert sum(r.data.tags.get("search_role") == "trial" for r in trials) == 2
    assert [r for r in trials if r.data.tags.get("best") == "true"]
    for name in ("mnist", "cifar10"):  # each promoted: its best run is the champion
        champion = client.get_model_version_by_alias(name, "champion")
        best = max((r for r in runs if r.data.tags.get("dataset") == name and "test_accuracy" in r.data.metrics
                    and r.data.tags.get("search_role") != "trial"), key=lambda r: r.data.metrics["test_accuracy"])
        assert float(champion.tags["test_accuracy"]) == best.data.metrics["test_accuracy"]

    assert "| mnist | mlp | about 97% |" in (report / "tutorial_vs_ours.md").read_text()
    artifacts = {f.path for f in client.list_artifacts(parent.info.run_id, "report")}
    assert artifacts == {"report/tutorial_vs_ours.md", "report/tutorial_vs_ours.png"}
    table = json.load(open(client.download_artifacts(parent.info.run_id, "steps.json")))
    assert [row[1] for row in table["data"]] == ["FINISHED"] * 8


def test_bad_settings_fail_in_one_line_before_any_run(capsys):
    assert main(["--datasets", "mnist,imagenet"]) == 2
    assert main(["--epochs", "0"]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line]
    assert errors == ["error: unknown datasets imagenet; the tutorial's are mnist, cifar10, imagenette",
                      "error: epochs must be positive, got 0"]
    assert not mlflow.search_runs(search_all_experiments=True, output_format="list")
