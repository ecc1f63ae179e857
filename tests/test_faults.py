"""Real faults: a Ray worker process killed mid-merge, a node leaving the cluster; the
merge finishes anyway with output bit-identical to an undisturbed run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
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
            if "merge_unit" in " ".join(proc.cmdline()) or proc.name().startswith("ray::merge"):
                yield proc
        except psutil.Error:
            continue


def test_killed_worker_is_retried_bit_identical(ray_local, config_path, tmp_path):
    options = dict(num_workers=2, memory_per_worker=1024 * 1024)
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
    """A ray.cluster_utils.Cluster (head + two worker nodes, own processes); one worker node
    is removed mid-merge. Runs in a subprocess: the session's Ray stays untouched."""
    script = os.path.join(os.path.dirname(__file__), "scenario_lost_node.py")
    env = dict(os.environ, RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0")
    proc = subprocess.run([sys.executable, script, config_path, str(tmp_path)], capture_output=True, text=True,
                          timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout
    assert "removed a worker node mid-merge" in out and "finished:" in out
    assert out.index("removed a worker node mid-merge") < out.index("finished:")  # removed, then finished
    assert shard_bytes(str(tmp_path / "lost-node")) == shard_bytes(str(tmp_path / "calm"))
