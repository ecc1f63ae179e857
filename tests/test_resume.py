"""Kill the driver (the `distmerge merge` process and its whole Ray) mid-merge; the same
command resumes, reusing the units already written, with a bit-identical result."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import psutil
import pytest
import torch

from distmerge.synthetic import LlamaShape, ties_config
from helpers import shard_bytes, write_yaml

SHAPE = LlamaShape(hidden=128, intermediate=344, layers=6, heads=4, kv_heads=2, vocab=2048)


def _cli(*args):
    env = dict(os.environ, RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0")
    return [sys.executable, "-m", "distmerge.cli", *args], env


def _kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL the process and every descendant (Ray's too), by pid."""
    try:
        family = psutil.Process(proc.pid).children(recursive=True)
    except psutil.Error:
        family = []
    for p in [psutil.Process(proc.pid)] + family:
        try:
            p.kill()
        except psutil.Error:
            pass
    proc.wait(timeout=30)
    psutil.wait_procs(family, timeout=30)


def _progress_lines(out) -> int:
    try:
        return len((out / ".distmerge-progress").read_text().split("\n")) - 1
    except OSError:
        return 0


@pytest.fixture(scope="module")
def config_path(model_factory, tmp_path_factory):
    paths = model_factory(torch.bfloat16, shape=SHAPE)
    return write_yaml(str(tmp_path_factory.mktemp("resume") / "merge.yml"), ties_config(paths))


def test_killed_driver_resumes_bit_identical(config_path, tmp_path):
    options = ["--num-workers", "1", "--memory-per-worker", "256KiB", "--no-progress", "--shard-size", "2MB"]
    cmd, env = _cli("merge", config_path, str(tmp_path / "calm"), *options)
    started = time.perf_counter()
    subprocess.run(cmd, env=env, check=True, capture_output=True, timeout=300)
    full_run = time.perf_counter() - started

    out = tmp_path / "killed"
    cmd, env = _cli("merge", config_path, str(out), *options)
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while _progress_lines(out) < 16 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    assert proc.poll() is None, "the merge finished before it could be interrupted"
    _kill_tree(proc)
    logged = _progress_lines(out)
    assert logged >= 16 and not (out / "model.safetensors.index.json").exists()

    started = time.perf_counter()
    rerun = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    resume_run = time.perf_counter() - started
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    reused = int(rerun.stdout.split("resumed: ")[1].split(" units")[0])
    assert reused >= logged
    assert shard_bytes(str(out)) == shard_bytes(str(tmp_path / "calm"))
    assert not (out / ".distmerge-progress").exists() and not (out / ".distmerge-manifest.json").exists()
    print(f"full run {full_run:.1f} s; killed after {logged} units logged; resume reused {reused} units "
          f"in {resume_run:.1f} s")


def test_changed_config_refuses_resume_until_restart(config_path, tmp_path):
    out = tmp_path / "out"
    options = ["--num-workers", "1", "--memory-per-worker", "256KiB", "--no-progress"]
    cmd, env = _cli("merge", config_path, str(out), *options)
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while _progress_lines(out) < 8 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    _kill_tree(proc)
    changed = tmp_path / "changed.yml"
    changed.write_text(open(config_path).read().replace("density: 0.5", "density: 0.4", 1))
    cmd, env = _cli("merge", str(changed), str(out), *options)
    refused = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert refused.returncode == 2
    assert "interrupted merge that cannot be resumed: the merge config changed" in refused.stderr
    assert "--restart" in refused.stderr
    restarted = subprocess.run(cmd + ["--restart"], env=env, capture_output=True, text=True, timeout=300)
    assert restarted.returncode == 0, restarted.stderr[-2000:]
    assert "resumed" not in restarted.stdout and (out / "model.safetensors.index.json").exists()


def test_writer_death_fails_cleanly_then_resumes(ray_local, config_path, tmp_path):
    """SIGKILL the writer actor mid-merge: the merge fails (no index), the re-run resumes."""
    import threading

    import distmerge

    options = dict(num_workers=2, memory_per_worker=256 * 1024)
    distmerge.merge(config_path, str(tmp_path / "calm"), **options)
    out = tmp_path / "out"
    killed = []

    def kill_writer_when_busy():
        deadline = time.time() + 60
        while time.time() < deadline and not killed:
            if _progress_lines(out) >= 8:
                for proc in psutil.Process().children(recursive=True):
                    try:
                        if "ShardWriter" in " ".join(proc.cmdline()):
                            proc.kill()
                            killed.append(proc.pid)
                    except psutil.Error:
                        continue
                return
            time.sleep(0.01)

    killer = threading.Thread(target=kill_writer_when_busy)
    killer.start()
    with pytest.raises(distmerge.MergeFailed):
        distmerge.merge(config_path, str(out), **options)
    killer.join()
    assert killed and not (out / "model.safetensors.index.json").exists()
    summary = distmerge.merge(config_path, str(out), **options)
    assert summary.reused_units >= 8
    assert shard_bytes(str(out)) == shard_bytes(str(tmp_path / "calm"))
