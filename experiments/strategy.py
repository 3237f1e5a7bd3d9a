"""Data-parallel training on tf.distribute: which strategy a training runs under, and the cluster it spans.

- `auto`: MirroredStrategy when more than one GPU is visible, else TensorFlow's default (one device);
- `mirrored`: MirroredStrategy over this machine's devices;
- `multi_worker`: MultiWorkerMirroredStrategy over the workers of TF_CONFIG, or of `--workers
  host:port,... --worker-index N` (which build TF_CONFIG). Worker 0 is the chief.

Everything here is checked before a run exists, and bad input is one UserError line.
"""

from __future__ import annotations

import dataclasses
import json
import os
import socket

from experiments.errors import UserError

STRATEGIES = ("auto", "mirrored", "multi_worker")


@dataclasses.dataclass(frozen=True)
class Cluster:
    """The workers of a multi-worker training, as host:port, and which one this process is."""

    workers: tuple[str, ...]
    index: int

    @property
    def is_chief(self) -> bool:
        return self.index == 0

    def tf_config(self) -> str:
        return json.dumps({"cluster": {"worker": list(self.workers)}, "task": {"type": "worker", "index": self.index}})


def parse_address(address: str) -> tuple[str, int]:
    host, _, port = address.strip().rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise UserError(f"worker address {address!r} is not host:port (a port 1-65535), e.g. 127.0.0.1:12345")
    return host, int(port)


def cluster_from_workers(workers: str, index: int) -> Cluster:
    """The cluster of `--workers host:port,... --worker-index N`."""
    addresses = tuple(address.strip() for address in workers.split(",") if address.strip())
    if not addresses:
        raise UserError("--workers is empty: give host:port of every worker, the chief's first")
    for address in addresses:
        parse_address(address)
    if len(set(addresses)) != len(addresses):
        raise UserError(f"--workers lists an address twice: {','.join(addresses)}")
    if not 0 <= index < len(addresses):
        raise UserError(f"--worker-index {index} is outside the {len(addresses)} workers of --workers "
                        f"(0 to {len(addresses) - 1}; 0 is the chief)")
    return Cluster(addresses, index)


def cluster_from_tf_config(text: str) -> Cluster:
    """The cluster TF_CONFIG describes: its `chief` (if any) then its `worker`s, in that order."""
    try:
        config = json.loads(text)
        cluster, task = config["cluster"], config["task"]
        workers = list(cluster.get("chief", [])) + list(cluster.get("worker", []))
        offset = len(cluster.get("chief", [])) if task["type"] == "worker" else 0
        if task["type"] not in ("chief", "worker"):
            raise UserError(f"TF_CONFIG task type {task['type']!r} is not chief or worker; parameter servers "
                            "are not supported")
        return cluster_from_workers(",".join(workers), offset + int(task.get("index", 0)))
    except json.JSONDecodeError as exc:
        raise UserError(f"TF_CONFIG is not valid JSON ({exc.msg} at character {exc.pos}); "
                        'expected {"cluster": {"worker": [...]}, "task": {"type": "worker", "index": N}}') from None
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise UserError(f"TF_CONFIG lacks {exc}: expected "
                        '{"cluster": {"worker": ["host:port", ...]}, "task": {"type": "worker", "index": N}}') from None


def resolve(strategy: str, workers: str = "", worker_index: int = 0, environ=os.environ) -> Cluster | None:
    """The cluster of a `multi_worker` training (None for the others), from --workers, else TF_CONFIG."""
    if strategy not in STRATEGIES:
        raise UserError(f"unknown strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}")
    if strategy != "multi_worker":
        if workers:
            raise UserError(f"--workers needs --strategy multi_worker, not {strategy}")
        return None
    if workers:
        return cluster_from_workers(workers, worker_index)
    if environ.get("TF_CONFIG"):
        return cluster_from_tf_config(environ["TF_CONFIG"])
    raise UserError("--strategy multi_worker needs its workers: set TF_CONFIG, or pass --workers "
                    "host:port,host:port --worker-index N (the same list on every worker, the chief first)")


def choose(strategy: str, gpus: int) -> str:
    """The tf.distribute strategy to build: "default" (one device), "mirrored" or "multi_worker"."""
    if strategy == "auto":
        return "mirrored" if gpus > 1 else "default"
    return strategy


def check_port_free(cluster: Cluster) -> None:
    """This worker's own port must be free before TensorFlow's server takes it."""
    host, port = parse_address(cluster.workers[cluster.index])
    with socket.socket() as sock:
        try:
            sock.bind((host, port))
        except OSError as exc:
            raise UserError(f"worker {cluster.index}'s address {host}:{port} cannot be used "
                            f"({exc.strerror or exc}): is another training or server on port {port}? "
                            "Pick free ports in --workers") from None


def check_batch(batch_size: int, replicas: int) -> int:
    """The per-replica batch; the global `batch_size` must split evenly over the replicas."""
    if batch_size % replicas:
        raise UserError(f"batch_size {batch_size} does not split evenly over {replicas} replicas; use a "
                        f"multiple of {replicas} (e.g. {batch_size - batch_size % replicas or replicas})")
    return batch_size // replicas


def build(kind: str, cluster: Cluster | None):
    """The tf.distribute strategy of `choose()`'s `kind`; a multi-worker one joins `cluster` (blocking
    until every worker has started)."""
    import tensorflow as tf

    if kind == "default":
        return tf.distribute.get_strategy()
    if kind == "mirrored":
        return tf.distribute.MirroredStrategy()
    os.environ["TF_CONFIG"] = cluster.tf_config()
    patch_keras_for_multi_worker()
    return tf.distribute.MultiWorkerMirroredStrategy()


def patch_keras_for_multi_worker() -> None:
    """Two fixes to Keras 3's TensorFlow trainer under MultiWorkerMirroredStrategy (keras-team/keras#20585,
    open since TF 2.16; checked on Keras 3.15), without which model.fit fails on its first step:

    - before its first step it all-reduces the first data batch across workers to get an example batch
      to build from (`_maybe_symbolic_build`), which a collective cannot do with per-replica images; the
      local replica's batch is as good an example;
    - it averages each step's scalar loss and metrics with `reduce("MEAN", axis=0)`, and a scalar has no
      axis 0; a scalar is averaged over the replicas instead.
    """
    from keras import tree
    from keras.src.backend.tensorflow import trainer

    global _patched
    if _patched:
        return
    import tensorflow as tf

    def multi_worker(distributed) -> bool:
        return isinstance(distributed, tf.distribute.MultiWorkerMirroredStrategy)

    build_from_batch, reduce_per_replica = trainer.TensorFlowTrainer._maybe_symbolic_build, trainer.reduce_per_replica

    def maybe_symbolic_build(self, iterator=None, data_batch=None):
        if iterator is None or not multi_worker(self.distribute_strategy):
            return build_from_batch(self, iterator=iterator, data_batch=data_batch)
        local = self.distribute_strategy.experimental_local_results
        for _, _, batches in iterator:
            data_batch = tree.map_structure(
                lambda v: local(v)[0] if isinstance(v, tf.distribute.DistributedValues) else v, next(batches))
            break
        with self.distribute_strategy.scope():
            self._symbolic_build(data_batch=data_batch)

    def reduce_scalars_too(values, strategy, reduction="auto"):
        if reduction not in ("auto", "mean") or not multi_worker(strategy):
            return reduce_per_replica(values, strategy, reduction)

        def mean(value):
            shape = (strategy.experimental_local_results(value)[0]
                     if isinstance(value, tf.distribute.DistributedValues) else value).shape
            return strategy.reduce("MEAN", value, axis=0 if len(shape) else None)

        return tree.map_structure(mean, values)

    trainer.TensorFlowTrainer._maybe_symbolic_build = maybe_symbolic_build
    trainer.reduce_per_replica = reduce_scalars_too
    _patched = True


_patched = False  # patch_keras_for_multi_worker() has run in this process
