"""Real faults: a Ray worker process killed mid-merge, a node leaving the cluster; the
merge finishes anyway with output bit-identical to an undisturbed run."""

from __future__ import annotations

import os
import signal
import threading
import time

import psutil
import pytest
import torch

import distmerge
from distmerge.synthetic import LlamaShape, ties_config
from helpers import shard_bytes, write_yaml

SHAPE = LlamaShape(hidden=128, intermediate=344, layers=6, heads=4, kv_heads=2, vocab=2048)


@pytest.fixture(scope="module")
def config_path(model_factory, tmp_path_factory):
    paths = model_factory(torch.bfloat16, shape=SHAPE)
    return write_yaml(str(tmp_path_factory.mktemp("faults") / "merge.yml"), ties_config(paths))


def _merge_workers():
    for proc in psutil.Process().children(recursive=True):
        try:
            if "apply_unit" in " ".join(proc.cmdline()) or proc.name().startswith("ray::apply"):
                yield proc
        except psutil.Error:
            continue


def test_killed_worker_is_retried_bit_identical(ray_local, config_path, tmp_path):
    options = dict(num_workers=2, memory_per_worker=64 * 1024)
    distmerge.merge(config_path, str(tmp_path / "calm"), **options)
    killed = []

    def kill_one_worker():
        deadline = time.time() + 60
        while time.time() < deadline and not killed:
            for proc in _merge_workers():
                os.kill(proc.pid, signal.SIGKILL)
                killed.append(proc.pid)
                return
            time.sleep(0.005)

    killer = threading.Thread(target=kill_one_worker)
    killer.start()
    distmerge.merge(config_path, str(tmp_path / "killed"), **options)
    killer.join()
    assert killed, "no merge worker was seen to kill"
    assert shard_bytes(str(tmp_path / "killed")) == shard_bytes(str(tmp_path / "calm"))


def test_node_leaving_the_cluster(config_path, tmp_path):
    """A two-node ray.cluster_utils.Cluster; the worker node is removed mid-merge."""
    import ray
    from ray.cluster_utils import Cluster

    from distmerge.engine.session import force_loopback

    if ray.is_initialized():
        pytest.skip("needs its own Ray; run separately from the session-wide instance")
    force_loopback()
    cluster = Cluster(initialize_head=True, head_node_args=dict(
        num_cpus=0, object_store_memory=200 * 2**20, include_dashboard=False))
    try:
        worker = cluster.add_node(num_cpus=2, object_store_memory=200 * 2**20)
        cluster.add_node(num_cpus=1, object_store_memory=200 * 2**20)
        ray.init(address=cluster.address)
        cluster.wait_for_nodes()
        distmerge.merge(config_path, str(tmp_path / "calm"), num_workers=2, memory_per_worker=64 * 1024)
        removed = []

        def remove_soon():
            time.sleep(1.0)
            cluster.remove_node(worker)
            removed.append(True)

        remover = threading.Thread(target=remove_soon)
        remover.start()
        distmerge.merge(config_path, str(tmp_path / "lost-node"), num_workers=2, memory_per_worker=16 * 1024)
        remover.join()
        assert removed
        assert shard_bytes(str(tmp_path / "lost-node")) == shard_bytes(str(tmp_path / "calm"))
    finally:
        ray.shutdown()
        cluster.shutdown()
