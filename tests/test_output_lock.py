"""The output's lock (local flock, S3 conditional writes), the free-space check, and a disk
that fills up mid-merge (the merge stays resumable)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time

import pytest
import torch

import distmerge
from distmerge.errors import LockLost, OutputError, OutputFull
from distmerge.io.storage import Storage
from distmerge.output import resume
from distmerge.output.destination import Destination
from distmerge.output.lock import LOCK_NAME, OutputLocked, output_lock
from distmerge.synthetic import LlamaShape, ties_config
from helpers import shard_bytes, write_yaml

SHAPE = LlamaShape(hidden=64, intermediate=160, layers=2, heads=4, kv_heads=2, vocab=1024)


@pytest.fixture(scope="module")
def config_path(model_factory, tmp_path_factory):
    paths = model_factory(torch.bfloat16, shape=SHAPE)
    return write_yaml(str(tmp_path_factory.mktemp("lock") / "merge.yml"), ties_config(paths))


def test_merge_into_a_locked_output_is_refused_naming_the_holder(ray_local, config_path, tmp_path):
    out = str(tmp_path / "out")
    held = output_lock(Destination(out, Storage()), purpose="distmerge batch")
    held.acquire()
    try:
        with pytest.raises(OutputLocked) as refused:
            distmerge.merge(config_path, out)
        assert f"output {out} is being merged by distmerge batch (" in str(refused.value)
        assert f"pid {os.getpid()}, since " in str(refused.value)
        assert f"stop it (pid {os.getpid()} on " in str(refused.value)
        assert os.listdir(out) == [LOCK_NAME]  # refused before anything was written
    finally:
        held.release()
    summary = distmerge.merge(config_path, out, num_workers=2)
    assert summary.tensors > 0 and LOCK_NAME not in os.listdir(out)


def test_a_crashed_holder_leaves_no_local_lock(tmp_path):
    """flock dies with its process: a SIGKILLed merge does not block the next one."""
    out = str(tmp_path / "out")
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time\n"
        "from distmerge.io.storage import Storage\n"
        "from distmerge.output.destination import Destination\n"
        "from distmerge.output.lock import output_lock\n"
        f"output_lock(Destination({out!r}, Storage())).acquire()\n"
        "print('held', flush=True)\n"
        "time.sleep(600)\n")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(OutputLocked, match=f"pid {holder.pid}"):
            output_lock(Destination(out, Storage())).acquire()
    finally:
        holder.kill()
        holder.wait()
    lock = output_lock(Destination(out, Storage()))
    lock.acquire()
    lock.release()


def test_s3_lock_is_exclusive_goes_stale_and_knows_when_it_is_lost(s3):
    fs = s3.filesystem()
    fs.mkdir("locks")
    storage = Storage(dict(s3.options))

    def lock(ttl: float):
        return output_lock(Destination("s3://locks/out", storage), purpose="distmerge batch", ttl=ttl)

    def race(takers) -> list:
        """Everyone tries at once; (winners, what the others raised)."""
        won, refused, barrier = [], [], threading.Barrier(len(takers))

        def take(taker):
            barrier.wait()
            try:
                taker.acquire()
                won.append(taker)
            except Exception as err:  # noqa: BLE001 - collected and checked below
                refused.append(err)

        threads = [threading.Thread(target=take, args=(t,)) for t in takers]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(won) == 1 and len(refused) == len(takers) - 1
        assert all(isinstance(err, OutputLocked) for err in refused), refused
        return won[0]

    for _ in range(3):  # many takers at once: exactly one wins each round
        race([lock(60) for _ in range(4)]).release()
        assert not fs.exists(f"locks/out/{LOCK_NAME}")

    # a holder that stops renewing (on another machine: crashed) keeps the lock until it is
    # stale by the server's clock; then of several takers exactly one takes it over
    crashed = lock(3.0)
    crashed.acquire()
    crashed._stop.set()
    crashed._renewer.join()
    crashed.record["machine"] = "another machine"
    fs.pipe_file(f"locks/out/{LOCK_NAME}", json.dumps(crashed.record).encode())
    crashed.etag = fs.info(f"locks/out/{LOCK_NAME}", refresh=True)["ETag"]
    with pytest.raises(OutputLocked, match="goes stale .* s after its last renewal"):
        lock(60).acquire()
    time.sleep(4.5)
    successor = race([lock(60) for _ in range(3)])
    assert crashed.renew() is False
    with pytest.raises(LockLost, match="lost its lock"):
        crashed.check_held()
    crashed.etag = None  # it no longer holds anything to release
    successor.release()

    # a live holder renews: it outlives its time to live
    live = lock(2.0)
    live.acquire()
    time.sleep(3.5)
    with pytest.raises(OutputLocked):
        lock(60).acquire()
    live.check_held()
    live.release()


def test_s3_lock_of_a_killed_process_here_is_taken_at_once(s3):
    """A merge SIGKILLed on this machine leaves its S3 lock; the next run here sees that its
    holder is gone (same boot and pid namespace, no such process) and need not wait."""
    s3.filesystem().mkdir("killed")
    holder = subprocess.Popen([sys.executable, "-c", (
        "import json, sys, time\n"
        "from distmerge.io.storage import Storage\n"
        "from distmerge.output.destination import Destination\n"
        "from distmerge.output.lock import output_lock\n"
        f"output_lock(Destination('s3://killed/out', Storage(json.loads({json.dumps(json.dumps(s3.options))})))"
        ").acquire()\n"
        "print('held', flush=True)\n"
        "time.sleep(600)\n")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(OutputLocked, match=f"pid {holder.pid}"):
            output_lock(Destination("s3://killed/out", Storage(dict(s3.options)))).acquire()
    finally:
        holder.kill()
        holder.wait()
    started = time.perf_counter()
    successor = output_lock(Destination("s3://killed/out", Storage(dict(s3.options))))
    successor.acquire()
    assert time.perf_counter() - started < 30  # not the 300 s time to live
    successor.release()


def test_too_little_space_is_refused_before_anything_starts(config_path, small_disk):
    disk = small_disk(256 * 1024)
    out = os.path.join(disk, "out")
    with pytest.raises(OutputError, match=r"the checkpoint needs .* more on its filesystem, which has .* free"):
        distmerge.merge(config_path, out)
    assert os.listdir(out) == []


def test_a_disk_filled_mid_merge_keeps_the_merge_resumable(ray_local, config_path, tmp_path, small_disk):
    options = dict(num_workers=2, memory_per_worker="64KiB", shard_size="1MB")
    reference = tmp_path / "reference"
    summary = distmerge.merge(config_path, str(reference), **options)
    size = sum(os.path.getsize(reference / n) for n in os.listdir(reference))
    disk = small_disk(size + 20 * 2**20)
    out = os.path.join(disk, "out")
    filler = os.path.join(disk, "filler")
    progress = os.path.join(out, resume.PROGRESS)

    def fill_when_started() -> None:
        """Another writer takes every free byte once the merge has made some units durable."""
        deadline = time.time() + 120
        while time.time() < deadline:
            if os.path.exists(progress) and os.path.getsize(progress) > 0:
                break
            time.sleep(0.001)
        with open(filler, "wb") as f:
            try:
                while True:
                    f.write(b"\0" * 2**20)
                    f.flush()
            except OSError:
                pass

    thread = threading.Thread(target=fill_when_started)
    thread.start()
    with pytest.raises(OutputFull, match="no space left on the output's filesystem.*re-run the same merge"):
        distmerge.merge(config_path, out, **options)
    thread.join()
    names = os.listdir(out)
    assert "model.safetensors.index.json" not in names and resume.MANIFEST in names
    assert any(n.endswith(".partial") for n in names) and LOCK_NAME not in names
    os.remove(filler)
    resumed = distmerge.merge(config_path, out, **options)
    assert resumed.reused_units >= 8, resumed.reused_units
    assert shard_bytes(out) == shard_bytes(str(reference))
    print(f"disk filled after {resumed.reused_units} of {summary.units} units; resumed and finished")


@pytest.fixture
def small_disk(tmp_path):
    """make(size) -> a directory on a tmpfs of that many bytes (needs root to mount)."""
    mounts = []

    def make(size: int) -> str:
        point = tmp_path / f"disk{len(mounts)}"
        point.mkdir()
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(point)],
                              capture_output=True, text=True)
        if done.returncode != 0:
            pytest.skip(f"cannot mount a small tmpfs here: {done.stderr.strip()}")
        mounts.append(point)
        return str(point)

    yield make
    for point in mounts:
        subprocess.run(["umount", "-l", str(point)], check=False)
