"""The merged checkpoint: its files, their format, and bit-for-bit determinism."""

from __future__ import annotations

import ipaddress
import json
import os
import struct
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open

import distmerge
from distmerge.cli import main
from distmerge.synthetic import LlamaShape, ties_config
from helpers import load_checkpoint, read_index, shard_bytes, write_yaml


@pytest.fixture
def config_path(model_factory, tmp_path):
    paths = model_factory(torch.bfloat16, max_shard_bytes=60_000)  # inputs sharded with an index
    (open(os.path.join(paths[0], "tokenizer_config.json"), "w")).write('{"model_max_length": 2048}')
    return write_yaml(str(tmp_path / "merge.yml"), ties_config(paths, densities=(0.3, 0.5, 0.8)))


def test_checkpoint_layout_and_companion_files(ray_local, config_path, tmp_path):
    out = tmp_path / "out"
    summary = distmerge.merge(config_path, str(out), shard_size="100KB", num_workers=2)
    index = read_index(str(out))
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    count = len(shards)
    assert count == summary.shards > 1
    assert shards == [f"model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]
    assert set(index["weight_map"].values()) == set(shards)
    tensors = load_checkpoint(str(out))
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors.values())
    assert set(index["weight_map"]) == set(tensors) == set(LlamaShape().tensor_shapes())
    for shard in shards:
        with safe_open(str(out / shard), "pt") as f:
            assert f.metadata() == {"format": "pt"}
            for name in f.keys():
                assert index["weight_map"][name] == shard
        raw = (out / shard).read_bytes()
        (header_len,) = struct.unpack("<Q", raw[:8])
        header = json.loads(raw[8:8 + header_len])
        end = max(v["data_offsets"][1] for k, v in header.items() if k != "__metadata__")
        assert 8 + header_len + end == len(raw)  # no trailing bytes, no holes
        assert (8 + header_len) % 8 == 0
    config = json.loads((out / "config.json").read_text())
    assert config["torch_dtype"] == "bfloat16" and config["architectures"] == ["LlamaForCausalLM"]
    assert (out / "tokenizer_config.json").read_text() == '{"model_max_length": 2048}'
    assert (out / "generation_config.json").exists()
    card = (out / "README.md").read_text()
    assert "ties" in card and open(config_path).read().strip() in card
    assert not list(out.glob("*.partial")) and not list(out.glob("*.tmp"))
    assert summary.read_bytes >= summary.written_bytes > 0


def test_output_is_bit_identical_across_workers_and_splits(ray_local, config_path, tmp_path):
    runs = {
        "one-worker": dict(num_workers=1),
        "two-workers": dict(num_workers=2),
        "split-rows": dict(num_workers=2, memory_per_worker=32 * 1024),
        "again": dict(num_workers=2),
    }
    outputs = {}
    for name, options in runs.items():
        distmerge.merge(config_path, str(tmp_path / name), shard_size="200KB", **options)
        outputs[name] = shard_bytes(str(tmp_path / name))
    plan = distmerge.plan(config_path, memory_per_worker=32 * 1024)
    assert any(p.meta.row_start > 0 for u in plan.units for p in u.pieces)  # really split
    first = outputs["one-worker"]
    for name, files in outputs.items():
        assert files == first, f"{name} differs from one-worker"


def test_out_dtype_and_config_dtype(ray_local, model_factory, tmp_path):
    paths = model_factory(torch.float32)
    cfg = ties_config(paths, dtype="float32")
    cfg["out_dtype"] = "float16"
    path = write_yaml(str(tmp_path / "merge.yml"), cfg)
    distmerge.merge(path, str(tmp_path / "out"))
    tensors = load_checkpoint(str(tmp_path / "out"))
    assert {t.dtype for t in tensors.values()} == {torch.float16}
    assert json.loads((tmp_path / "out" / "config.json").read_text())["torch_dtype"] == "float16"


def test_plan_command_reads_headers_only(config_path, capsys, tmp_path, monkeypatch):
    import distmerge.io.reader as reader

    def no_data(*args, **kwargs):
        raise AssertionError("plan must not read tensor data")

    monkeypatch.setattr(reader, "map_range", no_data)
    assert main(["plan", config_path, str(tmp_path / "out"), "--memory-per-worker", "64KiB",
                 "--shard-size", "100KB", "--units"]) == 0
    text = capsys.readouterr().out
    for fragment in ("merge_method: ties", "work units:", "inputs (bytes read):", "output: ", "largest unit:",
                     "model-00001-of-", "split tensors:", "(streamed, ", "streamed units: ", "peak ~"):
        assert fragment in text
    assert not (tmp_path / "out").exists()


def test_cli_merge_prints_summary(ray_local, config_path, tmp_path, capsys):
    assert main(["merge", config_path, str(tmp_path / "out"), "--no-progress", "--num-workers", "2"]) == 0
    text = capsys.readouterr().out
    assert "merged 30 tensors" in text and "read " in text and "peak memory" in text


def test_cli_help_lists_every_option():
    text = subprocess.run([sys.executable, "-m", "distmerge.cli", "merge", "--help"], capture_output=True,
                          text=True, check=True).stdout
    for option in ("--address", "--num-workers", "--shard-size", "--memory-per-worker", "--overwrite",
                   "--threads-per-worker", "--no-progress"):
        assert option in text


def test_command_exit_status_is_mains(tmp_path):
    """The `distmerge` command (`console_main`, which skips the interpreter's last
    collections) exits with main's status: 2 and the error for a config that is not there."""
    proc = subprocess.run([sys.executable, "-m", "distmerge.cli", "plan", str(tmp_path / "missing.yml")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "missing.yml" in proc.stderr


def test_demo_command_runs_a_real_ties_merge(tmp_path):
    """`distmerge demo` as a user runs it: its own local Ray, then a TIES merge we check."""
    env = dict(os.environ, RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0")
    proc = subprocess.run([sys.executable, "-m", "distmerge.cli", "demo", "--out", str(tmp_path)],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "merged 30 tensors" in proc.stdout
    merged = load_checkpoint(str(tmp_path / "merged"))
    base = load_checkpoint(str(tmp_path / "models" / "base"))
    changed = sum((merged[n] != base[n]).sum().item() for n in merged)
    assert changed > 0.3 * sum(t.numel() for t in merged.values())


def test_ray_listens_on_loopback_only(ray_local, config_path, tmp_path):
    """Every listening socket of this process and its children (Ray's) is on 127.0.0.1."""
    import psutil

    distmerge.merge(config_path, str(tmp_path / "out"), num_workers=2)
    ours = {p.pid for p in psutil.Process().children(recursive=True)} | {os.getpid()}
    listening = [c for c in psutil.net_connections(kind="inet")
                 if c.status == psutil.CONN_LISTEN and c.pid in ours]
    assert listening, "expected Ray's servers among the listeners"
    def loopback(ip: str) -> bool:
        address = ipaddress.ip_address(ip)
        return address.is_loopback or bool(getattr(address, "ipv4_mapped", None) and address.ipv4_mapped.is_loopback)

    elsewhere = [(c.laddr.ip, c.laddr.port, c.pid) for c in listening if not loopback(c.laddr.ip)]
    assert not elsewhere
    # nor does Ray's dashboard process report usage statistics off the machine
    dashboards = [p for p in psutil.Process().children(recursive=True)
                  if any("dashboard" in part for part in p.cmdline())]
    assert dashboards and all(p.environ().get("RAY_USAGE_STATS_ENABLED") == "0" for p in dashboards)


def test_object_store_fits_in_shared_memory(monkeypatch):
    """A local Ray's object store is cut to 80% of /dev/shm's free room (beyond it, Ray
    would put the store in /tmp, on disk), and left alone where that is under 512 MiB."""
    from distmerge import job

    def shm_with(free: int):
        monkeypatch.setattr(job.os, "statvfs", lambda path: os.statvfs_result((4096, 4096, 0, 0, free // 4096,
                                                                               0, 0, 0, 0, 255)))

    shm_with(20 * 2**30)
    assert job.fit_shared_memory(8 * 2**30) == 8 * 2**30
    shm_with(5 * 2**30)
    assert job.fit_shared_memory(8 * 2**30) == 4 * 2**30
    shm_with(700 * 2**20)
    assert job.fit_shared_memory(8 * 2**30) == 560 * 2**20
    shm_with(600 * 2**20)  # room for less than 512 MiB: Ray's own fallback to /tmp decides
    assert job.fit_shared_memory(8 * 2**30) == 8 * 2**30
    shm_with(64 * 2**20)  # Docker's default: Ray uses /tmp whatever we ask
    assert job.fit_shared_memory(8 * 2**30) == 8 * 2**30
