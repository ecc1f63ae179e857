"""Cluster scale on paper: the expected wall time of a 405B TIES merge from S3 to S3 on 1, 4
and 16 nodes, from the real plan, measured per-element costs and stated network figures.

Nothing here runs on a cluster or touches S3. The script

1. writes four Llama-3.1-405B-shaped checkpoints as *header-only* safetensors files under
   bench/work/model_cluster/405b (base + three fine-tunes, 191 shards each, bf16; every file
   is truncated to its full size, so it is sparse and takes a few MB of disk), and plans a
   TIES merge of them with the real planner (`distmerge.api.plan`, `--memory-per-worker`,
   default 4GiB), counting the storage requests planning makes (every `ModelFiles` call:
   HEAD or GET on S3). From the plan it takes the units, the statistics rounds (only a
   model-wide statistic has driver rounds; a split tensor whose statistics are per tensor
   is one streamed unit that reads its inputs once), the bytes read per round, the output
   bytes, shards and multipart parts, and the elements of every piece;
2. measures on this machine, single-threaded (`torch.set_num_threads(1)`, as a worker with
   `--threads-per-worker 1`), the real worker code (`distmerge.engine.worker.merge_unit`
   and `collect_unit`, the TIES method, local memory-mapped inputs in the page cache) on a
   real bf16 tensor of the 405B row width (2048 x 16384, base + three fine-tunes with
   heavy-tailed deltas): seconds per element of a streamed unit (the tensor cut into pieces
   of 16.8M elements, well past the L3 cache, each applied in cache-sized ranges; 2.1M-element
   pieces are timed too, to show the trend), and of the whole protocol of a tensor merged
   whole (one read,
   cache-sized sub-pieces). It also times the byte primitives of the S3 client
   and of the writer on part-sized buffers (16 MiB): memcpy, SHA-256 (the part checksums), CRC32
   (botocore's default upload checksum), AES-GCM (TLS, with `cryptography`);
3. combines them per round (the driver runs every statistics round, then the apply round,
   with a barrier between rounds; only apply produces output):

       round time = max(compute, S3 read, writer ingress, writer egress, writer CPU) + fill

   - compute = CPU-seconds of the round / (nodes x task slots), where CPU-seconds =
     elements x measured cost + bytes read x S3 client CPU per byte + tasks x Ray task
     overhead; never less than the longest unit;
   - S3 read = bytes read in the round / (nodes x per-node read rate), the per-node rate
     being min(S3 GET bandwidth, NIC); on more than one node the writer node's NIC also
     takes every result from the other nodes, so also (reads + results crossing) /
     ((nodes - 1) x read rate + NIC), as if the scheduler gave the writer node fewer units;
   - writer ingress (apply only) = output bytes x (nodes - 1) / nodes / Ray transfer rate:
     every unit's result goes from its worker to the one writer actor on the driver node;
   - writer egress (apply only) = output bytes / upload rate of the writer node: min(NIC,
     upload threads x per-connection PUT rate, with one marker PUT per part);
   - writer CPU (apply only) = output bytes x the busiest of the writer's serial paths:
     the GIL-held copies (part buffer, `bytes(body)`), the s3fs event-loop thread (TLS
     encryption + CRC32), SHA-256 spread over the upload threads;
   - fill = one mean unit duration per round (the first wave before anything completes,
     the ragged end at the barrier).

   Fixed costs are added once: Ray (join the cluster, start worker processes and import
   torch), planning (measured CPU + the counted requests x S3 latency / the requests in
   flight: every input at once, HEADER_READERS shard headers each, at most one S3 client's
   10 connections), the writer's start (create one multipart upload per shard, one at a time) and
   the commit (complete each upload, remove the part markers, companion files, index).
   The "no overlap" column adds compute and S3 read instead of taking their maximum: a task
   fetches its inputs, then computes, so overlap comes only from many tasks per node.

   When the plan reads some input bytes more than once (a model-wide statistic), the
   model is printed again with read-once inputs, everything else equal; and, always, with
   read-once inputs and a writer uploading with more threads
   (--what-if-upload-threads, default 32), to show the bound that comes next.

What is measured and what is assumed:

- measured here: the plan (units, bytes, rounds, requests, planning CPU on local headers),
  the per-element costs of the worker code, the byte primitives. This is a 2-core VM
  shared with other work: costs are the best of --repeats runs (byte primitives: best of
  5) and still move 20-30% between runs; a cluster core may be faster or slower: scale
  with --cpu-scale.
- assumed (options, defaults in brackets): cores per node [32], all used as task slots
  (as many as memory allows: --node-memory-gib [256], 30% kept for Ray's object store,
  --memory-per-worker per task) and `--num-workers` = nodes x slots (the default is the
  driver's CPU count, which would cap the whole cluster at 2 x that many units in
  flight); NIC [10 Gb/s, full duplex]; per-node S3 GET rate [= NIC: 8 concurrent
  8 MiB ranged GETs per task, 32 tasks a node, is taken to reach line rate]; Ray object
  transfer between nodes [= NIC]; per-connection S3 PUT rate [90 MB/s, the order of AWS's
  per-request guidance; not verified here] and the writer's upload threads
  (`distmerge.output.multipart.UPLOAD_THREADS`); S3 request latency [50 ms; AWS quotes
  100-200 ms first-byte latency]; Ray start [10 s]; Ray task overhead [10 ms a task];
  S3 client CPU per byte = the measured AES-GCM + two copies (primitives only, without
  Python/aiohttp overhead: a floor). That is s3fs's path, which a cluster on AWS takes
  when its credentials come from instance or pod roles; distmerge's direct read client
  (static credentials; `distmerge/io/s3_direct.py`) decrypts straight into the fetch
  buffer, one copy fewer, and planning through it is not held to s3fs's 10
  connections. Each node's memory is taken to hold its slots' units.
- not modelled: S3 throttling (3,500 PUT / 5,500 GET per second per prefix: the reads
  here are ~150 GET/s of 8 MiB per 10 Gb/s node, 2,400/s on 16 nodes), stragglers and retries, the writer's
  threads competing with 32 worker tasks for the driver node's cores (the writer actor
  reserves no CPU), object store spilling when results wait for a slow writer, and the
  driver's own per-round reductions (histograms of 65,536 bins per split tensor: small).

Run: `python bench/model_cluster.py [--cores-per-node 32] [--nic-gbps 10]
[--s3-gbps-per-node 10] [--memory-per-worker 4GiB] [--json bench/work/model_cluster/model_cluster.json]`
(about 20 s; the first run also writes the inputs: a few MB of headers, 270 MB of real tensors).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import math
import os
import struct
import sys
import time
import zlib
from collections import Counter
from dataclasses import asdict, dataclass, field, replace
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from distmerge.api import plan as plan_merge
from distmerge.config import load_config
from distmerge.engine.worker import WHOLE_GROUP, collect_unit, merge_unit
from distmerge.io.checkpoint import HEADER_READERS, ModelFiles
from distmerge.methods import get_method
from distmerge.output.multipart import DEFAULT_PART_SIZE, UPLOAD_THREADS, part_count
from distmerge.planner import MergePlan
from distmerge.sizes import format_bytes, parse_size
from distmerge.synthetic import LlamaShape, base_tensor, delta_tensor, write_checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

WORK = os.path.join(ROOT, "bench", "work", "model_cluster")
LLAMA_405B = LlamaShape(hidden=16384, intermediate=53248, layers=126, heads=128, kv_heads=8, vocab=128256)
SHARDS_405B = 191
FINE_TUNES = 3
TIES_MODELS = ((0.5, 0.5), (0.3, 0.5), (0.2, 0.5))  # (weight, density) as configs/ties.yml
MARKER_VERSION = 1
MEASURE_TENSOR = "model.layers.0.mlp.up_proj.weight"
MEASURE_SHAPE = (2048, 16384)  # the 405B row width; 33.5M elements per input
GB = 10**9


# -- the 405B workload, from the real planner ----------------------------------------------


def _ties_yaml(paths: Sequence[str]) -> str:
    lines = ["merge_method: ties", f"base_model: {json.dumps(paths[0])}", "models:"]
    for path, (weight, density) in zip(paths[1:], TIES_MODELS):
        lines += [f"  - model: {json.dumps(path)}", f"    parameters: {{weight: {weight}, density: {density}}}"]
    lines += ["parameters: {normalize: true, int8_mask: true}", "dtype: bfloat16", ""]
    return "\n".join(lines)


def write_header_only_checkpoint(path: str, shape: LlamaShape, shards: int) -> None:
    """A checkpoint whose shards hold a real safetensors header and no data: each file is
    truncated to its full size (sparse). Tensors go to shards in order, cut by byte offset."""
    os.makedirs(path, exist_ok=True)
    shapes = shape.tensor_shapes()
    sizes = {name: math.prod(s) * 2 for name, s in shapes.items()}
    total = sum(sizes.values())
    assert max(sizes.values()) < total / shards, "a tensor bigger than a shard's share would leave a shard empty"
    per_shard: List[List[str]] = [[] for _ in range(shards)]
    offset = 0
    for name in shapes:
        per_shard[min(shards - 1, offset * shards // total)].append(name)
        offset += sizes[name]
    weight_map = {}
    for i, names in enumerate(per_shard):
        file_name = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        header: Dict[str, object] = {"__metadata__": {"format": "pt"}}
        start = 0
        for name in names:
            header[name] = {"dtype": "BF16", "shape": list(shapes[name]), "data_offsets": [start, start + sizes[name]]}
            start += sizes[name]
            weight_map[name] = file_name
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        with open(os.path.join(path, file_name), "wb") as f:
            f.write(struct.pack("<Q", len(raw)) + raw)
            f.truncate(8 + len(raw) + start)
    with open(os.path.join(path, "model.safetensors.index.json"), "w", encoding="utf-8") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f)
    with open(os.path.join(path, "config.json"), "w", encoding="utf-8") as f:
        json.dump(shape.hf_config(torch.bfloat16), f, indent=2)


def make_405b_inputs(root: str) -> List[str]:
    """Base + fine-tunes of header-only 405B checkpoints under `root`, reused when present."""
    args = {"version": MARKER_VERSION, "shape": asdict(LLAMA_405B), "shards": SHARDS_405B, "fine_tunes": FINE_TUNES}
    paths = [os.path.join(root, "base")] + [os.path.join(root, f"ft{i}") for i in range(1, FINE_TUNES + 1)]
    marker = os.path.join(root, "inputs.json")
    with contextlib.suppress(FileNotFoundError, ValueError):
        with open(marker, encoding="utf-8") as f:
            if json.load(f) == args and all(os.path.exists(os.path.join(p, "model.safetensors.index.json"))
                                            for p in paths):
                return paths
    for path in paths:
        write_header_only_checkpoint(path, LLAMA_405B, SHARDS_405B)
    with open(marker, "w", encoding="utf-8") as f:
        json.dump(args, f)
    return paths


def disk_usage(paths: Sequence[str]) -> Tuple[int, int]:
    """(apparent bytes, allocated bytes) of every file under `paths`."""
    apparent = allocated = 0
    for path in paths:
        for entry in os.scandir(path):
            st = entry.stat()
            apparent += st.st_size
            allocated += st.st_blocks * 512
    return apparent, allocated


@contextlib.contextmanager
def counting_storage_calls(counts: Counter):
    """Count every metadata call planning makes through `ModelFiles` (each is an S3 request)."""
    originals = {name: getattr(ModelFiles, name) for name in ("info", "exists", "read", "list_names")}

    def wrap(name, original):
        def counted(self, *args, **kwargs):
            counts[name] += 1
            return original(self, *args, **kwargs)
        return counted

    for name, original in originals.items():
        setattr(ModelFiles, name, wrap(name, original))
    try:
        yield counts
    finally:
        for name, original in originals.items():
            setattr(ModelFiles, name, original)


@dataclass
class Round:
    """One barrier-separated round of the driver: a statistics phase, or apply."""

    name: str
    elements: Dict[str, int] = field(default_factory=dict)  # cost class -> elements
    read_bytes: int = 0
    read_once_bytes: int = 0  # bytes it would read if every input byte were fetched once
    out_bytes: int = 0
    tasks: int = 0
    unit_elements: List[Dict[str, int]] = field(default_factory=list)  # per unit: cost class -> elements
    unit_read_bytes: List[int] = field(default_factory=list)


@dataclass
class Workload:
    units: int
    tensors: int
    split_tensors: int
    distributed_groups: int
    pieces: int
    input_bytes: int
    read_bytes_by_input: List[int]
    output_bytes: int
    output_shards: int
    output_parts: int
    memory_per_worker: int
    largest_unit_memory: int
    phases: Dict[str, int]
    rounds: List[Round]
    plan_seconds: float
    plan_requests: Dict[str, int]

    @property
    def read_bytes(self) -> int:
        return sum(r.read_bytes for r in self.rounds)

    @property
    def amplification(self) -> float:
        return self.read_bytes / self.input_bytes


def workload_from_plan(plan: MergePlan, plan_seconds: float, requests: Counter, part_size: int) -> Workload:
    """Rounds as the driver runs them: each statistics round reads the pieces of every split
    tensor whose group has that phase; apply reads every piece once more."""
    groups = plan.groups
    stats_steps: List[str] = []
    for g in groups.values():
        if g.distributed:
            for i, phase in enumerate(g.statistics.phases):
                for _ in range(phase.of if phase.repeats else 1):
                    if len(stats_steps) <= i:
                        stats_steps.append(phase.step)
    rounds = [Round(f"statistics {i + 1}: {step}") for i, step in enumerate(stats_steps)]
    apply = Round("apply")
    pieces_per_tensor: Counter = Counter()
    for unit in plan.units:
        per_round: Dict[int, Tuple[Dict[str, int], int]] = {}
        apply_elems: Dict[str, int] = {}
        apply_read = 0
        for piece in unit.pieces:
            pieces_per_tensor[piece.meta.tensor] += 1
            group = groups[piece.group]
            nbytes = sum(s.nbytes for s in piece.sources)
            numel = piece.meta.numel
            if unit.streamed:  # the whole protocol in one task, each input byte read once
                cls = "apply:streamed"
                apply.read_once_bytes += nbytes
            elif group.distributed:
                steps = [p.step for p in group.statistics.phases]
                for i, step in enumerate(steps):
                    cls = f"stats:{step}"
                    rounds[i].elements[cls] = rounds[i].elements.get(cls, 0) + numel
                    rounds[i].read_bytes += nbytes
                    rounds[i].read_once_bytes += nbytes if i == 0 else 0
                    elems, b = per_round.get(i, ({}, 0))
                    elems[cls] = elems.get(cls, 0) + numel
                    per_round[i] = (elems, b + nbytes)
                cls = "apply:split"
            else:
                cls = "apply:whole"
                apply.read_once_bytes += nbytes
            apply.elements[cls] = apply.elements.get(cls, 0) + numel
            apply.read_bytes += nbytes
            apply.out_bytes += piece.out_nbytes
            apply_elems[cls] = apply_elems.get(cls, 0) + numel
            apply_read += nbytes
        for i, (elems, b) in per_round.items():
            rounds[i].tasks += 1
            rounds[i].unit_elements.append(elems)
            rounds[i].unit_read_bytes.append(b)
        apply.tasks += 1
        apply.unit_elements.append(apply_elems)
        apply.unit_read_bytes.append(apply_read)
    rounds.append(apply)
    input_bytes = sum(c.nbytes for c in plan.checkpoints)
    by_input = plan.read_bytes_by_input()
    assert sum(r.read_bytes for r in rounds) == sum(by_input), "rounds disagree with the plan's read bytes"
    parts = sum(part_count(s.size, part_size) for s in plan.layout.shards)
    return Workload(
        units=len(plan.units), tensors=plan.tensor_count,
        split_tensors=sum(1 for n in pieces_per_tensor.values() if n > 1),
        distributed_groups=sum(1 for g in groups.values() if g.distributed),
        pieces=sum(len(u.pieces) for u in plan.units), input_bytes=input_bytes, read_bytes_by_input=by_input,
        output_bytes=plan.layout.total_size, output_shards=len(plan.layout.shards), output_parts=parts,
        memory_per_worker=plan.memory_per_worker, largest_unit_memory=max(u.memory for u in plan.units),
        phases={" -> ".join(k + ("apply",)): v for k, v in plan.phase_lists().items()},
        rounds=rounds, plan_seconds=plan_seconds, plan_requests=dict(requests))


def plan_405b(memory_per_worker: str, part_size: int) -> Tuple[Workload, Tuple[int, int]]:
    root = os.path.join(WORK, "405b")
    paths = make_405b_inputs(root)
    config_path = os.path.join(root, "ties.yml")
    with open(config_path, "w", encoding="utf-8") as f:
        f.write(_ties_yaml(paths))
    counts: Counter = Counter()
    with counting_storage_calls(counts):
        t0 = time.perf_counter()
        plan = plan_merge(config_path, memory_per_worker=memory_per_worker, num_workers=1)
        seconds = time.perf_counter() - t0
    return workload_from_plan(plan, seconds, counts, part_size), disk_usage(paths)


# -- measured costs --------------------------------------------------------------------------


def make_measure_inputs(root: str) -> List[str]:
    """Base + fine-tunes holding one real bf16 tensor of MEASURE_SHAPE (reused when present)."""
    args = {"version": MARKER_VERSION, "tensor": MEASURE_TENSOR, "shape": list(MEASURE_SHAPE), "fine_tunes": FINE_TUNES}
    paths = [os.path.join(root, "base")] + [os.path.join(root, f"ft{i}") for i in range(1, FINE_TUNES + 1)]
    marker = os.path.join(root, "inputs.json")
    with contextlib.suppress(FileNotFoundError, ValueError):
        with open(marker, encoding="utf-8") as f:
            if json.load(f) == args and all(os.path.exists(os.path.join(p, "model.safetensors")) for p in paths):
                return paths
    shape = LlamaShape(hidden=MEASURE_SHAPE[1], intermediate=MEASURE_SHAPE[0], layers=1)
    base = base_tensor(MEASURE_TENSOR, MEASURE_SHAPE, 0)
    for model, path in enumerate(paths):
        t = base if model == 0 else base + delta_tensor(MEASURE_TENSOR, MEASURE_SHAPE, 0, model, 0.5)
        write_checkpoint(path, {MEASURE_TENSOR: t.to(torch.bfloat16).contiguous()}, shape.hf_config(torch.bfloat16))
        del t
    with open(marker, "w", encoding="utf-8") as f:
        json.dump(args, f)
    return paths


def _budget_for_rows(rows: int, config) -> int:
    """A --memory-per-worker that cuts MEASURE_SHAPE into pieces of `rows` rows (planner's formula)."""
    per_element = config.method.working_set_factor(FINE_TUNES) * 2 + 2 * (FINE_TUNES + 1) + 2
    return int((rows + 0.5) * MEASURE_SHAPE[1] * per_element)


def run_protocol(plan: MergePlan) -> Dict[str, Tuple[float, int]]:
    """Run the plan as the driver does, without Ray: every statistics round through
    `collect_unit`, reductions through the method, then `apply_unit` for each unit.
    Returns cost class -> (seconds, elements)."""
    method = get_method(plan.config.method.name)
    storage = plan.config.storage
    groups = {gid: g for gid, g in plan.groups.items() if g.distributed}
    carries = {gid: list(g.statistics.carries) for gid, g in groups.items()}
    done = {gid: 0 for gid in groups}
    timing: Dict[str, Tuple[float, int]] = {}
    phases = {gid: p for gid, g in groups.items() if (p := method.next_phase(g.statistics, 0, carries[gid]))}
    while phases:
        by_unit: Dict[int, list] = {}
        slot = {}
        for gid, phase in phases.items():
            for position, (u, j) in enumerate(groups[gid].pieces):
                by_unit.setdefault(u, [None] * len(plan.units[u].pieces))[j] = (phase, carries[gid][position])
                slot[(u, j)] = (gid, position)
        partials = {gid: [None] * len(groups[gid].pieces) for gid in phases}
        for u, work in by_unit.items():
            unit = plan.units[u]
            t0 = time.perf_counter()
            results, _ = collect_unit(unit, method.name, work, storage, threads=1)
            seconds = time.perf_counter() - t0
            for j, task in enumerate(work):
                if task is not None:
                    gid, position = slot[(u, j)]
                    partials[gid][position] = results[j]
                    cls = f"stats:{task[0].step}"
                    s, n = timing.get(cls, (0.0, 0))
                    timing[cls] = (s + seconds * unit.pieces[j].meta.numel / sum(
                        unit.pieces[k].meta.numel for k, w in enumerate(work) if w is not None),
                        n + unit.pieces[j].meta.numel)
        following = {}
        for gid, phase in phases.items():
            metas = [plan.units[u].pieces[j].meta for u, j in groups[gid].pieces]
            carries[gid] = method.reduce(phase, metas, partials[gid], carries[gid])
            done[gid] += 1
            if (nxt := method.next_phase(groups[gid].statistics, done[gid], carries[gid])) is not None:
                following[gid] = nxt
        phases = following
    position = {ref: i for g in plan.groups.values() for i, ref in enumerate(g.pieces)}
    for unit in plan.units:
        unit_carries = [carries[p.group][position[(unit.index, j)]] if p.group in groups else WHOLE_GROUP
                        for j, p in enumerate(unit.pieces)]
        if unit.streamed:
            cls = "apply:streamed"
        else:
            cls = "apply:split" if any(p.group in groups for p in unit.pieces) else "apply:whole"
        t0 = time.perf_counter()
        for _ in merge_unit(unit, method.name, unit_carries, storage, threads=1):
            pass
        seconds = time.perf_counter() - t0
        s, n = timing.get(cls, (0.0, 0))
        timing[cls] = (s + seconds, n + sum(p.meta.numel for p in unit.pieces))
    return timing


def measure_worker_costs(repeats: int) -> Dict[str, dict]:
    """Seconds per element of each cost class, best of `repeats`, at two piece sizes."""
    root = os.path.join(WORK, "measure")
    paths = make_measure_inputs(root)
    text = _ties_yaml(paths)
    config = load_config(text, is_text=True, source="model_cluster-measure.yml")
    torch.set_num_threads(1)
    setups = {"split_16m": _budget_for_rows(MEASURE_SHAPE[0] // 2, config),
              "split_2m": _budget_for_rows(MEASURE_SHAPE[0] // 16, config),
              "whole": 64 * 2**30}
    results: Dict[str, dict] = {}
    for name, budget in setups.items():
        plan = plan_merge(config, memory_per_worker=budget, num_workers=1)
        pieces = sum(len(u.pieces) for u in plan.units)
        best: Dict[str, float] = {}
        for _ in range(repeats):
            for cls, (seconds, elements) in run_protocol(plan).items():
                per = seconds / elements
                best[cls] = min(best.get(cls, per), per)
        piece_elements = plan.units[0].pieces[0].meta.numel
        results[name] = {"pieces": pieces, "piece_elements": piece_elements, "ns_per_element":
                         {cls: v * 1e9 for cls, v in best.items()}}
    return results


def _best(fn, repeats: int = 5) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def measure_byte_costs(size: int = DEFAULT_PART_SIZE) -> Dict[str, float]:
    """Nanoseconds per byte of the S3 client's and the writer's byte work, on one part."""
    src = bytearray(np.random.default_rng(0).integers(0, 256, size, dtype=np.uint8).tobytes())
    dst = bytearray(size)
    view = memoryview(src)
    out = {
        "memcpy": _best(lambda: dst.__setitem__(slice(0, size), view)),
        "bytes_copy": _best(lambda: bytes(src)),
        "sha256": _best(lambda: hashlib.sha256(view).digest()),
        "crc32": _best(lambda: zlib.crc32(view)),
    }
    try:
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM

        aes = AESGCM(bytes(16))
        nonce = bytes(12)
        record = 16384  # TLS records
        out["aes_gcm_tls"] = _best(lambda: [aes.encrypt(nonce, view[i:i + record], None)
                                            for i in range(0, size, record)])
    except ImportError:  # assumed instead: about 1 GB/s
        out["aes_gcm_tls"] = size / 1e9
    return {k: v / size * 1e9 for k, v in out.items()}


# -- the model ---------------------------------------------------------------------------------


@dataclass
class Cluster:
    nodes: int
    cores_per_node: int
    slots_per_node: int
    nic: float  # bytes/s, each direction
    s3_read: float  # bytes/s per node
    ray_transfer: float  # bytes/s into the writer node
    upload: float  # bytes/s of the writer's multipart uploads
    latency: float  # s per S3 request
    ray_start: float
    task_overhead: float
    cpu_scale: float


@dataclass
class RoundTime:
    name: str
    compute: float
    s3_read: float
    writer_ingress: float
    writer_egress: float
    writer_cpu: float
    fill: float
    bound: str

    @property
    def expected(self) -> float:
        return max(self.compute, self.s3_read, self.writer_ingress, self.writer_egress, self.writer_cpu) + self.fill

    @property
    def no_overlap(self) -> float:
        return max(self.compute + self.s3_read, self.writer_ingress, self.writer_egress, self.writer_cpu) + self.fill


def model_round(rnd: Round, cluster: Cluster, costs: Dict[str, float], client_cpu_per_byte: float,
                writer_cpu_per_byte: float, read_once: bool) -> RoundTime:
    n = cluster.nodes
    slots = n * cluster.slots_per_node
    read_bytes = rnd.read_once_bytes if read_once else rnd.read_bytes
    read_share = read_bytes / max(1, rnd.read_bytes)
    cpu = sum(e * costs[c] for c, e in rnd.elements.items()) * cluster.cpu_scale
    cpu += read_bytes * client_cpu_per_byte + rnd.tasks * cluster.task_overhead
    unit_cpu = [sum(e * costs[c] for c, e in elems.items()) * cluster.cpu_scale for elems in rnd.unit_elements]
    compute = max(cpu / slots, max(unit_cpu, default=0.0))
    per_node_read = min(cluster.s3_read, cluster.nic)
    crossing = rnd.out_bytes * (n - 1) / n
    s3_read = read_bytes / (n * per_node_read)
    if crossing:
        s3_read = max(s3_read, (read_bytes + crossing) / ((n - 1) * per_node_read + cluster.nic))
    ingress = crossing / cluster.ray_transfer
    egress = rnd.out_bytes / cluster.upload
    writer_cpu = rnd.out_bytes * writer_cpu_per_byte
    # One mean unit, with every slot busy: its compute plus its reads at a slot's share of the node's rate.
    per_slot_read = per_node_read / cluster.slots_per_node
    durations = [c + b * read_share / per_slot_read for c, b in zip(unit_cpu, rnd.unit_read_bytes)]
    fill = sum(durations) / len(durations) if durations else 0.0
    terms = {"compute": compute, "S3 read": s3_read, "writer ingress": ingress, "writer egress": egress,
             "writer CPU": writer_cpu}
    bound = max(terms, key=terms.get)
    return RoundTime(rnd.name, compute, s3_read, ingress, egress, writer_cpu, fill, bound)


@dataclass
class Estimate:
    nodes: int
    rounds: List[RoundTime]
    fixed: Dict[str, float]

    @property
    def expected(self) -> float:
        return sum(r.expected for r in self.rounds) + sum(self.fixed.values())

    @property
    def no_overlap(self) -> float:
        return sum(r.no_overlap for r in self.rounds) + sum(self.fixed.values())

    def column(self, name: str) -> float:
        return sum(getattr(r, name) for r in self.rounds)

    @property
    def bound(self) -> str:
        return "; ".join(f"{r.name.split(':')[0]}: {r.bound}" for r in self.rounds)


S3_CLIENT_CONNECTIONS = 10  # aiobotocore's default connection pool of one s3fs filesystem


def planning_concurrency(w: Workload) -> int:
    """Header requests in flight while planning: every input at once, HEADER_READERS shard
    headers at a time each, through one S3 client's connection pool."""
    return max(1, min(S3_CLIENT_CONNECTIONS, len(w.read_bytes_by_input) * HEADER_READERS))


def fixed_costs(w: Workload, cluster: Cluster) -> Dict[str, float]:
    plan_requests = sum(w.plan_requests.values())
    # commit: complete + marker per shard; list and delete the part markers (1,000 a request);
    # config, generation config, tokenizer files, model card, index, manifest, lock: about 10.
    commit_requests = 2 * w.output_shards + 2 * math.ceil(w.output_parts / 1000) + 10
    return {
        "ray start": cluster.ray_start,
        "planning": w.plan_seconds * cluster.cpu_scale + plan_requests * cluster.latency / planning_concurrency(w),
        "writer start": (w.output_shards + 5) * cluster.latency,  # uploads created one by one; lock, manifest
        "commit": commit_requests * cluster.latency,
    }


def estimate(w: Workload, cluster: Cluster, costs: Dict[str, float], client_cpu_per_byte: float,
             writer_cpu_per_byte: float, read_once: bool) -> Estimate:
    rounds = [model_round(r, cluster, costs, client_cpu_per_byte, writer_cpu_per_byte, read_once) for r in w.rounds]
    return Estimate(cluster.nodes, rounds, fixed_costs(w, cluster))


# -- output ----------------------------------------------------------------------------------


def _t(seconds: float) -> str:
    if seconds >= 3600:
        return f"{seconds / 3600:.2f} h"
    if seconds >= 60:
        return f"{seconds / 60:.1f} min"
    return f"{seconds:.0f} s"


def table(estimates: Sequence[Estimate]) -> str:
    head = ("nodes", "compute", "S3 read", "writer ingress", "writer egress", "writer CPU", "fill+fixed",
            "expected wall", "no overlap", "bound by (per round)")
    rows = [head]
    for e in estimates:
        rows.append((str(e.nodes), _t(e.column("compute")), _t(e.column("s3_read")), _t(e.column("writer_ingress")),
                     _t(e.column("writer_egress")), _t(e.column("writer_cpu")),
                     _t(e.column("fill") + sum(e.fixed.values())), _t(e.expected), _t(e.no_overlap), e.bound))
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    lines = [" | ".join(c.ljust(wd) for c, wd in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "-+-".join("-" * wd for wd in widths))
    return "\n".join(lines)


def rounds_table(e: Estimate) -> str:
    lines = [f"  {'round':<28} {'compute':>9} {'S3 read':>9} {'ingress':>9} {'egress':>9} {'wr CPU':>9} "
             f"{'fill':>7} {'round':>9}  bound"]
    for r in e.rounds:
        lines.append(f"  {r.name:<28} {_t(r.compute):>9} {_t(r.s3_read):>9} {_t(r.writer_ingress):>9} "
                     f"{_t(r.writer_egress):>9} {_t(r.writer_cpu):>9} {_t(r.fill):>7} {_t(r.expected):>9}  {r.bound}")
    lines.append("  fixed: " + ", ".join(f"{k} {_t(v)}" for k, v in e.fixed.items()))
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nodes", default="1,4,16", help="node counts to model (default 1,4,16)")
    parser.add_argument("--cores-per-node", type=int, default=32)
    parser.add_argument("--node-memory-gib", type=float, default=256.0,
                        help="memory per node; 70%% of it for tasks of --memory-per-worker (default 256)")
    parser.add_argument("--nic-gbps", type=float, default=10.0, help="NIC of every node, Gbit/s each way (default 10)")
    parser.add_argument("--s3-gbps-per-node", type=float, default=None,
                        help="S3 GET throughput one node reaches, Gbit/s (default: the NIC)")
    parser.add_argument("--ray-gbps", type=float, default=None,
                        help="Ray object transfer rate into the writer node, Gbit/s (default: the NIC)")
    parser.add_argument("--put-mbps-per-connection", type=float, default=90.0,
                        help="S3 PUT rate of one upload connection, MB/s (default 90)")
    parser.add_argument("--upload-gbps", type=float, default=None,
                        help="the writer's multipart upload rate, Gbit/s (default: min(NIC, upload threads x "
                             "per-connection rate, one marker PUT per part))")
    parser.add_argument("--what-if-upload-threads", type=int, default=32,
                        help=f"upload threads of the third table's writer (default 32; distmerge has {UPLOAD_THREADS})")
    parser.add_argument("--s3-latency-ms", type=float, default=50.0, help="one small S3 request (default 50)")
    parser.add_argument("--ray-start-s", type=float, default=10.0)
    parser.add_argument("--task-overhead-ms", type=float, default=10.0)
    parser.add_argument("--cpu-scale", type=float, default=1.0,
                        help="a cluster core's time for this machine's core-second (default 1.0)")
    parser.add_argument("--memory-per-worker", default="4GiB")
    parser.add_argument("--part-size", default=str(DEFAULT_PART_SIZE), help="S3 part size (default: distmerge's)")
    parser.add_argument("--repeats", type=int, default=2, help="timing runs of each measurement (best is kept)")
    parser.add_argument("--json", default=os.path.join(WORK, "model_cluster.json"), help="write all figures here")
    args = parser.parse_args(argv)
    started = time.perf_counter()

    part_size = parse_size(args.part_size)
    workload, (apparent, allocated) = plan_405b(args.memory_per_worker, part_size)
    t_plan = time.perf_counter()
    worker = measure_worker_costs(args.repeats)
    byte_ns = measure_byte_costs(part_size)
    t_measure = time.perf_counter()

    big = worker["split_16m"]["ns_per_element"]
    costs = {k: v * 1e-9 for k, v in big.items() if k != "apply:whole"}
    costs["apply:whole"] = worker["whole"]["ns_per_element"]["apply:whole"] * 1e-9
    client_ns = byte_ns["aes_gcm_tls"] + 2 * byte_ns["memcpy"]
    writer_paths = {"GIL copies (part buffer, bytes(body))": byte_ns["memcpy"] + byte_ns["bytes_copy"],
                    "event loop (TLS + CRC32)": byte_ns["aes_gcm_tls"] + byte_ns["crc32"],
                    f"SHA-256 / {UPLOAD_THREADS} upload threads": byte_ns["sha256"] / UPLOAD_THREADS}
    writer_ns = max(writer_paths.values())

    nic = args.nic_gbps * GB / 8
    per_thread = args.put_mbps_per_connection * 1e6
    per_thread = part_size / (part_size / per_thread + args.s3_latency_ms / 1000)  # + the part's marker PUT
    upload = args.upload_gbps * GB / 8 if args.upload_gbps else min(nic, UPLOAD_THREADS * per_thread)
    slots = min(args.cores_per_node, int(args.node_memory_gib * 2**30 * 0.7 // workload.memory_per_worker))
    nodes = [int(x) for x in args.nodes.split(",")]
    clusters = [Cluster(n, args.cores_per_node, slots, nic,
                        (args.s3_gbps_per_node or args.nic_gbps) * GB / 8, (args.ray_gbps or args.nic_gbps) * GB / 8,
                        upload, args.s3_latency_ms / 1000, args.ray_start_s, args.task_overhead_ms / 1000,
                        args.cpu_scale) for n in nodes]
    as_planned = [estimate(workload, c, costs, client_ns * 1e-9, writer_ns * 1e-9, False) for c in clusters]
    read_once = [estimate(workload, c, costs, client_ns * 1e-9, writer_ns * 1e-9, True) for c in clusters]
    fast_upload = min(nic, args.what_if_upload_threads * per_thread)
    fast_writer = [estimate(workload, replace(c, upload=fast_upload), costs, client_ns * 1e-9, writer_ns * 1e-9, True)
                   for c in clusters]

    w = workload
    print(f"workload: TIES of 4 Llama-3.1-405B-shaped bf16 checkpoints ({SHARDS_405B} shards each, header-only: "
          f"{format_bytes(apparent)} apparent, {format_bytes(allocated)} on disk), --memory-per-worker "
          f"{format_bytes(w.memory_per_worker)}")
    print(f"  plan: {w.units} units, {w.pieces} pieces, {w.tensors} tensors ({w.split_tensors} split into row "
          f"ranges, {w.distributed_groups} reduction groups across units); largest unit ~"
          f"{format_bytes(w.largest_unit_memory)}; phases: "
          + "; ".join(f"{v} tensors {k}" for k, v in w.phases.items()))
    print(f"  input {format_bytes(w.input_bytes)} ({w.input_bytes / GB:.1f} GB), read {format_bytes(w.read_bytes)} "
          f"({w.read_bytes / GB:.1f} GB): read amplification {w.amplification:.3f}; output "
          f"{format_bytes(w.output_bytes)} ({w.output_bytes / GB:.1f} GB) in {w.output_shards} shards, "
          f"{w.output_parts} parts of {format_bytes(part_size)}")
    for r in w.rounds:
        print(f"  round {r.name}: {r.tasks} tasks, {sum(r.elements.values()) / 1e9:.1f} G elements, "
              f"reads {r.read_bytes / GB:.1f} GB, output {r.out_bytes / GB:.1f} GB")
    print(f"  planning (local headers): {w.plan_seconds:.2f} s CPU, {sum(w.plan_requests.values())} storage "
          f"requests ({', '.join(f'{k} {v}' for k, v in sorted(w.plan_requests.items()))}), "
          f"{planning_concurrency(w)} at a time")
    print(f"measured (1 thread, best of {args.repeats}; ns per element of one output element, all 4 inputs):")
    for name, m in worker.items():
        print(f"  {name:<10} ({m['pieces']} piece(s) of {m['piece_elements'] / 1e6:.1f}M elements): "
              + ", ".join(f"{k} {v:.2f}" for k, v in m["ns_per_element"].items()))
    print(f"  bytes (ns/byte, {format_bytes(part_size)}): " + ", ".join(f"{k} {v:.3f}" for k, v in byte_ns.items()))
    print(f"  S3 client CPU (TLS + 2 copies) {client_ns:.3f} ns/B; writer's busiest path "
          f"{max(writer_paths, key=writer_paths.get)}: {writer_ns:.3f} ns/B "
          f"({1 / writer_ns:.2f} GB/s)")
    print(f"assumed: {args.cores_per_node} cores a node ({slots} task slots), NIC {args.nic_gbps:g} Gb/s "
          f"({nic / GB:.2f} GB/s), S3 GET {clusters[0].s3_read / GB:.2f} GB/s a node, Ray transfer "
          f"{clusters[0].ray_transfer / GB:.2f} GB/s, writer upload {upload / GB:.3f} GB/s "
          f"({UPLOAD_THREADS} threads x {args.put_mbps_per_connection:g} MB/s), S3 latency {args.s3_latency_ms:g} ms, "
          f"Ray start {args.ray_start_s:g} s, task overhead {args.task_overhead_ms:g} ms, cpu scale {args.cpu_scale:g}")
    print()
    print(f"expected wall time, reads as planned (read amplification {w.amplification:.3f}):")
    print(table(as_planned))
    shown = [("as planned", as_planned)]
    if w.amplification > 1.001:  # a plan that reads some input bytes more than once
        print()
        print(f"what-if: read-once inputs (amplification 1.0, {w.input_bytes / GB:.0f} GB from S3), all else equal:")
        print(table(read_once))
        shown.append(("read-once", read_once))
    print()
    print(f"what-if: read-once and the writer uploading with {args.what_if_upload_threads} threads "
          f"({fast_upload / GB:.2f} GB/s), all else equal:")
    print(table(fast_writer))
    shown.append((f"read-once, {args.what_if_upload_threads} upload threads", fast_writer))
    for label, estimates in shown:
        for e in estimates:
            print(f"\n{label}, {e.nodes} node(s):")
            print(rounds_table(e))
    print(f"\n(plan {t_plan - started:.1f} s, measurements {t_measure - t_plan:.1f} s)")

    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)

        def dump(e: Estimate) -> dict:
            return {"nodes": e.nodes, "expected_s": e.expected, "no_overlap_s": e.no_overlap, "fixed_s": e.fixed,
                    "rounds": [dict(asdict(r), expected_s=r.expected, no_overlap_s=r.no_overlap) for r in e.rounds]}

        doc = {"arguments": vars(args), "workload": dict(asdict(w), read_bytes=w.read_bytes,
                                                         amplification=w.amplification),
               "measured": {"worker": worker, "bytes_ns": byte_ns, "client_ns_per_byte": client_ns,
                            "writer_paths_ns_per_byte": writer_paths, "costs_s_per_element": costs},
               "assumed": {"slots_per_node": slots, "nic_Bps": nic, "upload_Bps": upload,
                           "what_if_upload_Bps": fast_upload},
               "as_planned": [dump(e) for e in as_planned], "read_once": [dump(e) for e in read_once],
               "read_once_fast_upload": [dump(e) for e in fast_writer]}
        for rnd in doc["workload"]["rounds"]:
            for key in ("unit_elements", "unit_read_bytes"):
                rnd[key] = len(rnd[key])  # counts only: the lists are per unit
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(doc, f, indent=2)
        print(f"figures written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
