"""Object storage over the real S3 protocol (SeaweedFS on 127.0.0.1): inputs read by
byte ranges, outputs written as multipart uploads, bit-identical to local merges."""

from __future__ import annotations

import glob
import os
import tempfile
import time
import uuid

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import distmerge
from distmerge.errors import InputError, MergeFailed
from distmerge.io.storage import Storage
from distmerge.synthetic import LlamaShape, ties_config
from distmerge.verify import verify_checkpoint
from helpers import shard_bytes, write_yaml
from s3util import DROP, TRUNCATE, error_xml


def _bucket(s3) -> str:
    name = f"t-{uuid.uuid4().hex[:12]}"
    s3.client().create_bucket(Bucket=name)
    return name


def _upload(s3, paths, bucket):
    fs = s3.filesystem()
    urls = []
    for p in paths:
        url = f"s3://{bucket}/models/{os.path.basename(p)}"
        for name in os.listdir(p):
            fs.put_file(os.path.join(p, name), f"{url}/{name}")
        urls.append(url)
    return urls


def _download_shards(s3, url, local):
    fs = s3.filesystem()
    os.makedirs(local, exist_ok=True)
    for entry in fs.ls(url, detail=True, refresh=True):
        if entry["type"] == "file":  # SeaweedFS keeps listing an emptied prefix (.distmerge-parts/)
            fs.get_file(entry["name"], os.path.join(local, os.path.basename(entry["name"])))
    return shard_bytes(local)


@pytest.fixture(scope="module")
def s3_models(s3, model_factory):
    paths = model_factory(torch.bfloat16, max_shard_bytes=120_000)
    bucket = _bucket(s3)
    return paths, _upload(s3, paths, bucket), bucket


@pytest.fixture(params=["direct", "s3fs"])
def read_options(request, s3):
    """The storage options of each read path: distmerge's direct S3 client (io/s3_direct.py),
    and s3fs's (`direct_reads: false`), which serves options only botocore understands."""
    return s3.options if request.param == "direct" else {**s3.options, "direct_reads": False}


def _config(tmp_path, model_urls, name="merge.yml"):
    return write_yaml(str(tmp_path / name), ties_config(model_urls, densities=(0.3, 0.5, 0.7)))


def test_s3_local_roundtrips_are_bit_identical(ray_local, s3, s3_models, tmp_path, read_options):
    paths, urls, bucket = s3_models
    local_cfg, s3_cfg = _config(tmp_path, paths, "local.yml"), _config(tmp_path, urls, "s3.yml")
    opts = dict(storage_options=read_options, shard_size="100KB", num_workers=2, memory_per_worker=256 * 1024)
    distmerge.merge(local_cfg, str(tmp_path / "local"), **opts)
    expected = shard_bytes(str(tmp_path / "local"))
    assert len(expected) > 2

    distmerge.merge(s3_cfg, str(tmp_path / "from-s3"), **opts)
    assert shard_bytes(str(tmp_path / "from-s3")) == expected
    for name, cfg in (("to-s3", local_cfg), ("s3-to-s3", s3_cfg)):
        out = f"s3://{bucket}/out/{tmp_path.name}/{name}"
        distmerge.merge(cfg, out, **opts)
        files = s3.filesystem().ls(out, detail=False, refresh=True)
        assert any(f.endswith("README.md") for f in files) and any(f.endswith("config.json") for f in files)
        assert _download_shards(s3, out, str(tmp_path / name)) == expected
        report = verify_checkpoint(out, against=str(tmp_path / "local"), storage=Storage(s3.options))
        assert report.ok and report.checksums_checked > 1, report.format()
    assert not s3.client().list_multipart_uploads(Bucket=bucket).get("Uploads")


@pytest.mark.parametrize("budget", [None, 64 * 1024], ids=["default-budget", "streamed-units"])
def test_bytes_fetched_match_the_plan(ray_local, s3, s3_models, tmp_path, budget):
    """Every input byte is fetched once, also when tensors are cut into row ranges whose
    statistics need the whole tensor (streamed units keep a scratch copy between passes)."""
    _, urls, _ = s3_models
    cfg = _config(tmp_path, urls)
    plan = distmerge.plan(cfg, storage_options=s3.options, memory_per_worker=budget)
    needed = sum(plan.read_bytes_by_input())
    tensor_bytes = sum(info.nbytes for ckpt in plan.checkpoints for info in ckpt.tensors.values())
    assert needed == tensor_bytes
    assert any(u.streamed for u in plan.units) == (budget is not None)
    scratch_before = set(glob.glob(os.path.join(tempfile.gettempdir(), "distmerge-scratch-*")))
    s3.proxy.reset()
    distmerge.plan(cfg, storage_options=s3.options)
    headers_only = s3.proxy.get_bytes
    assert headers_only < 0.05 * needed  # planning reads headers and indexes, not tensors
    s3.proxy.reset()
    distmerge.merge(cfg, str(tmp_path / "out"), storage_options=s3.options, num_workers=2, memory_per_worker=budget)
    fetched = s3.proxy.get_bytes
    assert needed <= fetched <= needed * 1.02 + 2 * headers_only + 64 * 1024
    assert set(glob.glob(os.path.join(tempfile.gettempdir(), "distmerge-scratch-*"))) == scratch_before
    if budget is not None:
        distmerge.merge(_config(tmp_path, s3_models[0], "local.yml"), str(tmp_path / "local"), num_workers=2)
        assert shard_bytes(str(tmp_path / "out")) == shard_bytes(str(tmp_path / "local"))


def test_multipart_shard_of_several_parts(ray_local, s3, model_factory, tmp_path):
    shape = LlamaShape(hidden=256, intermediate=688, layers=4, heads=8, kv_heads=2, vocab=4096)
    paths = model_factory(torch.float32, shape=shape)  # ~26 MB per model: a shard of 5+ parts
    bucket = _bucket(s3)
    cfg = write_yaml(str(tmp_path / "m.yml"), ties_config(paths, dtype="float32"))
    distmerge.merge(cfg, str(tmp_path / "local"), num_workers=2)
    out = f"s3://{bucket}/big"
    s3.proxy.reset()
    distmerge.merge(cfg, out, storage_options=s3.options, part_size="5MiB", num_workers=2)
    parts = [p for m, p in s3.proxy.requests if m == "PUT" and "partNumber=" in p]
    assert len(parts) >= 4
    ours, local = _download_shards(s3, out, str(tmp_path / "dl")), shard_bytes(str(tmp_path / "local"))
    index = "model.safetensors.index.json"  # its checksums are over 5 MiB blocks here, 16 MiB locally
    assert {k: v for k, v in ours.items() if k != index} == {k: v for k, v in local.items() if k != index}
    assert verify_checkpoint(out, against=str(tmp_path / "local"), storage=Storage(s3.options)).ok
    assert not s3.client().list_multipart_uploads(Bucket=bucket).get("Uploads")


def test_failed_upload_leaves_no_parts_and_no_index(ray_local, s3, model_factory, tmp_path):
    shape = LlamaShape(hidden=256, intermediate=688, layers=4, heads=8, kv_heads=2, vocab=4096)
    paths = model_factory(torch.float32, shape=shape)
    bucket = _bucket(s3)
    cfg = write_yaml(str(tmp_path / "m.yml"), ties_config(paths, dtype="float32"))
    seen = []

    def fail_third_part(method, path, headers):
        if method == "PUT" and "partNumber=" in path:
            seen.append(path)
            if len(seen) >= 3:
                return 400, error_xml("InvalidRequest", "injected failure")
        return None

    s3.proxy.fault = fail_third_part
    try:
        with pytest.raises((MergeFailed, OSError, Exception)):
            distmerge.merge(cfg, f"s3://{bucket}/failed", storage_options=s3.options, part_size="5MiB",
                            num_workers=2)
    finally:
        s3.proxy.fault = None
    assert len(seen) >= 3
    assert not s3.client().list_multipart_uploads(Bucket=bucket).get("Uploads")
    listed = s3.client().list_objects_v2(Bucket=bucket, Prefix="failed/").get("Contents", [])
    assert not [o["Key"] for o in listed if o["Key"].endswith((".json", ".safetensors"))]


def test_input_changed_mid_merge_is_refused(ray_local, s3, model_factory, tmp_path, read_options):
    paths = model_factory(torch.bfloat16)
    bucket = _bucket(s3)
    urls = _upload(s3, paths, bucket)
    cfg = write_yaml(str(tmp_path / "m.yml"), ties_config(urls))
    target = f"/{bucket}/models/ft2/model.safetensors"
    replaced = []

    def replace_after_first_read(method, path, headers):
        if method == "GET" and path.startswith(target) and "Range" in headers and not replaced:
            data = s3.client().get_object(Bucket=bucket, Key="models/ft2/model.safetensors")["Body"].read()
            s3.client().put_object(Bucket=bucket, Key="models/ft2/model.safetensors", Body=data + b"")
            s3.client().put_object(Bucket=bucket, Key="models/ft2/model.safetensors",
                                   Body=data[:-2] + bytes([data[-2] ^ 1, data[-1]]))
            replaced.append(True)
        return None

    s3.proxy.fault = replace_after_first_read
    try:
        with pytest.raises(MergeFailed, match="changed since the merge was planned"):
            distmerge.merge(cfg, str(tmp_path / "out"), storage_options=read_options, num_workers=1,
                            memory_per_worker=32 * 1024)
    finally:
        s3.proxy.fault = None
    assert not (tmp_path / "out" / "model.safetensors.index.json").exists()


def test_planning_errors_name_the_object(s3, s3_models, tmp_path, read_options):
    _, urls, bucket = s3_models
    missing_bucket = [urls[0].replace(bucket, "no-such-bucket-x")] + urls[1:]
    with pytest.raises(InputError, match="no-such-bucket-x"):
        distmerge.plan(_config(tmp_path, missing_bucket), storage_options=read_options)
    missing_object = urls[:2] + [f"s3://{bucket}/models/nothing-here"]
    with pytest.raises(InputError, match="models/nothing-here.*does not exist"):
        distmerge.plan(_config(tmp_path, missing_object), storage_options=read_options)

    def deny(method, path, headers):
        if "Credential=denied/" in headers.get("Authorization", ""):
            return 403, error_xml("AccessDenied", "Access Denied")
        return None

    s3.proxy.fault = deny
    try:
        with pytest.raises(InputError, match="access denied") as info:
            distmerge.plan(_config(tmp_path, urls), storage_options={**read_options, "key": "denied",
                                                                    "secret": "hunter2-secret"})
    finally:
        s3.proxy.fault = None
    assert "hunter2-secret" not in str(info.value)


def test_secrets_stay_out_of_the_model_card(ray_local, s3, s3_models, tmp_path):
    _, urls, bucket = s3_models
    cfg = ties_config(urls)
    cfg["storage"] = dict(s3.options)
    path = write_yaml(str(tmp_path / "m.yml"), cfg)
    out = f"s3://{bucket}/out/card"
    distmerge.merge(path, out, num_workers=1)
    card = s3.filesystem().cat_file(f"{out}/README.md").decode()
    assert "secret: '***'" in card and s3.secret not in card
    assert "endpoint_url" in card


def test_transient_errors_are_retried_permanent_ones_fail_fast(ray_local, s3, s3_models, tmp_path, read_options):
    """503 SlowDown on some ranged GETs: retried, same bytes. 403 on data reads: fails, naming the object."""
    paths, urls, _ = s3_models
    cfg = _config(tmp_path, urls)
    distmerge.merge(_config(tmp_path, paths, "local.yml"), str(tmp_path / "local"), num_workers=2)
    throttled = []

    def throttle_some(method, path, headers):
        if method == "GET" and "Range" in headers and "model-0000" in path and len(throttled) < 6:
            throttled.append(path)
            if len(throttled) % 2:
                return 503, error_xml("SlowDown", "Please reduce your request rate.")
        return None

    s3.proxy.fault = throttle_some
    try:
        distmerge.merge(cfg, str(tmp_path / "throttled"), storage_options=read_options, num_workers=2)
    finally:
        s3.proxy.fault = None
    assert len(throttled) == 6
    assert shard_bytes(str(tmp_path / "throttled")) == shard_bytes(str(tmp_path / "local"))

    def deny_data(method, path, headers):
        if method == "GET" and "Range" in headers and "ft3" in path and "bytes=0-7" not in headers.get("Range", ""):
            return 403, error_xml("AccessDenied", "Access Denied")
        return None

    s3.proxy.fault = deny_data
    try:
        with pytest.raises(Exception) as info:
            distmerge.merge(cfg, str(tmp_path / "denied"), storage_options=read_options, num_workers=2)
    finally:
        s3.proxy.fault = None
    assert "ft3" in str(info.value)
    assert not (tmp_path / "denied" / "model.safetensors.index.json").exists()


def test_dropped_connections_are_retried(ray_local, s3, s3_models, tmp_path, read_options):
    """Connections dropped before answering, and bodies cut mid-transfer, on ranged GETs and on
    part uploads: retried (bounded), and the output is the same bytes."""
    paths, urls, bucket = s3_models
    cfg = _config(tmp_path, urls)
    distmerge.merge(_config(tmp_path, paths, "local.yml"), str(tmp_path / "local"), num_workers=2)
    faults = {"drop-header": 0, "drop-get": 0, "truncate-get": 0, "drop-part": 0}
    seen = {"data": 0, "part": 0}

    def flaky(method, path, headers):
        if method == "GET" and "Range" in headers and "model-0000" in path:
            start = headers["Range"].split("=")[1].split("-")[0]
            if start in ("0", "8"):  # header reads, at planning
                if faults["drop-header"] < 2:
                    faults["drop-header"] += 1
                    return DROP
                return None
            seen["data"] += 1
            kind = "drop-get" if faults["drop-get"] <= faults["truncate-get"] else "truncate-get"
            if seen["data"] % 2 and faults[kind] < 3:  # every other one, so a retry can succeed
                faults[kind] += 1
                return DROP if kind == "drop-get" else TRUNCATE
        if method == "PUT" and "partNumber=" in path:
            seen["part"] += 1
            if seen["part"] % 2 and faults["drop-part"] < 2:
                faults["drop-part"] += 1
                return DROP
        return None

    s3.proxy.fault = flaky
    out = f"s3://{bucket}/flaky/{tmp_path.name}"
    try:
        distmerge.merge(cfg, out, storage_options=read_options, num_workers=2, shard_size="100KB")
    finally:
        s3.proxy.fault = None
    assert faults == {"drop-header": 2, "drop-get": 3, "truncate-get": 3, "drop-part": 2}
    assert verify_checkpoint(out, against=str(tmp_path / "local"), storage=Storage(s3.options)).ok


def test_unreachable_object_fails_after_bounded_attempts(ray_local, s3, s3_models, tmp_path, read_options):
    """Every data read of one input dropped: the merge gives up after the configured number
    of attempts (s3fs's tries x botocore's attempts per request: `max_attempts` counts the
    retries after the first), naming the object, and commits nothing."""
    _, urls, bucket = s3_models
    cfg = _config(tmp_path, urls)
    attempts = []

    def always_drop(method, path, headers):
        start = headers.get("Range", "bytes=0-").split("=")[1].split("-")[0]
        if method == "GET" and "ft2" in path and start not in ("0", "8"):  # data, not headers
            attempts.append((path, headers["Range"]))
            return DROP
        return None

    s3.proxy.fault = always_drop
    out = f"s3://{bucket}/unreachable"
    options = {**read_options, "retries": 2, "config_kwargs": {"retries": {"mode": "standard", "max_attempts": 2}}}
    try:
        with pytest.raises(MergeFailed) as info:
            distmerge.merge(cfg, out, storage_options=options, num_workers=2)
    finally:
        s3.proxy.fault = None
    counts = {read: attempts.count(read) for read in attempts}
    if read_options is s3.options:  # the direct client: 2 tries x 3 attempts per read, each sent once more,
        # uncounted, when dropped unanswered (as aiohttp); the first read to spend them all stops the others
        assert "ft2" in str(info.value) and "GET failed 6 time(s), last: RemoteDisconnected" in str(info.value)
        assert max(counts.values()) == 12 and min(counts.values()) >= 1, counts
    else:  # s3fs: aiohttp also resends a request on a pooled connection closed under it
        assert "ft2" in str(info.value) and "ConnectionClosedError" in str(info.value)
        assert all(2 <= n <= 18 for n in counts.values()), counts
    assert not s3.client().list_multipart_uploads(Bucket=bucket, Prefix="unreachable/").get("Uploads")
    listed = s3.client().list_objects_v2(Bucket=bucket, Prefix="unreachable/").get("Contents", [])
    assert not listed


def test_part_listings_follow_pagination(s3):
    """S3 lists at most 1,000 parts per page; the listing used for resume reads every page."""
    from distmerge.output.multipart import _pages

    bucket = _bucket(s3)
    client = s3.client()
    upload = client.create_multipart_upload(Bucket=bucket, Key="big")["UploadId"]
    for n in range(1, 6):
        client.upload_part(Bucket=bucket, Key="big", UploadId=upload, PartNumber=n, Body=b"x" * n)
    parts = list(_pages(s3.filesystem(), "list_parts", "Parts", {"PartNumberMarker": "NextPartNumberMarker"},
                        Bucket=bucket, Key="big", UploadId=upload, MaxParts=2))
    assert [(p["PartNumber"], p["Size"]) for p in parts] == [(n, n) for n in range(1, 6)]


def test_output_at_a_bucket_root(ray_local, s3, s3_models, tmp_path):
    paths, _, _ = s3_models
    cfg = _config(tmp_path, paths)
    distmerge.merge(cfg, str(tmp_path / "local"), num_workers=2)
    bucket = _bucket(s3)
    client = s3.client()
    client.put_object(Bucket=bucket, Key="datasets/keep.txt", Body=b"not ours")
    theirs = {client.create_multipart_upload(Bucket=bucket, Key=key)["UploadId"]
              for key in ("datasets/big.tar", "sub/model-00001-of-00001.safetensors")}
    distmerge.merge(cfg, f"s3://{bucket}", storage_options=s3.options, num_workers=2)
    report = verify_checkpoint(f"s3://{bucket}", against=str(tmp_path / "local"), storage=Storage(s3.options))
    assert report.ok, report.format()
    keys = {o["Key"] for o in client.list_objects_v2(Bucket=bucket).get("Contents", [])}
    assert "model.safetensors.index.json" in keys and not [k for k in keys if k.startswith(".distmerge")]
    # other people's objects and uploads in the bucket are left alone
    assert client.get_object(Bucket=bucket, Key="datasets/keep.txt")["Body"].read() == b"not ours"
    assert {u["UploadId"] for u in client.list_multipart_uploads(Bucket=bucket)["Uploads"]} == theirs


def test_part_sizes_s3_refuses_are_refused_first(ray_local, s3, s3_models, tmp_path):
    from distmerge.errors import OutputError
    from distmerge.io.layout import OutputLayout, OutputShard
    from distmerge.output.multipart import check_part_size

    paths, _, _ = s3_models
    bucket = _bucket(s3)
    with pytest.raises(OutputError, match="outside S3's limits"):
        distmerge.merge(_config(tmp_path, paths), f"s3://{bucket}/out", storage_options=s3.options,
                        part_size="1MiB", num_workers=2)
    assert not s3.client().list_objects_v2(Bucket=bucket).get("Contents")
    assert not s3.client().list_multipart_uploads(Bucket=bucket).get("Uploads")
    huge = OutputLayout((OutputShard("model-00001-of-00001.safetensors", b"", (), {}, 60 * 10**9),))
    with pytest.raises(OutputError, match=r"more than 10000 parts.*--part-size 6000000 or more"):
        check_part_size(huge, 5 * 2**20)
    check_part_size(huge, 6 * 10**6)


def test_writer_that_cannot_start_fails_with_its_reason(ray_local, s3, s3_models, tmp_path):
    """S3 refuses to create the uploads: the merge fails at once with S3's reason (not as a
    writer to replace), and leaves nothing under the prefix."""
    paths, _, _ = s3_models
    bucket = _bucket(s3)

    def deny_create(method, path, headers):
        if method == "POST" and path.endswith("?uploads"):
            return 403, error_xml("AccessDenied", "no multipart uploads here")
        return None

    s3.proxy.fault = deny_create
    try:
        refusal = "writer actor could not start at s3://.*: PermissionError: no multipart uploads here$"
        with pytest.raises(MergeFailed, match=refusal) as info:
            distmerge.merge(_config(tmp_path, paths), f"s3://{bucket}/denied", storage_options=s3.options,
                            num_workers=2)
    finally:
        s3.proxy.fault = None
    assert "restart" not in str(info.value)
    assert not s3.client().list_objects_v2(Bucket=bucket).get("Contents")
    assert not s3.client().list_multipart_uploads(Bucket=bucket).get("Uploads")


def test_scratch_of_killed_tasks_is_removed_later(tmp_path, monkeypatch):
    """A streamed task killed before its cleanup leaves its scratch directory; the next one
    removes it once it is old, never one whose process lives or that is recent."""
    from distmerge.engine import worker

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    gone = 99_999_999  # above any pid_max
    dirs = {name: tmp_path / f"{worker.SCRATCH_PREFIX}{name}" for name in
            (f"{gone}-old", f"{gone}-recent", f"{os.getpid()}-alive", "not-a-pid")}
    for path in dirs.values():
        path.mkdir()
        (path / "piece-0").write_bytes(b"x")
    old = time.time() - worker.ORPHAN_AGE - 60
    for name in (f"{gone}-old", f"{os.getpid()}-alive", "not-a-pid"):
        os.utime(dirs[name], (old, old))
    worker._remove_orphaned_scratch()
    assert {name for name, path in dirs.items() if path.exists()} == {
        f"{gone}-recent", f"{os.getpid()}-alive", "not-a-pid"}


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["s3://b/x", "s3://b/y"]), st.integers(0, 40), st.integers(0, 12),
                          st.sampled_from(["v1", "v2"])), max_size=12))
def test_coalesced_spans_cover_each_request_exactly(requests):
    """Requests become spans of one object and version; each request is found at its
    offset in its span, and a chain of adjacent requests is one span."""
    from distmerge.io.remote import coalesce

    requests = [(url, start, start + length, version) for url, start, length, version in requests]
    spans, where = coalesce(requests)
    assert len(where) == len(requests) and len(spans) <= max(1, len(requests))
    for (url, start, end, version), (s, offset) in zip(requests, where):
        span_url, span_start, span_end, span_version = spans[s]
        assert (span_url, span_version) == (url, version)
        assert span_start + offset == start and end <= span_end
    for s, (url, start, end, version) in enumerate(spans):  # every span byte is some request's
        covered = sorted((a, b) for (u, a, b, v), (t, _) in zip(requests, where) if t == s)
        reach = start
        for a, b in covered:
            assert a <= reach
            reach = max(reach, b)
        assert reach == end
    chain = [("s3://b/x", 10 * k, 10 * k + 10, "v") for k in range(5)]
    assert coalesce(chain[::-1])[0] == [("s3://b/x", 0, 50, "v")]


@pytest.mark.parametrize("batch_pieces", [None, 3], ids=["one-batch", "batches-of-3-pieces"])
def test_a_units_small_pieces_are_fetched_in_few_gets(s3, s3_models, tmp_path, monkeypatch, batch_pieces):
    """A unit of many small pieces is fetched a batch at a time, at most one batch ahead of
    the piece computing, adjacent tensors of one object in one GET: fewer requests than
    ranges, every byte once, the same tensors as the local files."""
    from distmerge.engine import worker
    from distmerge.io.remote import coalesce

    paths, urls, _ = s3_models
    s3_plan = distmerge.plan(_config(tmp_path, urls, "s3.yml"), storage_options=s3.options)
    local_plan = distmerge.plan(_config(tmp_path, paths, "local.yml"))
    index = max(range(len(s3_plan.units)), key=lambda u: len(s3_plan.units[u].pieces))
    unit, local_unit = s3_plan.units[index], local_plan.units[index]
    sources = [(s.path, s.start, s.end, s.version) for p in unit.pieces for s in p.sources]
    assert len(unit.pieces) >= 4 and sum(b - a for _, a, b, _ in sources) <= worker.FETCH_BATCH_BYTES
    if batch_pieces:  # a smaller batch, so that the unit takes several
        monkeypatch.setattr(worker, "FETCH_BATCH_BYTES", max(p.remote_bytes for p in unit.pieces)
                            * batch_pieces)
    s3.proxy.reset()
    with worker.InputReader(s3_plan.config.storage, order=unit.pieces) as reader:
        fetched = []
        for k, piece in enumerate(unit.pieces):
            fetched.append([t.clone() for t in reader.tensors(piece)])
            if k + 1 < len(unit.pieces):
                reader.prefetch(unit.pieces[k + 1])
            ahead = {id(f) for f in reader._ahead.values()} - {id(reader._consuming)}
            assert len(ahead) <= 1, f"{len(ahead)} batches fetched ahead of piece {k}"
    gets = [path for method, path in s3.proxy.requests if method == "GET"]
    if batch_pieces:
        assert len(coalesce(sources)[0]) < len(gets) < len(sources)
    else:
        assert len(gets) == len(coalesce(sources)[0]) < len(sources)
    assert s3.proxy.get_bytes == sum(b - a for _, a, b, _ in sources)
    local = worker.InputReader(local_plan.config.storage)
    for piece, tensors in zip(local_unit.pieces, fetched):
        assert all(torch.equal(a, b) for a, b in zip(local.tensors(piece), tensors))


def test_remote_reads_of_overlapping_empty_and_repeated_ranges(s3, s3_models, read_options):
    from distmerge.io.remote import read_remote_many

    paths, urls, _ = s3_models
    name = sorted(n for n in os.listdir(paths[0]) if n.endswith(".safetensors"))[0]
    with open(os.path.join(paths[0], name), "rb") as f:
        data = f.read()
    url = f"{urls[0]}/{name}"
    version = s3.filesystem().info(url)["ETag"]
    ranges = [(0, 100), (100, 300), (50, 150), (300, 300), (0, 100), (len(data) - 10, len(data))]
    got = read_remote_many(Storage(read_options), [(url, a, b, version) for a, b in ranges])
    assert [bytes(g) for g in got] == [data[a:b] for a, b in ranges]


def test_a_server_that_ignores_ranges_is_refused(s3, s3_models, read_options):
    """A 200 with the whole object (a server or proxy that ignores Range) is an error that
    names the object, not bytes from the wrong offset."""
    from distmerge.io.remote import read_remote_many

    paths, urls, _ = s3_models
    name = sorted(n for n in os.listdir(paths[0]) if n.endswith(".safetensors"))[0]
    url = f"{urls[0]}/{name}"
    version = s3.filesystem().info(url)["ETag"]
    s3.proxy.fault = lambda method, path, headers: (200, b"\0" * 1000) if method == "GET" and headers.get(
        "Range") else None
    try:
        with pytest.raises(InputError, match=rf"{name}: asked for bytes 100-150, the server answered with 1000"):
            read_remote_many(Storage(read_options), [(url, 100, 150, version)])
    finally:
        s3.proxy.fault = None


def test_a_model_wide_group_in_one_unit_is_fetched_once(ray_local, s3, s3_models, tmp_path):
    """`density_scope: model` over a model that fits in one unit: the task runs every phase
    over the pieces, and fetches each remote byte once all the same (a scratch copy)."""
    paths, urls, _ = s3_models
    configs = [write_yaml(str(tmp_path / f"{name}.yml"), ties_config(models, densities=(0.3, 0.5, 0.7),
                                                                    extra={"density_scope": "model"}))
               for name, models in (("s3", urls), ("local", paths))]
    plan = distmerge.plan(configs[0], storage_options=s3.options)
    group = plan.groups["<model>"]
    assert len(plan.units) == 1 and not group.distributed and len(group.pieces) > 1
    needed = sum(plan.read_bytes_by_input())
    s3.proxy.reset()
    distmerge.merge(configs[0], str(tmp_path / "from-s3"), storage_options=s3.options, num_workers=2)
    assert needed <= s3.proxy.get_bytes <= needed * 1.02 + 64 * 1024
    distmerge.merge(configs[1], str(tmp_path / "local"), num_workers=2)
    assert shard_bytes(str(tmp_path / "from-s3")) == shard_bytes(str(tmp_path / "local"))
