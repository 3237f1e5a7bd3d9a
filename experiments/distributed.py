"""Run one training on N workers of this machine under MultiWorkerMirroredStrategy, tracked as one MLflow run.

    python -m experiments.distributed --workers 2 -- --dataset cifar10 --arch cnn_modern --epochs 30

Everything after `--` is passed to `python -m experiments.train`. The launcher picks N free loopback
ports, starts worker 0 (the chief: it alone tracks, checkpoints, evaluates and logs the model) and the
others, and returns the chief's exit code. If a worker fails, it stops the others and exits non-zero.
A killed training resumes with the same command and `--resume true`.

On several machines, run `python -m experiments.train ... --strategy multi_worker --workers
host1:port,host2:port --worker-index N` on each (the same list everywhere, the chief's first), with
MLFLOW_TRACKING_URI pointing at a shared server and CNN_CACHE_DIR on a filesystem every machine
mounts (the chief's checkpoints are read by every worker to resume). See docs/distributed.md.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time

from experiments.cli import run_main
from experiments.errors import UserError
from experiments.network import free_port
from experiments.strategy import check_batch

OWN_FLAGS = ("--strategy", "--workers", "--worker-index")  # the launcher sets these for each worker


def worker_addresses(workers: int, host: str) -> list[str]:
    ports: list[int] = []
    while len(ports) < workers:  # distinct: the OS may hand the same free port out twice
        port = free_port(host)
        if port not in ports:
            ports.append(port)
    return [f"{host}:{port}" for port in ports]


def launch(workers: int, train_args: list[str], host: str = "127.0.0.1") -> int:
    """Start `workers` training processes, wait for all; the chief's exit code, or a failed worker's."""
    from experiments import precision
    from experiments.datasets import load_data
    from experiments.train import parse_args

    if workers < 1:
        raise UserError(f"--workers must be at least 1, got {workers}")
    given = [flag for flag in train_args if flag.split("=")[0] in OWN_FLAGS]
    if given:
        raise UserError(f"{given[0].split('=')[0]} is the launcher's to set; drop it from the training arguments")
    config, _ = parse_args(train_args)
    config.validate()  # a bad setting fails once, here, not once per worker
    check_batch(config.batch_size, workers)
    # Decoded and the precision chosen once, here (`auto` measures and caches it): the workers, which share
    # this machine's cache, then train in the same precision instead of timing each other's load.
    precision.for_training(config, load_data(config).spec)
    addresses = worker_addresses(workers, host)
    print(f"training {config.arch} on {config.dataset} on {workers} workers: {', '.join(addresses)} "
          "(worker 0 is the chief)", flush=True)
    command = [sys.executable, "-m", "experiments.train", *train_args, "--strategy", "multi_worker",
               "--workers", ",".join(addresses)]
    # Under `mlflow run` (MLFLOW_RUN_ID set) the chief logs into that run; the other workers log nothing.
    worker_env = {name: value for name, value in os.environ.items() if name != "MLFLOW_RUN_ID"}
    processes = [subprocess.Popen([*command, "--worker-index", str(index)], env=None if index == 0 else worker_env)
                 for index in range(workers)]

    def stop(signum=None, frame=None):
        for process in processes:
            if process.poll() is None:
                process.terminate()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    while True:
        codes = [process.poll() for process in processes]
        failed = [index for index, code in enumerate(codes) if code]
        if failed:
            stop()
            for process in processes:
                try:
                    process.wait(timeout=30)
                except subprocess.TimeoutExpired:  # stuck in a collective op that will never finish
                    process.kill()
                    process.wait()
            index = failed[0]
            raise UserError(f"worker {index} ({addresses[index]}) exited with code {codes[index]}; stopped the "
                            "others. Fix its error above, then rerun with --resume true to continue", max(1, codes[index]))
        if all(code == 0 for code in codes):
            return 0
        time.sleep(0.5)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    own, train_args = (argv[: argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [])
    parser = argparse.ArgumentParser(prog="python -m experiments.distributed", description=__doc__.splitlines()[0],
                                     epilog="arguments after -- go to python -m experiments.train")
    parser.add_argument("--workers", type=int, default=2, help="training processes on this machine (default 2)")
    parser.add_argument("--host", default="127.0.0.1", help="the address they listen on (loopback by default)")
    args = parser.parse_args(own)
    return run_main(lambda: launch(args.workers, train_args, args.host))


if __name__ == "__main__":
    sys.exit(main())
