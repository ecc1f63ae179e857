"""Elements per second of distmerge's exact top-k selection against sorting.

One tensor of N elements (default 32M) per dtype, bf16 and float32, holding realistic
task-vector deltas with heavy ties: a base of bf16 weights (0.02 * gaussian) and a
fine-tune that adds a small gaussian change and is rounded to bf16 again; the delta is
`ft - base` computed in the dtype (bf16, or float32 of the bf16 weights, as a merge with
`dtype: float32` over bf16 checkpoints does). Each method keeps the k = int(0.5 * N)
largest magnitudes and produces a boolean mask:

- ours: `distmerge.methods.topk` as a worker runs it: magnitude_keys, then for each
  radix pass (1 for 16-bit, 2 for 32-bit) digit_histogram + reduce_pass, then kept_mask.
- ours, 8 pieces: the same over 8 contiguous pieces of the flat tensor, as for a tensor
  split into row ranges: a histogram per piece each pass, reduced across pieces, then one
  mask per piece. It should cost no more than one piece (it tends to cost less: each
  piece's temporaries are an eighth of the size).
- argsort: what mergekit does, `torch.argsort(|x|.float(), descending=True)[:k]`,
  scattered into a mask.
- mergekit magnitude(): `mergekit.sparsify.magnitude(x, density)` itself (argsort, a
  mask in x's dtype, and the masked tensor), if mergekit is installed.
- torch.topk: `torch.topk(|x|.float(), k)` scattered into a mask, for reference.

Every method runs with 1 and 2 torch intra-op threads (`torch.set_num_threads`); the
histograms use numpy's bincount, which is single-threaded. Times are the best of
--repeat runs. The table gives seconds, elements per second (N / seconds) and the speedup
of ours over argsort (argsort seconds / ours seconds; > 1 means ours is faster).

Checks, printed above the table: our mask keeps exactly k entries; the 8-piece masks put
together equal the one-piece mask bit for bit; and our mask differs from the argsort (and
topk) mask only at entries whose magnitude equals the k-th largest (ties, which sorting
breaks arbitrarily and we break lowest flat index first). The exit status is 1 if a check
fails.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from distmerge.methods import topk

DENSITY = 0.5
PIECES = 8
THREADS = (1, 2)
DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}

try:
    from mergekit.sparsify import magnitude as mergekit_magnitude
except ImportError:
    mergekit_magnitude = None


def make_delta(numel: int, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    """`ft - base` of bf16 weights, in `dtype`: small, gaussian, and with many exact ties."""
    g = torch.Generator().manual_seed(seed)
    base = (0.02 * torch.randn(numel, generator=g)).to(torch.bfloat16)
    ft = (base.float() + 0.002 * torch.randn(numel, generator=g)).to(torch.bfloat16)
    return ft.to(dtype) - base.to(dtype)


def ours(x: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean mask of the k largest |x| (ties: lowest flat index first), by radix select."""
    keys = topk.magnitude_keys(x.reshape(-1))
    bits = topk.key_bits(x.dtype)
    state = topk.Selection(bits, 0, k)
    for pass_index in range(topk.passes_for(bits)):
        histogram = topk.digit_histogram(keys, bits, pass_index, state.prefix)
        state = topk.reduce_pass(pass_index, [state], [histogram])[0]
    return topk.kept_mask(keys, state)


def ours_pieces(x: torch.Tensor, k: int, pieces: int = PIECES) -> List[torch.Tensor]:
    """The same selection over `pieces` contiguous pieces, reduced across them; one mask per piece."""
    keys = [topk.magnitude_keys(p) for p in x.reshape(-1).chunk(pieces)]
    bits = topk.key_bits(x.dtype)
    states = [topk.Selection(bits, 0, k)] * len(keys)
    for pass_index in range(topk.passes_for(bits)):
        histograms = [topk.digit_histogram(key, bits, pass_index, state.prefix) for key, state in zip(keys, states)]
        states = topk.reduce_pass(pass_index, states, histograms)
    return [topk.kept_mask(key, state) for key, state in zip(keys, states)]


def argsort_mask(x: torch.Tensor, k: int) -> torch.Tensor:
    """mergekit's selection: argsort of |x| in float32, the first k indices scattered into a mask."""
    order = torch.argsort(x.abs().reshape(-1).float(), descending=True)[:k]
    mask = torch.zeros(x.numel(), dtype=torch.bool)
    mask[order] = True
    return mask


def topk_mask(x: torch.Tensor, k: int) -> torch.Tensor:
    """torch.topk of |x| in float32, its indices scattered into a mask."""
    indices = torch.topk(x.abs().reshape(-1).float(), k, sorted=False).indices
    mask = torch.zeros(x.numel(), dtype=torch.bool)
    mask[indices] = True
    return mask


@dataclass
class Timing:
    dtype: str
    threads: int
    method: str
    seconds: float
    elements_per_s: float


@dataclass
class Check:
    dtype: str
    name: str
    ok: bool
    detail: str


def best_time(fn: Callable[[], object], repeat: int) -> float:
    """The shortest of `repeat` runs, in seconds (each run's result is dropped before the next)."""
    best = float("inf")
    for _ in range(repeat):
        started = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - started)
        del result
    return best


def check_masks(name: str, x: torch.Tensor, k: int) -> List[Check]:
    """Our mask against its own 8-piece version, the argsort mask and the topk mask."""
    keys = topk.magnitude_keys(x.reshape(-1))
    mask = ours(x, k)
    threshold = keys[mask].min()
    at_threshold = keys == threshold
    ties = int(at_threshold.sum())
    kept_ties = int((mask & at_threshold).sum())
    checks = [Check(name, "ours keeps exactly k", int(mask.sum()) == k,
                    f"{int(mask.sum()):,} kept, k = {k:,}; {ties:,} entries tie at the threshold, {kept_ties:,} kept")]
    tie_kept = mask[at_threshold]  # in flat index order
    kept_ties_ok = bool(tie_kept[:kept_ties].all()) and not bool(tie_kept[kept_ties:].any())
    checks.append(Check(name, "ours keeps the lowest-index ties", kept_ties_ok,
                        f"the first {kept_ties:,} of the {ties:,} ties are kept"))
    split = torch.cat(ours_pieces(x, k))
    differ = int((split != mask).sum())
    checks.append(Check(name, f"{PIECES} pieces == 1 piece", differ == 0, f"{differ:,} entries differ"))
    for other_name, other in (("argsort", argsort_mask), ("torch.topk", topk_mask)):
        other_mask = other(x, k)
        differ = mask != other_mask
        outside = int((differ & ~at_threshold).sum())
        checks.append(Check(name, f"ours vs {other_name}: differ only at ties", outside == 0 and
                            int(other_mask.sum()) == k,
                            f"{int(differ.sum()):,} entries differ, {outside:,} of them away from the threshold"))
        del other_mask, differ
    return checks


def run(numel: int, repeat: int, dtypes: Sequence[str], threads: Sequence[int],
        with_mergekit: bool = True) -> Tuple[List[Check], List[Timing]]:
    """Checks and timings for every dtype and thread count: (checks, timings)."""
    checks: List[Check] = []
    timings: List[Timing] = []
    k = int(DENSITY * numel)
    for dtype_name in dtypes:
        x = make_delta(numel, DTYPES[dtype_name])
        torch.set_num_threads(max(threads))
        checks += check_masks(dtype_name, x, k)
        methods: Dict[str, Callable[[], object]] = {
            "ours": lambda: ours(x, k),
            f"ours, {PIECES} pieces": lambda: ours_pieces(x, k),
            "argsort (mergekit's way)": lambda: argsort_mask(x, k),
        }
        if with_mergekit and mergekit_magnitude is not None:
            methods["mergekit magnitude()"] = lambda: mergekit_magnitude(x, DENSITY)
        methods["torch.topk"] = lambda: topk_mask(x, k)
        for n_threads in threads:
            torch.set_num_threads(n_threads)
            for method, fn in methods.items():
                seconds = best_time(fn, repeat)
                timings.append(Timing(dtype_name, n_threads, method, seconds, numel / seconds))
                print(f"  {dtype_name:<9} {n_threads} thread(s)  {method:<26} {seconds:8.3f} s", flush=True)
        methods.clear()  # the closures hold this dtype's input: free it before the next one
    return checks, timings


def format_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Left-aligned text columns, right-aligned numbers."""
    lines = [list(header)] + [list(r) for r in rows]
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    out = []
    for n, line in enumerate(lines):
        out.append("  ".join(cell.ljust(w) if i < 3 else cell.rjust(w)
                             for i, (cell, w) in enumerate(zip(line, widths))).rstrip())
        if n == 0:
            out.append("  ".join("-" * w for w in widths))
    return "\n".join(out)


def timing_table(timings: Sequence[Timing]) -> str:
    ours_s = {(t.dtype, t.threads): t.seconds for t in timings if t.method == "ours"}
    argsort_s = {(t.dtype, t.threads): t.seconds for t in timings if t.method.startswith("argsort")}
    rows = []
    for t in timings:
        key = (t.dtype, t.threads)
        rows.append([t.dtype, str(t.threads), t.method, f"{t.seconds:.3f}", f"{t.elements_per_s / 1e6:,.1f}",
                     f"{argsort_s[key] / t.seconds:.2f}x", f"{t.seconds / ours_s[key]:.2f}x"])
    return format_table(["dtype", "threads", "method", "seconds", "M elements/s", "vs argsort", "time / ours"], rows)


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--elements", type=int, default=32 * 2**20, metavar="N",
                   help="elements per tensor (default: 33554432, 32M)")
    p.add_argument("--repeat", type=int, default=3, metavar="R", help="runs per method; the best counts (default: 3)")
    p.add_argument("--dtypes", default="bfloat16,float32", metavar="LIST",
                   help="comma-separated, of bfloat16 and float32 (default: both)")
    p.add_argument("--skip-mergekit", action="store_true", help="do not time mergekit.sparsify.magnitude")
    p.add_argument("--json", metavar="PATH", help="also save the results as JSON")
    args = p.parse_args(argv)
    args.dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    unknown = [d for d in args.dtypes if d not in DTYPES]
    if unknown or not args.dtypes:
        p.error(f"--dtypes: choose from {', '.join(DTYPES)}")
    if args.elements < 2 * PIECES or args.repeat < 1:
        p.error(f"--elements must be at least {2 * PIECES} and --repeat at least 1")
    return args


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    print(f"timing top-k selection of {args.elements:,} elements, density {DENSITY}, best of {args.repeat}:",
          flush=True)
    checks, timings = run(args.elements, args.repeat, args.dtypes, THREADS, not args.skip_mergekit)

    print()
    print(f"=== exact top-k: {args.elements:,} elements, k = {int(DENSITY * args.elements):,} (density {DENSITY}), "
          f"best of {args.repeat} ===")
    print(f"machine: {os.cpu_count()} CPUs; torch {torch.__version__}; python {platform.python_version()}"
          + ("" if mergekit_magnitude is not None else "; mergekit not installed"))
    print("checks:")
    for c in checks:
        print(f"  {'ok  ' if c.ok else 'FAIL'} {c.dtype:<9} {c.name}: {c.detail}")
    print()
    print(timing_table(timings))
    print()
    print("speedup of ours over argsort (argsort seconds / ours seconds):")
    for t in timings:
        if t.method == "ours":
            argsort_s = next(a.seconds for a in timings if a.method.startswith("argsort")
                             and (a.dtype, a.threads) == (t.dtype, t.threads))
            print(f"  {t.dtype:<9} {t.threads} thread(s): {argsort_s / t.seconds:.1f}x")
    ok = all(c.ok for c in checks)
    print(f"checks: {'all passed' if ok else 'FAILED'}")

    if args.json:
        report = {"elements": args.elements, "density": DENSITY, "repeat": args.repeat,
                  "machine": {"cpus": os.cpu_count(), "torch": torch.__version__},
                  "checks": [asdict(c) for c in checks], "timings": [asdict(t) for t in timings]}
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(report, f, indent=2)
        print(f"results saved to {args.json}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
