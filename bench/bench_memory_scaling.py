"""Peak memory of `distmerge merge` must stay flat while the model grows.

The same Llama-shaped architecture (hidden 1024, intermediate 2816) is merged at several
sizes: the number of layers and the vocabulary grow with the size multiplier, so the
number of work units grows and the biggest tensors (embed_tokens, lm_head) are cut into
more row ranges, while the per-worker memory budget (`--memory-per-worker`, default
256MiB) and the worker count (2) stay fixed. At 1x a model is ~168 MB in bf16 (3 layers,
vocab 24576), at 2x ~336 MB, at 4x ~672 MB. Each size merges base + 2 fine-tunes with
TIES (weights 0.6/0.4, densities 0.5/0.5), as

    distmerge merge CONFIG OUT --no-progress --overwrite --memory-per-worker X --num-workers 2

in a subprocess whose whole process tree (driver, local Ray, its workers and the writer
actor) is sampled with psutil every --interval seconds (bench/common.py explains RSS vs
PSS). Inputs are read once before each run, so they come from a warm page cache.

How to read the output:
- "plan": what `distmerge.plan` makes of each size: work units, row-range pieces, how
  many tensors are split, and the largest tensor's planned working memory against the
  budget (it is above the budget at every size, so that tensor is always split and its
  top-k threshold is reduced across pieces). Input bytes are per model.
- "memory": per-process peaks. "worker" is the largest peak over the Ray worker
  processes that ran `merge_unit` / `collect_unit` tasks, as sampled; "worker VmHWM" is
  the largest worker high-water mark that distmerge itself reports (exact, where the
  sampler can miss peaks shorter than its interval); "writer" is the ShardWriter
  actor, "driver" the `distmerge` CLI process, "ray other" the sum of the peaks of Ray's
  own processes (raylet, gcs_server, idle workers, ...). "tree" is the peak of the summed
  memory of the whole tree at one moment (not the sum of the per-process peaks).
- "per-process peaks": each merge worker's, the writer's and the driver's own peak RSS /
  PSS. Memory figures are in MiB.
- "scaling": largest size over smallest size for the worker peaks and the tree total,
  each size's value being the worst of its --repeat runs (default 2: a worker's peak
  moves by tens of MiB from run to run with scheduling, at every size). Flat memory means
  every ratio is within 1.20 (PASS); the exit status is 1 on FAIL or when a merge fails.

Worker RSS includes file-backed pages of the memory-mapped inputs it touched (PSS splits
the pages shared with other processes), and Python + torch + Ray themselves (a few
hundred MiB), so it sits above the budget, which covers the working tensors only.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional, Sequence, Set, Tuple

import psutil
import torch
import yaml

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import (  # noqa: E402 - bench/ is not a package; the scripts run from anywhere
    ProcessTreeSampler, _short_name, console_script, format_bytes, input_files, make_or_reuse_models, read_files,
    run_with_sampler,
)
import distmerge  # noqa: E402
from distmerge.planner import MergePlan  # noqa: E402
from distmerge.sizes import parse_size  # noqa: E402
from distmerge.synthetic import LlamaShape, ties_config  # noqa: E402

HIDDEN = 1024
INTERMEDIATE = 2816
HEADS = 16
KV_HEADS = 4
LAYERS_1X = 3
VOCAB_1X = 24576
VOCAB_ALIGN = 64
WEIGHTS = (0.6, 0.4)
DENSITIES = (0.5, 0.5)
DTYPE = "bfloat16"
NUM_WORKERS = 2
TOLERANCE = 1.20
WORKER_TASKS = ("ray::merge_unit", "ray::collect_unit")
WRITER = "ray::ShardWriter"
WORKER_SUMMARY = re.compile(r"largest worker ([0-9.]+ [A-Za-z]+)")


def shape_for(multiplier: float) -> LlamaShape:
    """The benchmark architecture at `multiplier` times the 1x size (layers and vocab scaled)."""
    layers = max(1, round(LAYERS_1X * multiplier))
    vocab = max(VOCAB_ALIGN, round(VOCAB_1X * multiplier / VOCAB_ALIGN) * VOCAB_ALIGN)
    return LlamaShape(hidden=HIDDEN, intermediate=INTERMEDIATE, layers=layers, heads=HEADS, kv_heads=KV_HEADS,
                      vocab=vocab)


def parameter_count(shape: LlamaShape) -> int:
    return sum(math.prod(s) for s in shape.tensor_shapes().values())


@dataclass
class PlanFacts:
    """What the planner makes of one size."""

    units: int
    pieces: int
    tensors: int
    split_tensors: int
    largest_tensor: str
    largest_tensor_pieces: int
    largest_tensor_input_bytes: int  # one model's bytes of that tensor
    largest_tensor_working: int  # planned working memory of the whole tensor, over all its pieces
    largest_unit_memory: int
    statistics_passes: int


def plan_facts(merge_plan: MergePlan) -> PlanFacts:
    """Units, pieces and split tensors of a MergePlan (read as planner.format_plan does)."""
    pieces_of: Dict[str, int] = {}
    working: Dict[str, int] = {}
    split: Set[str] = set()
    input_bytes: Dict[str, int] = {}
    for unit in merge_plan.units:
        for piece in unit.pieces:
            meta = piece.meta
            pieces_of[meta.tensor] = pieces_of.get(meta.tensor, 0) + 1
            working[meta.tensor] = working.get(meta.tensor, 0) + piece.memory
            input_bytes[meta.tensor] = input_bytes.get(meta.tensor, 0) + piece.sources[0].nbytes
            if meta.row_end - meta.row_start < (meta.shape[0] if meta.shape else 1):
                split.add(meta.tensor)
    largest = max(working, key=lambda name: working[name])
    return PlanFacts(
        units=len(merge_plan.units), pieces=sum(pieces_of.values()), tensors=merge_plan.tensor_count,
        split_tensors=len(split), largest_tensor=largest, largest_tensor_pieces=pieces_of[largest],
        largest_tensor_input_bytes=input_bytes[largest], largest_tensor_working=working[largest],
        largest_unit_memory=max(u.memory for u in merge_plan.units),
        statistics_passes=merge_plan.statistics_passes,
    )


class NamingSampler(ProcessTreeSampler):
    """A ProcessTreeSampler that also remembers every name each process had while sampled.

    Ray workers change their title with the task they run (`ray::IDLE`, `ray::merge_unit`,
    `ray::collect_unit`), so a process is a merge worker if it ever carried a task's name.
    """

    def __init__(self, pid: int, interval: float = 0.2) -> None:
        super().__init__(pid, interval)
        self.names: Dict[int, Set[str]] = {}

    def _tree(self) -> List[psutil.Process]:
        procs = super()._tree()
        for proc in procs:
            self.names.setdefault(proc.pid, set()).add(_short_name(proc))
        return procs


@dataclass
class ProcessPeak:
    pid: int
    role: str  # driver, worker, writer or ray
    name: str  # its name when its RSS peaked
    names: List[str]  # every name it had while sampled
    rss: int
    pss: int


@dataclass
class Run:
    """One merge at one size."""

    multiplier: float
    attempt: int  # 1-based, of --repeat
    shape: Dict[str, int]
    parameters: int
    model_bytes: int
    input_bytes: int
    models_reused: bool
    plan: PlanFacts
    cmd: List[str]
    wall_s: float
    returncode: int
    output_tail: str
    peak_rss_sum: int
    peak_pss_sum: int
    samples: int
    processes: List[ProcessPeak] = field(default_factory=list)

    @property
    def label(self) -> str:
        return f"{self.multiplier:g}x #{self.attempt}"

    def of(self, role: str) -> List[ProcessPeak]:
        return [p for p in self.processes if p.role == role]

    def peak(self, role: str, attr: str) -> int:
        """The largest peak among the processes of `role` (0 if none was seen)."""
        return max((getattr(p, attr) for p in self.of(role)), default=0)

    def summed(self, role: str, attr: str) -> int:
        return sum(getattr(p, attr) for p in self.of(role))

    @property
    def reported_worker_peak(self) -> int:
        """distmerge's own "largest worker" figure: the largest worker VmHWM (0 if not printed)."""
        match = WORKER_SUMMARY.search(self.output_tail)
        return parse_size(match.group(1)) if match else 0


def _role(pid: int, root: int, names: Set[str]) -> str:
    if pid == root:
        return "driver"
    if any(name.startswith(WRITER) for name in names):
        return "writer"
    if any(name.startswith(task) for name in names for task in WORKER_TASKS):
        return "worker"
    return "ray"


def run_sampled(cmd: Sequence[str], interval: float, tail_chars: int = 4000
                ) -> Tuple[float, int, str, int, int, int, List[ProcessPeak]]:
    """Run `cmd` under a NamingSampler.

    Returns (wall seconds, exit status, output tail, peak tree RSS, peak tree PSS, samples,
    per-process peaks with roles).
    """
    wall, returncode, tail, sampler, root = run_with_sampler(cmd, NamingSampler, interval=interval,
                                                             tail_chars=tail_chars)
    peaks = []
    for pid, peak in sampler.per_process.items():
        names = sampler.names.get(pid, {peak.name})
        peaks.append(ProcessPeak(pid, _role(pid, root, names), peak.name, sorted(names), peak.rss, peak.pss))
    peaks.sort(key=lambda p: p.rss, reverse=True)
    return wall, returncode, tail, sampler.peak_rss_sum, sampler.peak_pss_sum, sampler.samples, peaks


def run_size(multiplier: float, attempt: int, work: str, memory_per_worker: str, interval: float) -> Run:
    """Write (or reuse) the models of one size, plan the merge, run it and sample it."""
    shape = shape_for(multiplier)
    label = f"{multiplier:g}x #{attempt}"
    root = os.path.join(work, f"x{multiplier:g}")
    os.makedirs(root, exist_ok=True)
    started = time.perf_counter()
    paths, reused = make_or_reuse_models(os.path.join(root, "models"), shape, fine_tunes=len(WEIGHTS),
                                         dtype=torch.bfloat16)
    files = input_files(paths)
    input_bytes = sum(os.path.getsize(f) for f in files)
    model_bytes = sum(os.path.getsize(f) for f in input_files(paths[:1]))
    print(f"[{label}] models: {len(paths)} x {format_bytes(model_bytes)} "
          f"({'reused' if reused else f'written in {time.perf_counter() - started:.1f} s'})", flush=True)

    config_path = os.path.join(root, "ties.yml")
    with open(config_path, "w", encoding="utf-8") as f:
        yaml.safe_dump(ties_config(paths, weights=WEIGHTS, densities=DENSITIES, dtype=DTYPE), f, sort_keys=False)
    facts = plan_facts(distmerge.plan(config_path, memory_per_worker=memory_per_worker, num_workers=NUM_WORKERS))

    cmd = console_script("distmerge", "distmerge.cli") + [
        "merge", config_path, os.path.join(root, "out"), "--no-progress", "--overwrite",
        "--memory-per-worker", memory_per_worker, "--num-workers", str(NUM_WORKERS)]
    read_files(files)
    print(f"[{label}] $ {' '.join(cmd)}", flush=True)
    wall, returncode, tail, rss_sum, pss_sum, samples, peaks = run_sampled(cmd, interval)
    status = "ok" if returncode == 0 else f"FAILED (exit {returncode})"
    print(f"[{label}] {status} in {wall:.1f} s, {samples} memory samples, {len(peaks)} processes",
          flush=True)
    if returncode != 0:
        print(f"[{label}] output tail:\n{tail}", flush=True)
    return Run(multiplier=multiplier, attempt=attempt, shape=asdict(shape), parameters=parameter_count(shape),
               model_bytes=model_bytes, input_bytes=input_bytes, models_reused=reused, plan=facts, cmd=cmd,
               wall_s=wall, returncode=returncode, output_tail=tail, peak_rss_sum=rss_sum, peak_pss_sum=pss_sum,
               samples=samples, processes=peaks)


def format_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Left-aligned first column, right-aligned others."""
    lines = [list(header)] + [list(r) for r in rows]
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    out = []
    for n, line in enumerate(lines):
        out.append("  ".join(cell.ljust(w) if i == 0 else cell.rjust(w)
                             for i, (cell, w) in enumerate(zip(line, widths))).rstrip())
        if n == 0:
            out.append("  ".join("-" * w for w in widths))
    return "\n".join(out)


def _mib(n: float) -> str:
    return f"{n / 2**20:.0f}"


def plan_table(runs: Sequence[Run], budget: int) -> str:
    header = ["size", "params/model", "bytes/model", "layers", "vocab", "units", "pieces", "split tensors",
              "largest tensor: pieces", "input/model", "planned working", "x budget", "largest unit", "wall s"]
    rows = []
    for r in runs:
        p = r.plan
        rows.append([r.label, f"{r.parameters / 1e6:.1f} M", format_bytes(r.model_bytes),
                     str(r.shape["layers"]), str(r.shape["vocab"]), str(p.units), str(p.pieces),
                     f"{p.split_tensors}/{p.tensors}", str(p.largest_tensor_pieces),
                     format_bytes(p.largest_tensor_input_bytes), format_bytes(p.largest_tensor_working),
                     f"{p.largest_tensor_working / budget:.1f}", format_bytes(p.largest_unit_memory),
                     f"{r.wall_s:.1f}"])
    return format_table(header, rows)


def memory_table(runs: Sequence[Run]) -> str:
    header = ["size (MiB)", "worker RSS", "worker PSS", "worker VmHWM", "writer RSS", "writer PSS", "driver RSS",
              "driver PSS",
              "ray other RSS", "ray other PSS", "tree RSS", "tree PSS"]
    rows = []
    for r in runs:
        rows.append([r.label] + [_mib(v) for v in (
            r.peak("worker", "rss"), r.peak("worker", "pss"), r.reported_worker_peak, r.peak("writer", "rss"),
            r.peak("writer", "pss"),
            r.peak("driver", "rss"), r.peak("driver", "pss"), r.summed("ray", "rss"), r.summed("ray", "pss"),
            r.peak_rss_sum, r.peak_pss_sum)])
    return format_table(header, rows)


def workers_table(runs: Sequence[Run]) -> str:
    rows = []
    for r in runs:
        for p in r.of("worker") + r.of("writer") + r.of("driver"):
            if p.role == "worker":
                name = ", ".join(n for n in p.names if n.startswith(WORKER_TASKS))
            else:
                name = WRITER if p.role == "writer" else p.name
            rows.append([r.label, p.role, f"{name} [{p.pid}]", _mib(p.rss), _mib(p.pss)])
    return format_table(["size", "role", "process [pid]", "peak RSS MiB", "peak PSS MiB"], rows)


def scaling(runs: Sequence[Run]) -> List[Tuple[str, int, int, float, bool]]:
    """(measure, smallest size's value, largest size's value, ratio, within TOLERANCE).

    A size's value is the largest over its repeats: the worst peak seen.
    """
    small = [r for r in runs if r.multiplier == min(r.multiplier for r in runs)]
    large = [r for r in runs if r.multiplier == max(r.multiplier for r in runs)]
    measures = {
        "worker peak RSS": lambda r: r.peak("worker", "rss"),
        "worker peak PSS": lambda r: r.peak("worker", "pss"),
        "worker VmHWM (distmerge's own)": lambda r: r.reported_worker_peak,
        "tree total RSS": lambda r: r.peak_rss_sum,
        "tree total PSS": lambda r: r.peak_pss_sum,
    }
    out = []
    for name, get in measures.items():
        a, b = max(get(r) for r in small), max(get(r) for r in large)
        ratio = b / a if a else float("inf")
        out.append((name, a, b, ratio, ratio <= TOLERANCE))
    return out


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    here = os.path.dirname(os.path.abspath(__file__))
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="1,2,4", metavar="LIST",
                   help="comma-separated size multipliers of the 1x model (~168 MB in bf16) (default: 1,2,4)")
    p.add_argument("--memory-per-worker", default="256MiB", metavar="SIZE",
                   help="distmerge --memory-per-worker, the same at every size (default: 256MiB)")
    p.add_argument("--work", default=os.path.join(here, "work", "scaling"), metavar="DIR",
                   help="models, configs and outputs go here; models are reused (default: bench/work/scaling)")
    p.add_argument("--interval", type=float, default=0.2, metavar="S",
                   help="memory sampling interval in seconds (default: 0.2)")
    p.add_argument("--repeat", type=int, default=2, metavar="R",
                   help="merges per size; the scaling check compares the worst peak of each size (default: 2)")
    p.add_argument("--json", metavar="PATH", help="also save the results as JSON")
    args = p.parse_args(argv)
    try:
        args.sizes = sorted({float(s) for s in args.sizes.split(",") if s.strip()})
        args.budget = parse_size(args.memory_per_worker)
    except ValueError as err:
        p.error(str(err))
    if len(args.sizes) < 2 or min(args.sizes) <= 0:
        p.error("--sizes needs at least two positive multipliers")
    if args.repeat < 1:
        p.error("--repeat must be at least 1")
    return args


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    work = os.path.abspath(args.work)
    runs = [run_size(m, attempt, work, args.memory_per_worker, args.interval)
            for m in args.sizes for attempt in range(1, args.repeat + 1)]
    failed = [r for r in runs if r.returncode != 0]

    vm = psutil.virtual_memory()
    print()
    print(f"=== memory scaling: TIES, base + {len(WEIGHTS)} fine-tunes, bf16, weights "
          f"{'/'.join(map(str, WEIGHTS))}, density {DENSITIES[0]}; --memory-per-worker {args.memory_per_worker} "
          f"({format_bytes(args.budget)}), --num-workers {NUM_WORKERS} ===")
    print(f"machine: {os.cpu_count()} CPUs, {format_bytes(vm.total)} RAM; torch {torch.__version__}; "
          f"python {platform.python_version()}; sampling every {args.interval} s")
    print()
    print("plan (largest tensor: its pieces, one model's input bytes, planned working memory over all pieces):")
    print(plan_table(runs, args.budget))
    print()
    print("memory, peak per role (worker: largest worker process; ray other: sum over Ray's own processes; "
          "tree: peak of the whole tree's sum), MiB:")
    print(memory_table(runs))
    print()
    print("per-process peaks (merge workers, writer, driver):")
    print(workers_table(runs))
    print()
    checks = scaling(runs) if not failed else []
    if checks:
        small, large = min(args.sizes), max(args.sizes)
        growth = runs[-1].model_bytes / runs[0].model_bytes
        print(f"scaling, {large:g}x over {small:g}x (model {growth:.2f}x larger; each size's worst of "
              f"{args.repeat} run(s)), limit {TOLERANCE:.2f}:")
        print(format_table(["measure", f"{small:g}x MiB", f"{large:g}x MiB", "ratio", "verdict"],
                           [[name, _mib(a), _mib(b), f"{ratio:.3f}", "PASS" if ok else "FAIL"]
                            for name, a, b, ratio, ok in checks]))
    passed = bool(checks) and all(ok for *_, ok in checks)
    for r in failed:
        print(f"{r.multiplier:g}x merge FAILED (exit {r.returncode}): {' '.join(r.cmd)}")
    print(f"overall: {'PASS' if passed else 'FAIL'} (peak worker memory and tree total within "
          f"{round((TOLERANCE - 1) * 100)}% from {min(args.sizes):g}x to {max(args.sizes):g}x)")

    if args.json:
        report = {
            "memory_per_worker": args.budget, "num_workers": NUM_WORKERS, "repeat": args.repeat, "tolerance": TOLERANCE,
            "weights": WEIGHTS, "densities": DENSITIES, "dtype": DTYPE,
            "machine": {"cpus": os.cpu_count(), "ram_bytes": vm.total, "torch": torch.__version__},
            "runs": [asdict(r) for r in runs],
            "scaling": [{"measure": n, "smallest": a, "largest": b, "ratio": q, "ok": ok}
                        for n, a, b, q, ok in checks],
            "passed": passed,
        }
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(report, f, indent=2)
        print(f"results saved to {args.json}")
    return 0 if passed and not failed else 1


if __name__ == "__main__":
    sys.exit(main())
