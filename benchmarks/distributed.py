"""What MultiWorkerMirroredStrategy costs: the same training on 1 worker and on 2 workers of this machine.

    python -m benchmarks run multi_worker data_dir=../shared/data

Each training is a fresh process, timed whole (TensorFlow's start, joining the cluster, training,
evaluation, logging): `python -m experiments.train` for one worker, `python -m experiments.distributed
--workers 2 --` for two, with the same arguments (the global batch and the learning rate stay the
same). Each logs into a child run of the benchmark's run. On a 2-core machine the two workers share
the cores, so no speed-up is expected: the ratio is the engine's overhead (gradient all-reduce over
loopback, two TensorFlow processes), which on real machines each worker pays once per step.
"""

from __future__ import annotations

import subprocess
import sys
import time

from benchmarks.harness import PROJECT_ROOT, benchmark


def timed_training(command: list[str], name: str, env: dict) -> dict:
    """Run one training into a new child run of the active run; its wall time, per-epoch time and test figures."""
    import mlflow

    parent = mlflow.active_run()
    client = mlflow.MlflowClient()
    child = client.create_run(parent.info.experiment_id, run_name=name, tags={"mlflow.parentRunId": parent.info.run_id})
    start = time.perf_counter()
    done = subprocess.run(command, cwd=PROJECT_ROOT, env={**env, "MLFLOW_RUN_ID": child.info.run_id},
                          capture_output=True, text=True)
    wall = time.perf_counter() - start
    mlflow.log_text(done.stdout + done.stderr, f"output/{name.replace(' ', '_')}.out")
    if done.returncode:
        raise RuntimeError(f"{name} exited with {done.returncode}: {done.stderr.strip().splitlines()[-1:]}")
    run = client.get_run(child.info.run_id)
    # An epoch's time: between the loss logged at its end and the previous epoch's (the first, which
    # includes tracing and the workers joining, is left out).
    logged = sorted(m.timestamp for m in client.get_metric_history(child.info.run_id, "loss"))
    gaps = [(later - earlier) / 1000 for earlier, later in zip(logged, logged[1:])]
    return {"workers": name, "wall_s": wall, "epoch_s_after_first": sum(gaps) / len(gaps) if gaps else float("nan"),
            "test_accuracy": run.data.metrics["test_accuracy"], "replicas": run.data.params.get("replicas", ""),
            "run_id": child.info.run_id}


@benchmark("multi_worker", "One training on 1 worker against 2 workers of this machine (MultiWorkerMirroredStrategy "
           "over loopback): the same recipe, global batch and epochs")
def multi_worker(dataset: str = "cifar10", arch: str = "cnn_deep", epochs: int = 4, limit: int = 10000,
                 batch_size: int = 128, precision: str = "auto", data_dir: str = "") -> list[dict]:
    import os

    from experiments import precision as precisions
    from experiments.train import TrainConfig, load_data

    config = TrainConfig(dataset=dataset, arch=arch, epochs=epochs, limit=limit, batch_size=batch_size,
                         precision=precision, data_dir=data_dir)
    config.validate()
    # Decoded and, for `auto`, the precision measured (and cached) here: neither timed run pays for them.
    print(f"precision: {precisions.for_training(config, load_data(config).spec).reason}", flush=True)
    train_args = ["--dataset", dataset, "--arch", arch, "--epochs", str(epochs), "--limit", str(limit),
                  "--batch-size", str(batch_size), "--precision", precision, "--data-dir", data_dir]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    one = timed_training([sys.executable, "-m", "experiments.train", *train_args], "1 worker", env)
    two = timed_training([sys.executable, "-m", "experiments.distributed", "--workers", "2", "--", *train_args],
                         "2 workers", env)
    for row in (one, two):
        row["epoch_ratio_to_1"] = row["epoch_s_after_first"] / one["epoch_s_after_first"]
        row["wall_ratio_to_1"] = row["wall_s"] / one["wall_s"]
    return [one, two]
