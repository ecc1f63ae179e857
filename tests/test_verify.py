"""`distmerge verify`: passes on what merge wrote, names each kind of damage, compares bit for bit."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

import distmerge
from distmerge.cli import main
from distmerge.synthetic import ties_config
from distmerge.verify import verify_checkpoint
from helpers import write_yaml


@pytest.fixture(scope="module")
def merged(ray_local, model_factory, tmp_path_factory):
    paths = model_factory(torch.bfloat16)
    root = tmp_path_factory.mktemp("verify")
    cfg = write_yaml(str(root / "m.yml"), ties_config(paths))
    distmerge.merge(cfg, str(root / "a"), shard_size="150KB", num_workers=2)
    distmerge.merge(cfg, str(root / "b"), shard_size="300KB", num_workers=1, memory_per_worker=64 * 1024)
    return root, paths


def _copy(root, tmp_path):
    shutil.copytree(root / "a", tmp_path / "c")
    return tmp_path / "c"


def test_merge_output_passes_and_matches_a_differently_sharded_run(merged, capsys):
    root, _ = merged
    report = verify_checkpoint(str(root / "a"), against=str(root / "b"))
    assert report.ok, report.format()
    assert report.shards > 1 and report.checksums_checked == report.shards and report.compared_bytes > 0
    assert main(["verify", str(root / "a"), "--against", str(root / "b")]) == 0
    assert capsys.readouterr().out.startswith("PASS")


def test_against_a_different_model_fails(merged):
    root, paths = merged
    report = verify_checkpoint(str(root / "a"), against=paths[0])
    assert not report.ok and any("differs" in p for p in report.problems)
    assert main(["verify", str(root / "a"), "--against", paths[0]]) == 1


def test_flipped_byte_fails_the_checksum(merged, tmp_path):
    out = _copy(merged[0], tmp_path)
    shard = sorted(out.glob("*.safetensors"))[0]
    data = bytearray(shard.read_bytes())
    data[-100] ^= 0x01
    shard.write_bytes(bytes(data))
    report = verify_checkpoint(str(out))
    assert not report.ok and any(shard.name in p and "checksum" in p for p in report.problems)


def test_index_problems_are_named(merged, tmp_path):
    out = _copy(merged[0], tmp_path)
    index_path = out / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    dropped = sorted(index["weight_map"])[0]
    del index["weight_map"][dropped]
    index["metadata"]["total_size"] += 2
    index_path.write_text(json.dumps(index))
    problems = "\n".join(verify_checkpoint(str(out)).problems)
    assert f"{dropped!r} is in the shard but the index does not list it" in problems
    assert "total_size" in problems


def test_missing_or_truncated_shard(merged, tmp_path):
    out = _copy(merged[0], tmp_path)
    shards = sorted(out.glob("*.safetensors"))
    shards[0].unlink()
    shards[1].write_bytes(shards[1].read_bytes()[:-10])
    problems = "\n".join(verify_checkpoint(str(out)).problems)
    assert shards[0].name in problems and shards[1].name in problems


def test_block_hasher_matches_a_read_back_checksum_for_any_write_order(tmp_path):
    """Shard bytes written in random order, some ranges twice, across block edges: the
    digests hashed as blocks complete give the checksum of reading the file back."""
    import os
    import random

    from distmerge.io import checksum
    from distmerge.io.layout import OutputTensor, plan_layout
    from distmerge.output.local_writer import BlockHasher

    layout = plan_layout([OutputTensor(f"t{i}", "BF16", (1000 + 37 * i,), 2 * (1000 + 37 * i)) for i in range(9)],
                         6000)
    hasher = BlockHasher(layout, 4096)
    rng = random.Random(7)
    for index, shard in enumerate(layout.shards):
        path = tmp_path / shard.file_name
        data = bytes(shard.header) + rng.randbytes(shard.size - len(shard.header))
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        os.ftruncate(fd, shard.size)
        cuts = sorted(rng.sample(range(1, shard.size), 12))
        ranges = list(zip([0] + cuts, cuts + [shard.size]))
        rng.shuffle(ranges)
        for a, b in ranges + ranges[:2]:  # two ranges written again
            os.pwrite(fd, data[a:b], a)
            hasher.written(index, a, b - a, fd)
        read = lambda a, b, fd=fd: os.pread(fd, b - a, a)  # noqa: E731
        assert hasher.checksum(index, read) == checksum.checksum_of(read, shard.size, 4096)
        os.close(fd)
    hasher.close()
