"""distmerge vs mergekit on one machine: the same TIES merge, wall time and whole-tree memory.

Makes a synthetic Llama-shaped base model and three fine-tunes (bf16; about 1.7 GB each at
`--scale full`, 50 MB at `--scale small`), writes one TIES config (weights 0.5/0.3/0.2,
density 0.5, normalize, int8_mask, dtype bfloat16) and runs

    mergekit-yaml CONFIG OUT --no-copy-tokenizer --quiet
    distmerge merge CONFIG OUT --no-progress --num-workers 2 --overwrite

each as a subprocess whose whole process tree (Ray included) is sampled for memory. mergekit
runs with its own defaults otherwise (no -j: torch's default thread count; 5B-parameter
output shards; synchronous writes). Before each run the page cache is synced (so the other
tool's dirty output is not flushed on this one's time), dropped if the machine allows it, and
then warmed with one read of every input file: both tools read from a warm cache.

Then checks that the outputs agree (identical except at top-k threshold ties, as the parity
tests define it), and compares distmerge's wall time with the I/O floor: reading every input
byte once from the warm cache plus writing the output bytes once and fsyncing them
(distmerge fsyncs its shards; mergekit does not). distmerge's phases (its summary's
timeline) are set against their own floors: start-up against a bare local Ray started as
distmerge starts it and its first task importing torch; merging against one histogram
pass over every task vector (its fused kernel where built; single-threaded CPU time,
shared by the workers) plus the I/O floor.

Generated models are kept under --work and reused by later runs with the same scale.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import shutil
import sys
import time
from dataclasses import asdict
from typing import Dict, List, Optional

import psutil
import torch
import yaml

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import (  # noqa: E402 - bench/ is not a package; the scripts run from anywhere
    Comparison, Result, compare_outputs, console_script, drop_page_cache, format_bytes, input_files,
    make_or_reuse_models, read_files, run_measured, write_bytes,
)
from distmerge.methods import fused  # noqa: E402
from distmerge.synthetic import LlamaShape, ties_config  # noqa: E402

SHAPES = {
    # ~25M parameters, ~50 MB per model in bf16: a smoke test that runs in seconds.
    "small": LlamaShape(hidden=512, intermediate=1408, layers=6, heads=8, kv_heads=2, vocab=8000),
    # ~836M parameters, ~1.67 GB (1.56 GiB) per model in bf16 (TinyLlama's widths, 16 layers).
    "full": LlamaShape(hidden=2048, intermediate=5632, layers=16, heads=32, kv_heads=4, vocab=32000),
}
WEIGHTS = (0.5, 0.3, 0.2)
DENSITIES = (0.5, 0.5, 0.5)
DTYPE = "bfloat16"


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    here = os.path.dirname(os.path.abspath(__file__))
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", default=os.path.join(here, "work"), metavar="DIR",
                   help="models, config and outputs go here (default: bench/work, git-ignored)")
    p.add_argument("--scale", choices=sorted(SHAPES), default="full",
                   help="full: ~1.7 GB per model; small: ~50 MB per model, for smoke tests (default: full)")
    p.add_argument("--skip-mergekit", action="store_true",
                   help="run distmerge only (no mergekit run, no output comparison)")
    p.add_argument("--num-workers", type=int, default=2, metavar="N", help="distmerge --num-workers (default: 2)")
    p.add_argument("--memory-per-worker", metavar="SIZE", help="distmerge --memory-per-worker (default: its own)")
    p.add_argument("--mergekit-threads", type=int, metavar="N",
                   help="pass -j N to mergekit-yaml (default: not passed, mergekit's default)")
    p.add_argument("--json", metavar="PATH", help="also save the results as JSON")
    return p.parse_args(argv)


def _safetensors_bytes(directory: str) -> int:
    return sum(os.path.getsize(os.path.join(directory, n)) for n in os.listdir(directory)
               if n.endswith(".safetensors"))


def _prepare_cache(files: List[str]) -> Dict[str, object]:
    dropped = drop_page_cache()
    read, seconds = read_files(files)
    return {"dropped": dropped, "warmup_bytes": read, "warmup_s": seconds}


def _run_tool(name: str, cmd: List[str], out_dir: str, files: List[str]) -> Result:
    shutil.rmtree(out_dir, ignore_errors=True)
    cache = _prepare_cache(files)
    print(f"[{name}] page cache {'dropped, then ' if cache['dropped'] else ''}warmed "
          f"({format_bytes(cache['warmup_bytes'])} in {cache['warmup_s']:.1f} s)", flush=True)
    print(f"[{name}] $ {' '.join(cmd)}", flush=True)
    result = run_measured(cmd)
    status = "ok" if result.returncode == 0 else f"FAILED (exit {result.returncode})"
    print(f"[{name}] {status} in {result.wall_s:.1f} s, {result.samples} memory samples, "
          f"{result.processes_seen} processes", flush=True)
    if result.returncode != 0:
        print(f"[{name}] output tail:\n{result.stdout_tail}", flush=True)
    return result


def _ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}x" if b else "-"


def format_table(results: Dict[str, Result]) -> str:
    names = list(results)
    rows = [
        ("wall time", [f"{r.wall_s:.1f} s" for r in results.values()], "wall_s"),
        ("peak RSS, process tree sum", [format_bytes(r.peak_rss_sum) for r in results.values()], "peak_rss_sum"),
        ("peak PSS, process tree sum", [format_bytes(r.peak_pss_sum) for r in results.values()], "peak_pss_sum"),
    ]
    header = [""] + names + (["mergekit/distmerge"] if len(names) == 2 else [])
    lines = [header]
    for label, cells, attr in rows:
        line = [label] + cells
        if len(names) == 2:
            line.append(_ratio(getattr(results["mergekit"], attr), getattr(results["distmerge"], attr)))
        lines.append(line)
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in
                               enumerate(zip(line, widths))).rstrip() for line in lines)


def format_processes(name: str, result: Result, n: int = 6) -> str:
    lines = [f"largest processes of {name} (peak RSS / peak PSS; {result.processes_seen} processes seen):"]
    for proc, (rss, pss) in list(result.per_process_peaks.items())[:n]:
        lines.append(f"  {proc:<40} {format_bytes(rss):>11} / {format_bytes(pss):>11}")
    return "\n".join(lines)


RAY_FLOOR_SCRIPT = """
import json, os, sys, time
started = time.time()
import ray
ray.init(address="local", num_cpus=int(sys.argv[1]), include_dashboard=False, _node_ip_address="127.0.0.1",
         logging_level="WARNING")
ready = time.time()

def first_task():
    import torch  # noqa: F401 - what a merge worker imports first
    return time.time()

computing = ray.get(ray.remote(first_task).remote())
print(json.dumps({"ray_ready_s": ready - started, "first_task_s": computing - started}))
ray.shutdown()
"""


def ray_start_floor(num_workers: int) -> Dict[str, float]:
    """A bare local Ray as distmerge starts it, and one task that imports torch: when it
    is ready, and when the task runs (seconds since the process started)."""
    import subprocess

    env = dict(os.environ, RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0")
    proc = subprocess.run([sys.executable, "-c", RAY_FLOOR_SCRIPT, str(num_workers)], capture_output=True,
                          text=True, env=env, timeout=300)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def histogram_kernel() -> str:
    return "fused C kernel" if fused.built() else "torch keys + np.bincount"


def histogram_floor(paths: List[str]) -> float:
    """CPU seconds (one thread) of one histogram pass over every task vector: each
    model's |delta| keys binned once, the least work an exact top-k can do (by the
    fastest histogram distmerge has: its fused kernel where built)."""
    import numpy as np
    from safetensors import safe_open

    torch.set_num_threads(1)
    seconds = 0.0
    with contextlib.ExitStack() as stack:
        shards = [f for f in input_files(paths) if f.endswith(".safetensors")]
        assert len(shards) == len(paths), "one safetensors file per model expected"
        files = [stack.enter_context(safe_open(f, "pt")) for f in shards]
        for name in files[0].keys():
            base = files[0].get_tensor(name)
            for model in files[1:]:
                tensor = model.get_tensor(name)
                started = time.process_time()
                if fused.built():
                    fused.delta_histogram(base, tensor)
                else:
                    keys = (tensor - base).view(torch.int16) & 0x7FFF
                    np.bincount(keys.reshape(-1).numpy().view(np.uint16), minlength=1 << 16)
                seconds += time.process_time() - started
    return seconds


TIMELINE = re.compile(r"planned at ([\d.]+) s, Ray ready at ([\d.]+) s, first unit computing at ([\d.]+) s; "
                      r"statistics ([\d.]+) s, apply ([\d.]+) s, commit ([\d.]+) s \(workers' CPU ([\d.]+) s\)")


def parse_timeline(stdout: str) -> Optional[Dict[str, float]]:
    match = TIMELINE.search(stdout)
    if not match:
        return None
    keys = ("planned", "ray_ready", "first_unit", "statistics", "apply", "commit", "worker_cpu")
    return dict(zip(keys, map(float, match.groups())))


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    shape = SHAPES[args.scale]
    root = os.path.abspath(os.path.join(args.work, args.scale))
    os.makedirs(root, exist_ok=True)

    started = time.perf_counter()
    paths, reused = make_or_reuse_models(os.path.join(root, "models"), shape, fine_tunes=3, dtype=torch.bfloat16)
    files = input_files(paths)
    input_bytes = sum(os.path.getsize(f) for f in files)
    print(f"models: {len(paths)} x {format_bytes(input_bytes / len(paths))} under {os.path.dirname(paths[0])} "
          f"({'reused' if reused else f'written in {time.perf_counter() - started:.1f} s'})", flush=True)

    config_path = os.path.join(root, "ties.yml")
    config = ties_config(paths, weights=WEIGHTS, densities=DENSITIES, dtype=DTYPE)
    with open(config_path, "w", encoding="utf-8") as f:
        yaml.safe_dump(config, f, sort_keys=False)

    outs = {"mergekit": os.path.join(root, "out-mergekit"), "distmerge": os.path.join(root, "out-distmerge")}
    mergekit_cmd = console_script("mergekit-yaml", "mergekit.scripts.run_yaml") + [
        config_path, outs["mergekit"], "--no-copy-tokenizer", "--quiet"]
    if args.mergekit_threads:
        mergekit_cmd += ["-j", str(args.mergekit_threads)]
    distmerge_cmd = console_script("distmerge", "distmerge.cli") + [
        "merge", config_path, outs["distmerge"], "--no-progress", "--num-workers", str(args.num_workers),
        "--overwrite"]
    if args.memory_per_worker:
        distmerge_cmd += ["--memory-per-worker", args.memory_per_worker]

    results: Dict[str, Result] = {}
    if not args.skip_mergekit:
        results["mergekit"] = _run_tool("mergekit", mergekit_cmd, outs["mergekit"], files)
    results["distmerge"] = _run_tool("distmerge", distmerge_cmd, outs["distmerge"], files)
    failed = [name for name, r in results.items() if r.returncode != 0]

    comparison: Optional[Comparison] = None
    if not failed and "mergekit" in results:
        print("comparing outputs tensor by tensor ...", flush=True)
        comparison = compare_outputs(outs["distmerge"], outs["mergekit"], paths, DENSITIES, torch.bfloat16)

    floor = None
    if "distmerge" not in failed:
        output_bytes = _safetensors_bytes(outs["distmerge"])
        read_files(files)
        read_bytes, read_s = read_files(files)
        write_s, fsync_s = write_bytes(os.path.join(root, "floor.tmp"), output_bytes)
        floor = {"read_bytes": read_bytes, "read_s": read_s, "write_bytes": output_bytes, "write_s": write_s,
                 "fsync_s": fsync_s, "total_s": read_s + write_s + fsync_s}

    phases = None
    timeline = parse_timeline(results["distmerge"].stdout_tail) if "distmerge" not in failed else None
    if timeline:
        print("measuring the floors of start-up and statistics ...", flush=True)
        phases = {"timeline": timeline, "ray_floor": ray_start_floor(args.num_workers),
                  "histogram_cpu_s": histogram_floor(paths), "workers": args.num_workers}

    vm = psutil.virtual_memory()
    print()
    print(f"=== TIES merge, {args.scale} scale: base + 3 fine-tunes, {format_bytes(input_bytes)} in, "
          f"bf16, weights {'/'.join(map(str, WEIGHTS))}, density {DENSITIES[0]} ===")
    print(f"machine: {os.cpu_count()} CPUs, {format_bytes(vm.total)} RAM; torch {torch.__version__} "
          f"(default intra-op threads {torch.get_num_threads()}); python {platform.python_version()}")
    print("inputs read from a warm page cache (each run preceded by sync, a drop attempt and one full read)")
    print(format_table(results))
    if floor:
        print(f"I/O floor: read {format_bytes(floor['read_bytes'])} (warm cache) {floor['read_s']:.2f} s + "
              f"write {format_bytes(floor['write_bytes'])} {floor['write_s']:.2f} s + fsync {floor['fsync_s']:.2f} s "
              f"= {floor['total_s']:.2f} s; distmerge wall time = "
              f"{_ratio(results['distmerge'].wall_s, floor['total_s'])} the floor")
    if phases:
        t, ray_floor = phases["timeline"], phases["ray_floor"]
        hist_wall = phases["histogram_cpu_s"] / phases["workers"]
        work_floor = hist_wall + (floor["total_s"] if floor else 0.0)
        print(f"phases of distmerge against their floors:\n"
              f"  first unit computing at {t['first_unit']:.1f} s (Ray ready at {t['ray_ready']:.1f} s); floor: a bare "
              f"Ray start {ray_floor['ray_ready_s']:.1f} s, its first torch task at {ray_floor['first_task_s']:.1f} s "
              f"= {_ratio(t['first_unit'], ray_floor['first_task_s'])}\n"
              f"  merging (statistics inside the tasks, then apply) {t['statistics'] + t['apply']:.1f} s, workers' CPU "
              f"{t['worker_cpu']:.1f} s; floor: one histogram pass ({histogram_kernel()}) "
              f"{phases['histogram_cpu_s']:.1f} s CPU "
              f"({hist_wall:.1f} s on {phases['workers']} workers) + the I/O floor = {work_floor:.1f} s "
              f"= {_ratio(t['statistics'] + t['apply'], work_floor)}\n"
              f"  commit (checksums, fsync, renames, index) {t['commit']:.1f} s")
    for name, result in results.items():
        print(format_processes(name, result))
    if "distmerge" not in failed:
        summary = [line for line in results["distmerge"].stdout_tail.splitlines() if line.strip()][-4:]
        print("distmerge's own summary (per-process peaks from VmHWM):\n"
              + "\n".join(f"  {line}" for line in summary))
    if comparison:
        print("output comparison (distmerge vs mergekit): " + comparison.format())
    for name in failed:
        print(f"{name} FAILED (exit {results[name].returncode}): {' '.join(results[name].cmd)}")

    if args.json:
        report = {
            "scale": args.scale, "shape": asdict(shape), "input_bytes": input_bytes, "models_reused": reused,
            "config": config, "machine": {"cpus": os.cpu_count(), "ram_bytes": vm.total,
                                          "torch": torch.__version__, "torch_threads": torch.get_num_threads()},
            "results": {name: r.to_json() for name, r in results.items()},
            "floor": floor,
            "phases": phases,
            "comparison": dict(asdict(comparison), ok=comparison.ok) if comparison else None,
        }
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(report, f, indent=2)
        print(f"results saved to {args.json}")

    if failed or (comparison and not comparison.ok):
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
