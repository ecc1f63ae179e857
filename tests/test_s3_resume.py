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
from helpers import run_cli, cli_command, kill_actor_when, kill_tree, shard_bytes, write_yaml

SHAPE = LlamaShape(hidden=128, intermediate=344, layers=6, heads=4, kv_heads=2, vocab=2048)
OPTIONS = dict(num_workers=2, memory_per_worker=256 * 1024, shard_size="1MB")
CLI_OPTIONS = ["--num-workers", "1", "--memory-per-worker", "256KiB", "--shard-size", "1MB", "--no-progress"]


@pytest.fixture(scope="module")
def merge_case(ray_local, model_factory, tmp_path_factory, s3):
    """A config with local inputs, its undisturbed local output, and a fresh bucket."""
    paths = model_factory(torch.bfloat16, shape=SHAPE)
    root = tmp_path_factory.mktemp("s3resume")
    config = write_yaml(str(root / "merge.yml"), ties_config(paths))
    distmerge.merge(config, str(root / "calm"), num_workers=1, memory_per_worker="256KiB", shard_size="1MB")
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


def test_killed_driver_resumes_from_its_uploads(ray_local, s3, merge_case, tmp_path):
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

    started = time.perf_counter()
    rerun = run_cli(*cmd[3:], "--num-workers", "2")
    seconds = time.perf_counter() - started
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    reused = int(rerun.stdout.split("resumed: ")[1].split(" units")[0])
    units = int(rerun.stdout.split(" units into")[0].split(" in ")[-1])
    assert uploaded >= 2 and reused > 0
    _assert_finished_and_clean(s3, bucket, prefix, calm, tmp_path)
    print(f"killed after {uploaded} parts were uploaded; the resume reused {reused} of {units} units "
          f"in {seconds:.1f} s")


def test_kill_during_commit_resumes_with_completed_shards(ray_local, s3, merge_case, tmp_path):
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

    rerun = run_cli(*cmd[3:], "--num-workers", "2")
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    units = int(rerun.stdout.split(" units into")[0].split(" in ")[-1])
    assert f"resumed: {units} units reused" in rerun.stdout
    _assert_finished_and_clean(s3, bucket, prefix, calm, tmp_path)


def test_dead_writer_is_replaced_from_the_uploads(ray_local, s3, merge_case, tmp_path):
    config, calm, bucket = merge_case
    prefix = "writer"
    killed: list = []
    seen: list = []
    killer = kill_actor_when("MultipartShardWriter",
                             lambda: seen.append(_markers(s3, bucket, prefix)) or seen[-1] >= 2, killed)
    summary = distmerge.merge(config, f"s3://{bucket}/{prefix}", storage_options=s3.options, **OPTIONS)
    killer.join()
    assert killed and summary.writer_restarts == 1
    assert summary.recomputed_units < summary.units  # the parts S3 held were kept
    print(f"writer killed once {seen[-1]} parts were uploaded; {summary.recomputed_units} of "
          f"{summary.units} units computed again")
    _assert_finished_and_clean(s3, bucket, prefix, calm, tmp_path)


def test_multipart_state_is_recovered_part_by_part(s3):
    """The writer and `recover_uploads` without Ray: two shards of 3 parts each. After an
    interruption, parts S3 holds are reused, a duplicate upload of one key is aborted,
    a failed restart leaves the state resumable, and the resumed shards are the bytes."""
    import random

    from distmerge.errors import DistmergeError
    from distmerge.io import checksum
    from distmerge.io.layout import OutputLayout, OutputShard
    from distmerge.output.multipart import MultipartShardWriter, recover_uploads
    from s3util import error_xml

    part = 5 * 2**20
    names = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    size = 2 * part + 12345
    layout = OutputLayout(tuple(OutputShard(n, b"", (), {}, size) for n in names))
    payload = [random.Random(i).randbytes(size) for i in range(2)]
    bucket = f"p-{uuid.uuid4().hex[:12]}"
    s3.client().create_bucket(Bucket=bucket)
    url, storage = f"s3://{bucket}/out", Storage(s3.options)
    fs = s3.filesystem()
    import numpy as np

    def write(writer, shard, start, end):
        writer.write([(shard, start, end - start)], np.frombuffer(payload[shard][start:end], dtype=np.uint8))

    first = MultipartShardWriter(url, layout, storage, part)
    write(first, 0, 0, 2 * part)  # shard 0: parts 1 and 2 fill and upload
    write(first, 1, part, size)  # shard 1: parts 2 and 3
    first.interrupted()
    duplicate = s3.client().create_multipart_upload(Bucket=bucket, Key=f"out/{names[0]}")["UploadId"]

    states = recover_uploads(fs, url, layout, part)
    assert sorted(states[0].parts) == [0, 1] and sorted(states[1].parts) == [1, 2]
    assert states[0].upload_id == first.states[0].upload_id != duplicate
    live = {u["UploadId"] for u in s3.client().list_multipart_uploads(Bucket=bucket).get("Uploads", [])}
    assert duplicate not in live and states[0].upload_id in live and states[1].upload_id in live

    s3.client().abort_multipart_upload(Bucket=bucket, Key=f"out/{names[1]}", UploadId=states[1].upload_id)
    states = recover_uploads(fs, url, layout, part)
    assert states[1].upload_id is None and not states[1].parts and sorted(states[0].parts) == [0, 1]

    def refuse_new_uploads(method, path, headers):
        return (503, error_xml("ServiceUnavailable", "no")) if method == "POST" and path.endswith("?uploads") else None

    s3.proxy.fault = refuse_new_uploads
    failing = {**s3.options, "retries": 1, "config_kwargs": {"retries": {"mode": "standard", "max_attempts": 1}}}
    try:
        with pytest.raises((DistmergeError, OSError)):
            MultipartShardWriter(url, layout, Storage(failing), part, states)
    finally:
        s3.proxy.fault = None
    states = recover_uploads(fs, url, layout, part)  # the failed start changed nothing
    assert sorted(states[0].parts) == [0, 1] and states[1].upload_id is None

    s3.proxy.reset()
    resumed = MultipartShardWriter(url, layout, storage, part, states)
    write(resumed, 0, 0, size)  # everything again: the parts S3 holds are skipped
    write(resumed, 1, 0, size)
    result = resumed.finalize()
    uploads = [p for m, p in s3.proxy.requests if m == "PUT" and "partNumber=" in p]
    assert len(uploads) == 1 + 3  # shard 0: part 3; shard 1: all three
    for name, data in zip(names, payload):
        assert fs.cat_file(f"{url}/{name}") == data
        block = [checksum.block_digest(data[a:a + part]) for a in range(0, size, part)]
        assert result["checksums"][name] == checksum.combine(block)


def test_slow_uploads_hold_the_writer_back_instead_of_filling_its_memory(s3):
    """Parts fill faster than they upload: `write` waits once UPLOAD_THREADS +
    MAX_QUEUED_PARTS parts are pending, so the parts held in memory stay bounded."""
    import numpy as np

    from distmerge.io.layout import OutputLayout, OutputShard
    from distmerge.output.multipart import MAX_QUEUED_PARTS, UPLOAD_THREADS, MultipartShardWriter

    part = 5 * 2**20
    parts = UPLOAD_THREADS + MAX_QUEUED_PARTS + 6
    layout = OutputLayout((OutputShard("model-00001-of-00001.safetensors", b"", (), {}, parts * part),))
    bucket = f"b-{uuid.uuid4().hex[:12]}"
    s3.client().create_bucket(Bucket=bucket)
    s3.proxy.fault = lambda method, path, headers: time.sleep(0.3) if "partNumber=" in path else None
    block = np.zeros(part, dtype=np.uint8)
    try:
        writer = MultipartShardWriter(f"s3://{bucket}/out", layout, Storage(s3.options), part)
        held = []
        for i in range(parts):
            writer.write([(0, i * part, part)], block)
            held.append(len(writer.futures))
        writer.finalize()
    finally:
        s3.proxy.fault = None
    assert max(held) == UPLOAD_THREADS + MAX_QUEUED_PARTS
    assert s3.client().head_object(Bucket=bucket, Key="out/model-00001-of-00001.safetensors")["ContentLength"] == \
        parts * part
