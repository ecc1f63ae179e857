"""Resuming merges into S3: the in-progress multipart uploads, their parts and the part
markers under the output prefix are the record. Killed drivers (the CLI and its whole
Ray, by pid), a kill in the middle of the commit, and a killed writer actor all end in
the same bytes as an undisturbed merge, with nothing left over."""

from __future__ import annotations

import json
import os
import subprocess
import time
import uuid

import pytest
import torch

import distmerge
from distmerge.io.storage import Storage
from distmerge.synthetic import LlamaShape, ties_config
from distmerge.verify import verify_checkpoint
from helpers import cli_command, kill_actor_when, kill_tree, shard_bytes, write_yaml

SHAPE = LlamaShape(hidden=128, intermediate=344, layers=6, heads=4, kv_heads=2, vocab=2048)
OPTIONS = dict(num_workers=2, memory_per_worker=256 * 1024, shard_size="1MB")
CLI_OPTIONS = ["--num-workers", "1", "--memory-per-worker", "256KiB", "--shard-size", "1MB", "--no-progress"]


@pytest.fixture(scope="module")
def merge_case(model_factory, tmp_path_factory, s3):
    """A config with local inputs, its undisturbed local output, and a fresh bucket."""
    paths = model_factory(torch.bfloat16, shape=SHAPE)
    root = tmp_path_factory.mktemp("s3resume")
    config = write_yaml(str(root / "merge.yml"), ties_config(paths))
    subprocess.run(cli_command("merge", config, str(root / "calm"), *CLI_OPTIONS)[0], check=True,
                   capture_output=True, timeout=300, env=cli_command()[1])
    bucket = f"r-{uuid.uuid4().hex[:12]}"
    s3.client().create_bucket(Bucket=bucket)
    return config, str(root / "calm"), bucket


def _markers(s3, bucket: str, prefix: str) -> int:
    listed = s3.client().list_objects_v2(Bucket=bucket, Prefix=f"{prefix}/.distmerge-parts/")
    return listed.get("KeyCount", 0)


def _assert_finished_and_clean(s3, bucket: str, prefix: str, calm: str, tmp_path) -> None:
    out = f"s3://{bucket}/{prefix}"
    report = verify_checkpoint(out, against=calm, storage=Storage(s3.options))
    assert report.ok, report.format()
    fs = s3.filesystem()
    local = tmp_path / "downloaded"
    local.mkdir()
    for path in fs.ls(out, detail=False, refresh=True):
        if path.endswith((".safetensors", ".json")):
            fs.get_file(path, str(local / os.path.basename(path)))
    assert shard_bytes(str(local)) == shard_bytes(calm)  # the index too: same checksums
    assert not s3.client().list_multipart_uploads(Bucket=bucket, Prefix=f"{prefix}/").get("Uploads")
    names = {os.path.basename(p) for p in fs.ls(out, detail=False, refresh=True)}
    assert ".distmerge-manifest.json" not in names and _markers(s3, bucket, prefix) == 0


def _cli(config: str, out: str, s3) -> tuple:
    return cli_command("merge", config, out, *CLI_OPTIONS, "--storage-options", json.dumps(s3.options))


def test_killed_driver_resumes_from_its_uploads(s3, merge_case, tmp_path):
    config, calm, bucket = merge_case
    prefix = "killed"
    cmd, env = _cli(config, f"s3://{bucket}/{prefix}", s3)
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while _markers(s3, bucket, prefix) < 2 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, "the merge finished before it could be interrupted"
    kill_tree(proc)
    uploaded = _markers(s3, bucket, prefix)
    assert s3.client().list_multipart_uploads(Bucket=bucket, Prefix=f"{prefix}/").get("Uploads")

    rerun = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    reused = int(rerun.stdout.split("resumed: ")[1].split(" units")[0])
    assert reused > 0
    _assert_finished_and_clean(s3, bucket, prefix, calm, tmp_path)
    print(f"killed after {uploaded} parts were uploaded; the resume reused {reused} units")


def test_kill_during_commit_resumes_with_completed_shards(s3, merge_case, tmp_path):
    """The driver dies right after S3 completed the first shard object: the re-run accepts
    it (its ETag matches the recorded parts), completes the others, writes the index."""
    config, calm, bucket = merge_case
    prefix = "commit"
    cmd, env = _cli(config, f"s3://{bucket}/{prefix}", s3)
    completions = []
    state = {}

    def kill_at_second_completion(method, path, headers):
        if method == "POST" and "uploadId=" in path and f"/{prefix}/" in path:
            completions.append(path)
            if len(completions) == 2:
                kill_tree(state["proc"])
                return 500, b""
        return None

    s3.proxy.fault = kill_at_second_completion
    try:
        state["proc"] = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        state["proc"].wait(timeout=300)
    finally:
        s3.proxy.fault = None
    assert len(completions) == 2
    fs = s3.filesystem()
    names = {os.path.basename(p) for p in fs.ls(f"s3://{bucket}/{prefix}", detail=False, refresh=True)}
    assert "model.safetensors.index.json" not in names and any(n.endswith(".safetensors") for n in names)

    rerun = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    units = int(rerun.stdout.split(" units into")[0].split(" in ")[-1])
    assert f"resumed: {units} units reused" in rerun.stdout
    _assert_finished_and_clean(s3, bucket, prefix, calm, tmp_path)


def test_dead_writer_is_replaced_from_the_uploads(ray_local, s3, merge_case, tmp_path):
    config, calm, bucket = merge_case
    prefix = "writer"
    killed: list = []
    killer = kill_actor_when("MultipartShardWriter", lambda: _markers(s3, bucket, prefix) >= 2, killed)
    summary = distmerge.merge(config, f"s3://{bucket}/{prefix}", storage_options=s3.options, **OPTIONS)
    killer.join()
    assert killed and summary.writer_restarts == 1
    _assert_finished_and_clean(s3, bucket, prefix, calm, tmp_path)
