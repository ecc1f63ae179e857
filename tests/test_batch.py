"""`distmerge batch`: a prefix of merge requests, each merged at most once, with a report.

Real parts: the session's Ray, SeaweedFS for S3, real request files and checkpoints.
"""

from __future__ import annotations

import json
import os
import subprocess
import threading
import time

import pytest
import torch
import yaml

import distmerge
from distmerge.batch import load_request, run_batch
from distmerge.job import MergeJob, MergeOptions
from distmerge.output import resume
from distmerge.output.lock import LOCK_NAME
from distmerge.synthetic import LlamaShape, ties_config
from helpers import cli_command, shard_bytes, write_yaml

SHAPE = LlamaShape(hidden=64, intermediate=160, layers=2, heads=4, kv_heads=2, vocab=512)
OPTIONS = MergeOptions(num_workers=2, memory_per_worker="64KiB")


def _config(paths, density: float) -> dict:
    config = ties_config(paths)
    config["parameters"]["density"] = density
    return config


def _request(directory, name: str, config: dict, output: str) -> str:
    return write_yaml(os.path.join(str(directory), name), {**config, "output": output})


def _interrupt_at_commit(request_path: str) -> None:
    """Leave the request's output as a merge killed just before its index was written:
    shards complete under partial names, the manifest, every unit logged, no index."""
    config, out = load_request(request_path, open(request_path).read())
    job = MergeJob(config, out, OPTIONS)
    job.execute()
    for name in os.listdir(out):
        if name.endswith(".safetensors"):
            os.rename(os.path.join(out, name), os.path.join(out, name + ".partial"))
    os.remove(os.path.join(out, "model.safetensors.index.json"))
    resume.write_manifest(job.destination, job.plan)
    with open(os.path.join(out, resume.PROGRESS), "w") as f:
        f.write("".join(f"{u.index}\n" for u in job.plan.units))


@pytest.fixture(scope="module")
def paths(model_factory):
    return model_factory(torch.bfloat16, shape=SHAPE)


def test_batch_statuses_report_and_idle_rerun(ray_local, paths, tmp_path):
    requests, outputs, references = tmp_path / "requests", tmp_path / "outputs", tmp_path / "references"
    requests.mkdir()
    configs = {name: _config(paths, density) for name, density in (("a", 0.3), ("b", 0.5), ("c", 0.7))}
    for name, config in configs.items():
        distmerge.merge(write_yaml(str(tmp_path / f"{name}.yml"), config), str(references / name), num_workers=2)
    # a: merged by an earlier batch; b: interrupted; c: new; d, e: broken
    _request(requests, "a.yml", configs["a"], str(outputs / "a"))
    assert [r.status for r in run_batch(str(requests), OPTIONS).requests] == ["merged"]
    _interrupt_at_commit(_request(requests, "b.yml", configs["b"], str(outputs / "b")))
    _request(requests, "c.yml", configs["c"], str(outputs / "c"))
    _request(requests, "d-broken.yml", {**configs["a"], "parameters": {"densty": 0.5}}, str(outputs / "d"))
    missing = _config(paths, 0.5)
    missing["models"][1]["model"] = str(tmp_path / "no-such-model")
    _request(requests, "e-missing.yml", missing, str(outputs / "e"))
    (requests / "notes.txt").write_text("not a request")

    report_path = tmp_path / "report.json"
    started = time.perf_counter()
    report = run_batch(str(requests), OPTIONS, report_url=str(report_path))
    first = time.perf_counter() - started
    statuses = {os.path.basename(r.request): r.status for r in report.requests}
    assert statuses == {"a.yml": "skipped", "b.yml": "resumed", "c.yml": "merged", "d-broken.yml": "failed",
                        "e-missing.yml": "failed"}
    written = json.loads(report_path.read_text())
    assert written["distmerge_version"] == distmerge.__version__
    assert written["started"] <= written["finished"]
    assert written["counts"] == {"skipped": 1, "resumed": 1, "merged": 1, "failed": 2, "locked": 0}
    by_name = {os.path.basename(r["request"]): r for r in written["requests"]}
    assert [os.path.basename(r["request"]) for r in written["requests"]] == sorted(by_name)
    assert "densty" in by_name["d-broken.yml"]["error"] and "d-broken.yml" in by_name["d-broken.yml"]["error"]
    assert "no-such-model" in by_name["e-missing.yml"]["error"]
    assert by_name["c.yml"]["bytes_written"] > 0 and by_name["c.yml"]["bytes_read"] > 0
    # every unit of b was durable: nothing is read again (no statistics rounds), only the commit runs
    assert by_name["b.yml"]["bytes_read"] == 0 and by_name["b.yml"]["bytes_written"] > 0
    assert by_name["a.yml"]["bytes_read"] == 0 and by_name["a.yml"]["error"] is None
    for name in ("a", "b", "c"):
        assert shard_bytes(str(outputs / name)) == shard_bytes(str(references / name))
        assert not (outputs / name / LOCK_NAME).exists()
        assert not (outputs / name / resume.MANIFEST).exists()
    assert not (outputs / "d").exists() and not (outputs / "e").exists()

    # a second run only skips (and reports the broken ones again) and rewrites nothing
    stamps = {p: p.stat().st_mtime_ns for p in outputs.rglob("*")}
    started = time.perf_counter()
    again = run_batch(str(requests), OPTIONS)
    idle = time.perf_counter() - started
    assert [r.status for r in again.requests] == ["skipped"] * 3 + ["failed"] * 2
    assert {p: p.stat().st_mtime_ns for p in outputs.rglob("*")} == stamps
    print(f"batch of 5 requests (1 skipped, 1 resumed, 1 merged, 2 failed): {first:.2f} s; "
          f"idle second run: {idle:.2f} s")


def test_changed_request_is_not_skipped(ray_local, paths, tmp_path):
    """The index records the request's fingerprints: a changed request is not taken for done;
    its output holds another merge, so it fails (naming --overwrite) unless told to overwrite."""
    requests = tmp_path / "requests"
    requests.mkdir()
    out = str(tmp_path / "out")
    _request(requests, "r.yml", _config(paths, 0.5), out)
    assert [r.status for r in run_batch(str(requests), OPTIONS).requests] == ["merged"]
    _request(requests, "r.yml", _config(paths, 0.6), out)
    failed = run_batch(str(requests), OPTIONS).requests[0]
    assert failed.status == "failed" and "--overwrite" in failed.error
    redone = run_batch(str(requests), MergeOptions(num_workers=2, overwrite=True)).requests[0]
    assert redone.status == "merged"
    assert run_batch(str(requests), OPTIONS).requests[0].status == "skipped"


def test_batch_cli_exit_status_and_output(ray_local, paths, tmp_path):
    """The command as cron runs it: one line per request, exit 1 on a failure, and its own
    local Ray although another Ray runs on this machine (the tests' own) and RAY_ADDRESS
    names one that is gone."""
    requests = tmp_path / "requests"
    requests.mkdir()
    _request(requests, "good.yml", _config(paths, 0.5), str(tmp_path / "good"))
    (requests / "zz-bad.yml").write_text("merge_method: ties\nmodels: [\n")
    cmd, env = cli_command("batch", str(requests), "--num-workers", "2", "--report", str(tmp_path / "r.json"))
    env["RAY_ADDRESS"] = "127.0.0.1:1"
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "merged   " in proc.stdout and "failed   " in proc.stdout and "not valid YAML" in proc.stdout
    assert "1 merged, 1 failed" in proc.stdout
    assert json.loads((tmp_path / "r.json").read_text())["counts"]["merged"] == 1


def test_s3_batches_running_at_once_merge_each_request_once(ray_local, paths, s3, tmp_path):
    """Two batches over one S3 prefix at the same time (cron ticks that overlap): every request
    is merged exactly once, by one of them; the other finds it locked or done. No multipart
    upload is left behind, and the outputs equal local merges."""
    bucket = "batches"
    fs = s3.filesystem()
    fs.mkdir(bucket)
    options = MergeOptions(num_workers=2, memory_per_worker="64KiB", storage_options=s3.options)
    configs = {name: _config(paths, density) for name, density in (("p", 0.4), ("q", 0.6))}
    for name, config in configs.items():
        text = yaml.safe_dump({**config, "output": f"s3://{bucket}/merged/{name}"}, sort_keys=False)
        fs.pipe_file(f"{bucket}/requests/{name}.yaml", text.encode())
        distmerge.merge(write_yaml(str(tmp_path / f"{name}.yml"), config), str(tmp_path / name), num_workers=2)

    reports = []
    runs = [threading.Thread(target=lambda: reports.append(run_batch(f"s3://{bucket}/requests/", options)))
            for _ in range(2)]
    for run in runs:
        run.start()
    for run in runs:
        run.join()
    for name in configs:
        statuses = sorted(r.status for report in reports for r in report.requests
                          if r.request.endswith(f"/{name}.yaml"))
        assert statuses in (["locked", "merged"], ["merged", "skipped"]), statuses
    assert s3.client().list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []
    for name in configs:
        merged = tmp_path / f"downloaded-{name}"
        merged.mkdir()
        for entry in fs.ls(f"{bucket}/merged/{name}", detail=True, refresh=True):
            if entry["type"] == "file":
                fs.get_file(entry["name"], str(merged / os.path.basename(entry["name"])))
        assert shard_bytes(str(merged)) == shard_bytes(str(tmp_path / name))
        assert not (merged / LOCK_NAME).exists()

    report_url = f"s3://{bucket}/reports/second.json"
    again = run_batch(f"s3://{bucket}/requests/", options, report_url=report_url)
    assert [r.status for r in again.requests] == ["skipped", "skipped"]
    assert json.loads(fs.cat_file(report_url[len("s3://"):]))["counts"]["skipped"] == 2


def test_requests_sharing_an_output_fail_and_the_rest_run_in_parallel(ray_local, paths, tmp_path):
    requests = tmp_path / "requests"
    requests.mkdir()
    shared = str(tmp_path / "shared")
    _request(requests, "a.yml", _config(paths, 0.4), shared)
    _request(requests, "b.yml", _config(paths, 0.6), shared)
    for name in ("c", "d"):
        _request(requests, f"{name}.yml", _config(paths, 0.5 if name == "c" else 0.7), str(tmp_path / name))
    report = run_batch(str(requests), OPTIONS, parallel=2)
    by_name = {os.path.basename(r.request): r for r in report.requests}
    assert [by_name[n].status for n in ("a.yml", "b.yml", "c.yml", "d.yml")] == ["failed", "failed", "merged", "merged"]
    assert "is also the output of" in by_name["a.yml"].error and "b.yml" in by_name["a.yml"].error
    assert not os.path.exists(shared)
    reference = str(tmp_path / "reference-c")
    distmerge.merge(write_yaml(str(tmp_path / "c-plain.yml"), _config(paths, 0.5)), reference, num_workers=2,
                    memory_per_worker="64KiB")
    assert shard_bytes(str(tmp_path / "c")) == shard_bytes(reference)
