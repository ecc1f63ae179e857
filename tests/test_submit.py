"""`distmerge submit` against a real `ray start --head` (job server on 127.0.0.1, token
authentication on, as current Ray heads start): submit, submit again (one job), verify."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request

import pytest
import torch
import yaml

import distmerge
from distmerge.errors import ConfigError

from distmerge.synthetic import LlamaShape, ties_config
from helpers import cli_command, shard_bytes, write_yaml

SHAPE = LlamaShape(hidden=64, intermediate=160, layers=2, heads=4, kv_heads=2, vocab=512)
RAY_WORKER_PORTS = range(10002, 20000)


def _free_ports(count: int) -> list:
    """`count` distinct free loopback ports outside Ray's worker port range (held open until
    all are chosen, so none is handed out twice)."""
    held = []
    try:
        while len(held) < count:
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            if s.getsockname()[1] in RAY_WORKER_PORTS:
                s.close()
                continue
            held.append(s)
        return [s.getsockname()[1] for s in held]
    finally:
        for s in held:
            s.close()


def _ray_command() -> str:
    """The `ray` script of this interpreter's environment (not whatever `ray` is on PATH)."""
    beside = os.path.join(os.path.dirname(sys.executable), "ray")
    return beside if os.access(beside, os.X_OK) else "ray"


class RayHead:
    """`ray start --head --block` in its own process group, every port chosen here and bound
    to 127.0.0.1; stopped by that process group, never by name."""

    def __init__(self) -> None:
        self.temp_dir = tempfile.mkdtemp(prefix="rh-")  # short: Ray's socket paths must fit
        flags = ("--port", "--object-manager-port", "--node-manager-port", "--ray-client-server-port",
                 "--dashboard-agent-listen-port", "--dashboard-agent-grpc-port", "--runtime-env-agent-port",
                 "--metrics-export-port")
        self.dashboard_port, *chosen = _free_ports(len(flags) + 1)
        ports = dict(zip(flags, chosen))
        # The jobs run `distmerge` from the head's PATH: this environment's scripts come first.
        env = dict(os.environ, RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0",
                   PATH=os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")]))
        env.pop("RAY_ADDRESS", None)
        command = [_ray_command(), "start", "--head", "--block", "--node-ip-address", "127.0.0.1",
                   "--dashboard-host", "127.0.0.1", "--dashboard-port", str(self.dashboard_port),
                   "--num-cpus", "2", "--object-store-memory", str(300 * 2**20), "--temp-dir", self.temp_dir,
                   "--disable-usage-stats", *[str(x) for item in ports.items() for x in item]]
        self.log = open(os.path.join(self.temp_dir, "ray-start.log"), "w")
        self.process = subprocess.Popen(command, env=env, stdout=self.log, stderr=subprocess.STDOUT,
                                        start_new_session=True)
        self.address = f"http://127.0.0.1:{self.dashboard_port}"
        deadline = time.time() + 120
        while time.time() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"ray start --head exited: {self._log_tail()}")
            try:
                urllib.request.urlopen(f"{self.address}/api/version", timeout=2)
                return
            except urllib.error.HTTPError:
                return  # answering (an authentication refusal is an answer)
            except OSError:
                time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"the Ray job server did not come up: {self._log_tail()}")

    def _log_tail(self) -> str:
        with open(self.log.name) as f:
            return f.read()[-3000:]

    def stop(self) -> None:
        """Kill the head's process group, then any process of this head that left the group
        (found by its session directory under our temp dir), each by pid."""
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.process.wait()
        for pid in _pids_mentioning(self.temp_dir):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.log.close()
        shutil.rmtree(self.temp_dir, ignore_errors=True)


def _pids_mentioning(text: str) -> list:
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) != os.getpid():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    if text.encode() in f.read():
                        pids.append(int(entry))
            except OSError:
                pass
    return pids


@pytest.fixture(scope="module")
def ray_head():
    head = RayHead()
    try:
        yield head
    finally:
        head.stop()


def test_submit_runs_the_merge_on_the_cluster_once(ray_local, ray_head, model_factory, tmp_path):
    paths = model_factory(torch.bfloat16, shape=SHAPE)
    config = write_yaml(str(tmp_path / "merge.yml"), ties_config(paths))

    # the head really requires its token: a request without it is refused
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(f"{ray_head.address}/api/jobs/", timeout=10)
    assert refused.value.code == 401

    out = str(tmp_path / "merged")
    cmd, env = cli_command("submit", config, out, "--address", ray_head.address, "--num-workers", "2",
                           "--shard-size", "1MB")
    env.pop("RAY_AUTH_MODE", None)  # found the way Ray's clients find it: ~/.ray/auth_token
    first = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    assert "submitted job distmerge-merge-" in first.stdout
    assert "merged " in first.stdout and "SUCCEEDED" in first.stdout  # the job's own summary, streamed
    job_id = first.stdout.split("submitted job ")[1].split(":")[0]

    again = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert f"job {job_id} already exists (SUCCEEDED); attaching" in again.stdout
    assert "submitted job" not in again.stdout

    with open(os.path.expanduser("~/.ray/auth_token")) as f:
        token = f.read().strip()
    listing = urllib.request.Request(f"{ray_head.address}/api/jobs/", headers={"Authorization": f"Bearer {token}"})
    jobs = json.loads(urllib.request.urlopen(listing, timeout=10).read())
    assert [j["status"] for j in jobs if j.get("submission_id") == job_id] == ["SUCCEEDED"]

    local = str(tmp_path / "local")
    distmerge.merge(config, local, num_workers=2, shard_size="1MB")
    assert shard_bytes(out) == shard_bytes(local)
    check, _ = cli_command("verify", out, "--against", local)
    verified = subprocess.run(check, env=env, capture_output=True, text=True, timeout=120)
    assert verified.returncode == 0, verified.stdout

    # a batch is submitted the same way: its one request is the merge above, so it is skipped
    requests = tmp_path / "requests"
    requests.mkdir()
    write_yaml(str(requests / "m.yml"), {**yaml.safe_load(open(config)), "output": out})
    report = tmp_path / "report.json"
    cmd, _ = cli_command("submit", "--batch", str(requests), "--address", ray_head.address,
                         "--shard-size", "1MB", "--report", str(report))
    batch = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert batch.returncode == 0, batch.stdout[-3000:] + batch.stderr[-3000:]
    assert "submitted job distmerge-batch-" in batch.stdout and "1 skipped" in batch.stdout
    assert json.loads(report.read_text())["counts"]["skipped"] == 1


def test_submit_refuses_a_bad_config_before_submitting(ray_head, tmp_path):
    bad = tmp_path / "bad.yml"
    bad.write_text("merge_method: ties\nbase_model: /models/base\nmodels:\n  - model: relative/ft\n"
                   "    parameters: {weight: 1.0, density: 0.5}\n")
    cmd, env = cli_command("submit", str(bad), "s3://bucket/out", "--address", ray_head.address)
    refused = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert refused.returncode == 2
    assert "model 'relative/ft' is a relative path" in refused.stderr
    assert "submitted" not in refused.stdout


def test_a_merge_has_one_submission_id_however_it_is_written(tmp_path):
    """The id is of the merge, not of how its command line or config file is written; it
    changes with what shapes the merge."""
    from distmerge.submit import merge_request

    config = {"merge_method": "ties", "base_model": "/m/base", "dtype": "bfloat16",
              "models": [{"model": "/m/ft1", "parameters": {"weight": 0.5, "density": 0.5}}]}
    plain = write_yaml(str(tmp_path / "a.yml"), config)
    (tmp_path / "b.yml").write_text("# the same merge, written otherwise\ndtype: bfloat16\nmerge_method: ties\n"
                                    "models:\n- {model: /m/ft1, parameters: {density: 0.5, weight: 0.5}}\n"
                                    "base_model: /m/base\nstorage: {anon: false}\n")
    first = merge_request(plain, "s3://b/out", ["--memory-per-worker", "1GiB", "--storage-options", '{"a": 1, "b": 2}'])
    same = merge_request(str(tmp_path / "b.yml"), "s3://b/out/",
                         ["--memory-per-worker", "1073741824", "--shard-size", "5GB",
                          "--storage-options", '{"b": 2, "a": 1}'])
    assert first.submission_id == same.submission_id
    plain_id = merge_request(plain, "s3://b/out", []).submission_id
    assert merge_request(plain, "s3://b/other", []).submission_id != plain_id
    assert merge_request(plain, "s3://b/out", ["--shard-size", "1GB"]).submission_id != plain_id
    with pytest.raises(ConfigError, match="OUT 'out' is a relative path"):
        merge_request(plain, "out", [])
