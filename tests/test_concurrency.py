"""Three tuner workers and two training runs at once against one `mlflow server`: nothing lost, no locks;
then, on PostgreSQL, a promotion, and the champion served from the server's proxied artifact store."""

from __future__ import annotations

import subprocess
import sys

import mlflow
import numpy as np
import pytest
from conftest import PROJECT_ROOT, TrackingServer, python_env

EPOCHS = 3


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
@pytest.mark.slow
def test_tuner_workers_and_training_runs_share_one_server(backend, tmp_path, tiny_cifar, request, empty_store):
    store = request.getfixturevalue("postgres_uri") if backend == "postgresql" else None
    server = TrackingServer(tmp_path / "server", empty_store, backend_uri=store).start()
    try:
        env = {**python_env(), "MLFLOW_TRACKING_URI": server.uri}
        logs = {}

        def start(name, argv):
            logs[name] = tmp_path / f"{name}.log"
            return subprocess.Popen([sys.executable, *argv], cwd=PROJECT_ROOT, env=env, stdout=open(logs[name], "w"),
                                    stderr=subprocess.STDOUT)

        processes = {
            "search": start("search", ["-m", "tuning.distributed", "--workers", "3", "--", "--dataset", "cifar10",
                                       "--tuner", "random", "--max-trials", "6", "--max-epochs", "1",
                                       "--data-dir", str(tiny_cifar), "--search-name", "crowd"]),
            **{f"train{n}": start(f"train{n}", ["-m", "experiments.train", "--dataset", "cifar10", "--arch",
                                                "cnn_simple", "--epochs", str(EPOCHS), "--batch-size", "16",
                                                "--seed", str(n), "--data-dir", str(tiny_cifar)])
               for n in (1, 2)},
        }
        codes = {name: process.wait(timeout=900) for name, process in processes.items()}
        outputs = {name: path.read_text() for name, path in logs.items()}
        errors = {n: [line[:300] for line in outputs[n].splitlines() if "Error" in line or "error:" in line][-6:]
                  for n, code in codes.items() if code}
        assert codes == dict.fromkeys(processes, 0), errors
        assert not any("database is locked" in text for text in outputs.values())

        client = mlflow.MlflowClient(server.uri, registry_uri=server.uri)
        runs = client.search_runs([e.experiment_id for e in client.search_experiments()], max_results=1000)
        trials = [r for r in runs if r.data.tags.get("search_role") == "trial"]
        assert sorted(r.data.tags["trial_id"] for r in trials) == [str(n) for n in range(6)]  # each exactly once
        [parent] = [r for r in runs if r.data.tags.get("search_role") == "parent"]
        assert {r.data.tags["mlflow.parentRunId"] for r in trials} == {parent.info.run_id}
        trained = [r for r in runs if r.data.tags.get("arch") == "cnn_simple" and "search_role" not in r.data.tags]
        assert len(trained) == 2
        for run in trained:
            assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "accuracy")) == list(range(EPOCHS))
        assert all(r.info.status == "FINISHED" for r in runs)

        if backend == "sqlite":  # the registry on a shared server is the team setup's, PostgreSQL's
            return
        # The registry on the same server: the best of the trainings and the search's retrained best.
        promoted = subprocess.run([sys.executable, "-m", "registry.promote", "--dataset", "cifar10"], cwd=PROJECT_ROOT,
                                  env=env, capture_output=True, text=True, timeout=600)
        assert promoted.returncode == 0, promoted.stderr[-2000:]
        candidates = trained + [r for r in runs if r.data.tags.get("best") == "true"]
        assert len(candidates) == 3
        champion = client.get_model_version_by_alias("cifar10", "champion")
        best = max(candidates, key=lambda r: (r.data.metrics["test_accuracy"], r.info.start_time))
        assert float(champion.tags["test_accuracy"]) == pytest.approx(best.data.metrics["test_accuracy"])
        assert champion.tags["source_run"] in {r.info.run_id for r in candidates
                                               if r.data.metrics["test_accuracy"] == best.data.metrics["test_accuracy"]}
        mlflow.set_tracking_uri(server.uri)
        mlflow.set_registry_uri(server.uri)
        served = mlflow.pyfunc.load_model("models:/cifar10@champion")  # through the server's artifact proxy
        records = served.predict(np.zeros((2, 32, 32, 3), np.uint8))
        assert len(records) == 2 and {"label", "confidence"} <= set(records[0])
    finally:
        server.stop()


def test_a_worker_that_loses_the_race_to_create_the_experiment_joins_it(tmp_path, monkeypatch):
    """Two workers both find no experiment; the second one's create fails on the unique name. It must
    take the first one's experiment, not die (this failed on PostgreSQL in CI)."""
    from experiments.tracking import use_experiment

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    lookup = mlflow.get_experiment_by_name

    def other_worker_wins(name):  # this worker looks first and finds nothing; the other creates it now
        monkeypatch.setattr(mlflow, "get_experiment_by_name", lookup)
        winner = mlflow.MlflowClient(uri).create_experiment(name)
        other_worker_wins.winner = winner
        return None

    monkeypatch.setattr(mlflow, "get_experiment_by_name", other_worker_wins)
    assert use_experiment("cifar10") == other_worker_wins.winner
    with mlflow.start_run() as run:  # the loser's runs go into the winner's experiment, not Default
        assert run.info.experiment_id == other_worker_wins.winner
    assert [e.name for e in mlflow.MlflowClient(uri).search_experiments()] == ["cifar10", "Default"]
