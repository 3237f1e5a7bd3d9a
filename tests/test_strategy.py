"""The strategy choice and the multi-worker cluster (experiments/strategy.py): parsing, every bad input in one
line, and Keras fit under MultiWorkerMirroredStrategy with two real workers on loopback."""

from __future__ import annotations

import json
import socket
import subprocess
import sys

import pytest

from conftest import PROJECT_ROOT, python_env
from experiments import strategy
from experiments.errors import UserError
from experiments.network import free_port


@pytest.mark.parametrize("requested, gpus, built", [
    ("auto", 0, "default"), ("auto", 1, "default"), ("auto", 2, "mirrored"),
    ("mirrored", 0, "mirrored"), ("multi_worker", 0, "multi_worker"), ("multi_worker", 4, "multi_worker"),
])
def test_auto_mirrors_only_over_several_gpus(requested, gpus, built):
    assert strategy.choose(requested, gpus) == built


def test_workers_build_tf_config_and_tf_config_is_read_back():
    cluster = strategy.resolve("multi_worker", "10.0.0.1:2222, 10.0.0.2:2222", 1)
    assert cluster == strategy.Cluster(("10.0.0.1:2222", "10.0.0.2:2222"), 1) and not cluster.is_chief
    assert json.loads(cluster.tf_config()) == {"cluster": {"worker": ["10.0.0.1:2222", "10.0.0.2:2222"]},
                                               "task": {"type": "worker", "index": 1}}
    assert strategy.resolve("multi_worker", environ={"TF_CONFIG": cluster.tf_config()}) == cluster
    # A chief entry comes first: it is worker 0 of the cluster.
    with_chief = {"cluster": {"chief": ["a:1"], "worker": ["b:2", "c:3"]}, "task": {"type": "worker", "index": 1}}
    assert strategy.resolve("multi_worker", environ={"TF_CONFIG": json.dumps(with_chief)}) == strategy.Cluster(
        ("a:1", "b:2", "c:3"), 2)
    assert strategy.resolve("auto", environ={"TF_CONFIG": cluster.tf_config()}) is None  # only multi_worker joins


@pytest.mark.parametrize("call, fragment", [
    (lambda: strategy.resolve("data_parallel"), "unknown strategy 'data_parallel'; choose one of auto, mirrored"),
    (lambda: strategy.resolve("multi_worker", environ={}), "--strategy multi_worker needs its workers: set TF_CONFIG"),
    (lambda: strategy.resolve("multi_worker", "127.0.0.1:1,127.0.0.1:2", 2), "--worker-index 2 is outside the 2 workers"),
    (lambda: strategy.resolve("multi_worker", "127.0.0.1:1,127.0.0.1:2", -1), "--worker-index -1 is outside"),
    (lambda: strategy.resolve("multi_worker", "127.0.0.1", 0), "worker address '127.0.0.1' is not host:port"),
    (lambda: strategy.resolve("multi_worker", "h:1,h:1", 0), "--workers lists an address twice"),
    (lambda: strategy.resolve("auto", "h:1,h:2", 0), "--workers needs --strategy multi_worker"),
    (lambda: strategy.resolve("multi_worker", environ={"TF_CONFIG": "{cluster: nope"}), "TF_CONFIG is not valid JSON"),
    (lambda: strategy.resolve("multi_worker", environ={"TF_CONFIG": "{}"}), "TF_CONFIG lacks 'cluster'"),
    (lambda: strategy.check_batch(100, 3), "batch_size 100 does not split evenly over 3 replicas; use a multiple of 3"),
])
def test_bad_cluster_settings_are_one_line_errors(call, fragment):
    with pytest.raises(UserError) as refused:
        call()
    assert fragment in str(refused.value) and "\n" not in str(refused.value)


def test_a_port_in_use_is_refused_before_tensorflow_takes_it():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        cluster = strategy.resolve("multi_worker", f"127.0.0.1:{port},127.0.0.1:{free_port()}", 0)
        with pytest.raises(UserError, match=f"127.0.0.1:{port} cannot be used .* Pick free ports in --workers"):
            strategy.check_port_free(cluster)
    strategy.check_port_free(cluster)  # free again
    assert strategy.check_batch(128, 2) == 64


SHARDING_WORKER = """
import sys
import numpy as np, tensorflow as tf
from experiments import fit, strategy
from experiments.datasets import Split
distributed = strategy.build("multi_worker", strategy.resolve("multi_worker", sys.argv[1], int(sys.argv[2])))
ids = np.arange(101)  # each image carries its number in its first two pixels
images = np.zeros((101, 4, 4, 1), np.uint8)
images[:, 0, 0, 0], images[:, 0, 1, 0] = ids % 256, ids // 256
split = Split(tf.data.Dataset.from_tensor_slices((images, ids % 3)), ids % 3, "digest")
batches = distributed.experimental_distribute_dataset(fit.make_batches(split, 32, 3, shuffle_seed=0))  # as Keras fit
for epoch in range(2):
    seen = [int(x[0, 0, 0]) + 256 * int(x[0, 1, 0]) for images, _ in batches
            for local in distributed.experimental_local_results(images) for x in local.numpy()]
    print("SEEN", epoch, *seen, flush=True)
"""


@pytest.mark.slow
def test_two_workers_share_each_epoch_without_seeing_an_image_twice():
    """fit.make_batches as Keras fit distributes it over two real workers: each epoch, the workers' images
    are disjoint and together the whole split, reshuffled from one epoch to the next."""
    workers = f"127.0.0.1:{free_port()},127.0.0.1:{free_port()}"
    processes = [subprocess.Popen([sys.executable, "-c", SHARDING_WORKER, workers, str(index)], cwd=PROJECT_ROOT,
                                  env=python_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for index in (0, 1)]
    outputs = [process.communicate(timeout=300) for process in processes]
    seen = {}
    for index, (process, (out, err)) in enumerate(zip(processes, outputs)):
        assert process.returncode == 0, err[-3000:]
        for line in out.splitlines():
            if line.startswith("SEEN "):
                epoch, *ids = map(int, line.split()[1:])
                seen[index, epoch] = ids
    for epoch in (0, 1):
        first, second = seen[0, epoch], seen[1, epoch]
        assert not set(first) & set(second) and sorted(first + second) == list(range(101))
        assert abs(len(first) - len(second)) <= 1  # an even share
    assert seen[0, 0] != seen[0, 1]  # reshuffled each epoch, the same way on both workers


def test_on_faked_gpus_auto_mirrors_and_trains_in_float16_without_timing_anything():
    """The GPU path none of our machines can run: with 2 GPUs, `auto` picks MirroredStrategy and
    precision `auto` picks float16 (issue 10), choosing without a timing."""
    from experiments import precision

    def no_timing(policy):
        raise AssertionError("a GPU's precision is not measured")

    assert strategy.choose("auto", 2) == "mirrored"
    assert precision.choose("auto", "net 32x32x3, batch 128", no_timing, gpus=2).precision == "float16"
