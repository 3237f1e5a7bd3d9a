"""Data-parallel training on tf.distribute: which strategy a training runs under, and the cluster it spans.

- `auto`: MirroredStrategy when more than one GPU is visible, else TensorFlow's default (one device);
- `mirrored`: MirroredStrategy over this machine's devices;
- `multi_worker`: MultiWorkerMirroredStrategy over the workers of TF_CONFIG, or of `--workers
  host:port,... --worker-index N` (which build TF_CONFIG). Worker 0 is the chief.

Everything here is checked before a run exists, and bad input is one UserError line.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import socket

from experiments.errors import UserError
from experiments.tracking import launched_run_id

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


def add_flags(parser) -> None:
    """--strategy, --workers and --worker-index, for a command that trains."""
    parser.add_argument("--strategy", default="auto", help=f"one of: {', '.join(STRATEGIES)} (auto: mirrored over "
                        "several GPUs, else one device)")
    parser.add_argument("--workers", default="", help="multi_worker: host:port of every worker, the chief's first "
                        "(else TF_CONFIG)")
    parser.add_argument("--worker-index", type=int, default=0, help="multi_worker: this worker's place in --workers")


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


@dataclasses.dataclass
class Distribution:
    """The strategy a training runs under, and this process's place in it."""

    requested: str  # as given: auto, mirrored or multi_worker
    kind: str  # as built: default, mirrored or multi_worker
    strategy: object  # the tf.distribute strategy
    cluster: Cluster | None  # multi_worker only
    batch_size: int  # the global batch

    @property
    def is_chief(self) -> bool:
        """Only the chief (worker 0, or the only process) tracks the run, checkpoints and evaluates."""
        return self.cluster is None or self.cluster.is_chief

    @property
    def replicas(self) -> int:
        return self.strategy.num_replicas_in_sync

    def scope(self):
        """Where the model is built and compiled; TensorFlow's default strategy needs none."""
        return contextlib.nullcontext() if self.kind == "default" else self.strategy.scope()

    def finish(self, model):
        """End of training, on every worker: prints this worker's weights digest (the same on every worker of
        a synchronous strategy) and returns the model the chief predicts with. A multi-worker model's predict
        is a collective op that every worker would have to join, so the chief predicts with a copy made
        outside the strategy; saving it is a collective op too, hence on every worker."""
        if self.kind != "multi_worker":
            return model
        from experiments.checkpoints import throwaway_save

        print(f"worker {self.cluster.index} of {len(self.cluster.workers)}: training done, weights "
              f"{weights_digest(model)}", flush=True)
        if self.is_chief:
            return throwaway_save(model, load=True)
        throwaway_save(model)
        self.barrier()  # until the chief has evaluated and logged: a worker leaving early alarms its coordinator
        return model

    def barrier(self) -> None:
        """Every worker waits here until all have reached it (a one-number all-reduce); the chief reaches it
        when its run is complete."""
        if self.kind == "multi_worker":
            import tensorflow as tf

            self.strategy.reduce("SUM", self.strategy.run(lambda: tf.constant(1.0)), axis=None)

    def params(self) -> dict:
        return {"strategy": self.requested, "strategy_built": self.kind,
                "num_workers": len(self.cluster.workers) if self.cluster else 1, "replicas": self.replicas,
                "global_batch_size": self.batch_size, "per_replica_batch_size": self.batch_size // self.replicas}


def prepare(requested: str, workers: str, worker_index: int, batch_size: int, single: bool = False,
            gpus: int | None = None) -> Distribution:
    """Check the settings, join the cluster (a multi-worker training waits here for every worker) and check
    the batch against the replicas: before any other TensorFlow op, as MultiWorkerMirroredStrategy needs,
    and before any run exists. `single`: a training that must run on one device (a tuner trial's prebuilt
    model, a head on cached features)."""
    cluster = resolve(requested, workers, worker_index)
    if single and requested != "auto":
        raise UserError(f"--strategy {requested} needs a model train() builds: a tuner trial's model and a head on "
                        "cached features train on one device; leave strategy at auto")
    if cluster and not cluster.is_chief and launched_run_id():
        raise UserError(f"worker {cluster.index} runs under `mlflow run`, which gave it an MLflow run of its own; "
                        "start the workers other than the chief with `python -m experiments.train ...`")
    if cluster:
        check_port_free(cluster)
    if single:
        gpus = 0
    if gpus is None:
        import tensorflow as tf

        gpus = len(tf.config.list_physical_devices("GPU"))
    kind = choose(requested, gpus)
    # Checked before joining, so that every worker fails at once: one replica per GPU, or per worker on CPUs.
    check_batch(batch_size, 1 if kind == "default" else (len(cluster.workers) if cluster else 1) * max(1, gpus))
    if cluster:
        print(f"worker {cluster.index} of {len(cluster.workers)} ({cluster.workers[cluster.index]}): waiting for "
              "every worker to join", flush=True)
    distribution = Distribution(requested, kind, build(kind, cluster), cluster, batch_size)
    check_batch(batch_size, distribution.replicas)
    return distribution


def weights_digest(model) -> str:
    """sha256 of a model's weights, in order: equal digests, equal weights."""
    import hashlib

    digest = hashlib.sha256()
    for weight in model.get_weights():
        digest.update(weight.tobytes())
    return "sha256:" + digest.hexdigest()[:16]


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
