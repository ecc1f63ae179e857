"""Kill the driver (the `distmerge merge` process and its whole Ray) mid-merge; the same
command resumes, reusing the units already written, with a bit-identical result."""

from __future__ import annotations

import os
import subprocess
import time

import pytest
import torch

import distmerge
from distmerge.synthetic import LlamaShape, ties_config
from helpers import run_cli, cli_command, kill_actor_when, kill_tree, shard_bytes, write_yaml

SHAPE = LlamaShape(hidden=128, intermediate=344, layers=6, heads=4, kv_heads=2, vocab=2048)


def _progress_lines(out) -> int:
    try:
        return len((out / ".distmerge-progress").read_text().split("\n")) - 1
    except OSError:
        return 0


@pytest.fixture(scope="module")
def config_path(model_factory, tmp_path_factory):
    paths = model_factory(torch.bfloat16, shape=SHAPE)
    return write_yaml(str(tmp_path_factory.mktemp("resume") / "merge.yml"), ties_config(paths))


def test_killed_driver_resumes_bit_identical(ray_local, config_path, tmp_path):
    options = ["--num-workers", "1", "--memory-per-worker", "256KiB", "--no-progress", "--shard-size", "2MB"]
    started = time.perf_counter()
    distmerge.merge(config_path, str(tmp_path / "calm"), num_workers=1, memory_per_worker="256KiB", shard_size="2MB")
    full_run = time.perf_counter() - started

    out = tmp_path / "killed"
    cmd, env = cli_command("merge", config_path, str(out), *options)
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while _progress_lines(out) < 16 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    assert proc.poll() is None, "the merge finished before it could be interrupted"
    kill_tree(proc)
    logged = _progress_lines(out)
    assert logged >= 16 and not (out / "model.safetensors.index.json").exists()
    # as if the kill had come among the commit's renames: a shard under its final name,
    # no index yet; the re-run must take it back, not refuse or trust it
    partial = sorted(out.glob("model-*.safetensors.partial"))[0]
    partial.rename(out / partial.name[:-len(".partial")])

    # the re-run leaves --memory-per-worker out: the recorded budget is used (the default
    # one, 1 GiB here, would plan other units and be refused)
    started = time.perf_counter()
    rerun = run_cli("merge", config_path, str(out), "--num-workers", "2", "--no-progress", "--shard-size", "2MB")
    resume_run = time.perf_counter() - started
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    reused = int(rerun.stdout.split("resumed: ")[1].split(" units")[0])
    assert reused >= logged
    assert shard_bytes(str(out)) == shard_bytes(str(tmp_path / "calm"))
    assert not (out / ".distmerge-progress").exists() and not (out / ".distmerge-manifest.json").exists()
    print(f"full run {full_run:.1f} s; killed after {logged} units logged; resume reused {reused} units "
          f"in {resume_run:.1f} s")


def test_changed_config_refuses_resume_until_restart(ray_local, config_path, tmp_path):
    out = tmp_path / "out"
    options = ["--num-workers", "1", "--memory-per-worker", "256KiB", "--no-progress"]
    cmd, env = cli_command("merge", config_path, str(out), *options)
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while _progress_lines(out) < 8 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    kill_tree(proc)
    changed = tmp_path / "changed.yml"
    changed.write_text(open(config_path).read().replace("density: 0.5", "density: 0.4", 1))
    args = ["merge", str(changed), str(out), *options]
    refused = run_cli(*args)
    assert refused.returncode == 2
    assert "interrupted merge that cannot be resumed: the merge config changed" in refused.stderr
    assert "--restart" in refused.stderr
    restarted = run_cli(*args, "--restart", "--num-workers", "2")
    assert restarted.returncode == 0, restarted.stderr[-2000:]
    assert "resumed" not in restarted.stdout and (out / "model.safetensors.index.json").exists()


def test_dead_writer_is_replaced_in_place(ray_local, config_path, tmp_path):
    """SIGKILL the writer actor mid-merge: a new one carries on from the progress log."""
    options = dict(num_workers=2, memory_per_worker=256 * 1024)
    distmerge.merge(config_path, str(tmp_path / "calm"), **options)
    out = tmp_path / "out"
    killed: list = []
    seen: list = []
    killer = kill_actor_when("ShardWriter", lambda: seen.append(_progress_lines(out)) or seen[-1] >= 8, killed)
    summary = distmerge.merge(config_path, str(out), **options)
    killer.join()
    assert killed and summary.writer_restarts == 1
    # only units written but not yet logged (the log is synced every 8) are computed again
    assert summary.recomputed_units < 8
    print(f"writer killed after {seen[-1]} units logged; {summary.recomputed_units} of "
          f"{summary.units} units computed again")
    assert shard_bytes(str(out)) == shard_bytes(str(tmp_path / "calm"))
    assert sorted(os.listdir(out)) == sorted(os.listdir(tmp_path / "calm"))


def test_dead_writer_mid_stream_is_replaced(ray_local, config_path, tmp_path):
    """With a budget that makes every tensor a streamed unit of many row ranges, the writer
    dies while units are sending it their ranges: those are computed again for the new
    writer, and the output is bit-identical."""
    options = dict(num_workers=2, memory_per_worker=128 * 1024)
    assert all(u.streamed and len(u.pieces) > 1 for u in distmerge.plan(config_path, **options).units
               if len(u.pieces) > 1)
    distmerge.merge(config_path, str(tmp_path / "calm"), **options)
    out = tmp_path / "out"
    shard = out / "model-00001-of-00001.safetensors.partial"
    started: list = []
    killed: list = []

    def writing_for_a_while() -> bool:
        if shard.exists() and not started:
            started.append(time.time())
        return bool(started) and time.time() - started[0] > 0.5

    killer = kill_actor_when("ShardWriter", writing_for_a_while, killed)
    summary = distmerge.merge(config_path, str(out), **options)
    killer.join()
    assert killed and summary.writer_restarts == 1
    assert shard_bytes(str(out)) == shard_bytes(str(tmp_path / "calm"))


def test_manifest_without_shards_starts_afresh(config_path, tmp_path):
    """Killed while starting (the manifest written, no shard yet): nothing to resume, and
    nothing to refuse; a finished checkpoint, though, is never taken for an interrupted one."""
    from distmerge.errors import OutputError
    from distmerge.output import resume as progress
    from distmerge.output.destination import Destination

    plan = distmerge.plan(config_path, memory_per_worker="256KiB")
    dest = Destination(str(tmp_path / "out"), plan.config.storage)
    assert dest.prepare(False, plan).finished == set()
    assert (tmp_path / "out" / progress.MANIFEST).exists()
    assert dest.prepare(False, plan).finished == set()  # the same again: a fresh start, no refusal
    (tmp_path / "out" / "model.safetensors.index.json").write_text("{}")
    with pytest.raises(OutputError, match="already holds a checkpoint"):
        dest.prepare(False, plan)
