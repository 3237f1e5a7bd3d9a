"""Run one search as a Keras Tuner chief and N workers on this machine, all logging to one MLflow server.

    export MLFLOW_TRACKING_URI=http://127.0.0.1:5000     # a shared `mlflow server`
    python -m tuning.distributed --workers 2 -- --dataset cifar10 --tuner random --max-trials 12

Everything after `--` is passed to `python -m tuning.search`. The launcher creates (or, to resume,
finds) the search's parent run, then starts the chief (Keras Tuner's oracle, which hands out
trials, then summarizes and retrains the best) and the workers (which run the trials), each
logging its trials as child runs of that parent.

On several machines, start the same `python -m tuning.search ...` command on each, with
  KERASTUNER_ORACLE_IP / KERASTUNER_ORACLE_PORT   the chief's address and a free port on it,
  KERASTUNER_TUNER_ID                             `chief` on one machine, `tuner0`, `tuner1`... elsewhere,
  MLFLOW_TRACKING_URI                             the shared tracking server,
  CNN_TUNER_DIR                                   a folder every machine mounts (Hyperband reloads
                                                  checkpoints another worker wrote),
and the same search arguments. Start the chief first: it creates the parent run, and workers wait
up to 5 minutes for it. Workers never delete the tuner folder; the search only ever resumes.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys

from experiments.cli import run_main
from experiments.errors import UserError
from experiments.network import free_port


def launch(workers: int, search_args: list[str], host: str = "127.0.0.1", port: int = 0) -> int:
    """Start the chief and `workers` workers; wait for all; return the worst exit code."""
    import mlflow

    from experiments.tracking import connect
    from tuning.search import check_search_state, parse_args
    from tuning.tracking import PARENT_RUN_ENV, resolve_parent

    if workers < 1:
        raise UserError(f"workers must be at least 1, got {workers}")
    config = parse_args(search_args)
    config.validate()
    check_search_state(config)
    connect()
    parent_id, _ = resolve_parent(config)
    base_env = {
        **os.environ,
        PARENT_RUN_ENV: parent_id,
        "KERASTUNER_ORACLE_IP": host,
        "KERASTUNER_ORACLE_PORT": str(port or free_port(host)),
    }
    command = [sys.executable, "-m", "tuning.search", *search_args]
    roles = ["chief"] + [f"tuner{i}" for i in range(workers)]
    print(f"search {config.search_name}: parent run {parent_id}, chief + {workers} worker(s) on "
          f"{host}:{base_env['KERASTUNER_ORACLE_PORT']}", flush=True)
    processes = [subprocess.Popen(command, env={**base_env, "KERASTUNER_TUNER_ID": role}) for role in roles]

    def stop(signum, frame):
        for process in processes:
            process.terminate()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    codes = [process.wait() for process in processes]
    status = "FINISHED" if not any(codes) else "FAILED"
    client = mlflow.MlflowClient()
    if client.get_run(parent_id).info.status == "RUNNING":
        client.set_terminated(parent_id, status)
    for role, code in zip(roles, codes):
        if code:
            print(f"{role} exited with code {code}", file=sys.stderr)
    return max(codes, key=abs)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    own, search_args = (argv[: argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [])
    parser = argparse.ArgumentParser(prog="python -m tuning.distributed", description=__doc__.splitlines()[0],
                                     epilog="arguments after -- go to python -m tuning.search")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--host", default="127.0.0.1", help="the chief's address (loopback by default)")
    parser.add_argument("--port", type=int, default=0, help="the chief's port (0: a free one)")
    args = parser.parse_args(own)
    return run_main(lambda: launch(args.workers, search_args, args.host, args.port))


if __name__ == "__main__":
    sys.exit(main())
