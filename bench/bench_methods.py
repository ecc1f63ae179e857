"""Every merge method, distmerge against mergekit 0.1.5: time, memory and parity, side by side.

For each method, the same config (base + 3 fine-tunes, bf16; per-method parameters as in
`configs/`) runs through

    mergekit-yaml CONFIG OUT --no-copy-tokenizer --quiet   (sorts made stable, in a child process)
    distmerge merge CONFIG OUT --no-progress --num-workers 2 --overwrite

each under a sampler of its whole process tree, from a warm page cache. The outputs are
then compared tensor by tensor in the method's parity class:

- exact / near methods: the share of entries that are bit-identical (overall, and the
  lowest share of any tensor);
- random methods (dare_*, della*): no bit can match mergekit's global generator, so the
  fraction of entries changed from the base and the norm of (merged - base) are compared.

`--scale small` (default; ~50 MB per model) runs all 12 methods in a few minutes;
`--scale full` uses the ~1.7 GB models of bench_vs_mergekit.py (mergekit alone then needs
minutes per method). Models are generated once under --work and reused.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import sys
from typing import Dict, List, Optional

import torch
import yaml

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from bench_vs_mergekit import SHAPES  # noqa: E402 - bench/ is not a package; the scripts run from anywhere
from common import (  # noqa: E402
    _bits, _Checkpoint, console_script, format_bytes, input_files, make_or_reuse_models, read_files, run_measured,
)

RANDOM = {"dare_ties", "dare_linear", "della", "della_linear"}
WEIGHTS = (0.5, 0.3, 0.2)
PER_MODEL = {
    "linear": {}, "task_arithmetic": {}, "ties": {"density": 0.5}, "breadcrumbs": {"density": 0.9, "gamma": 0.01},
    "breadcrumbs_ties": {"density": 0.9, "gamma": 0.01}, "dare_ties": {"density": 0.5},
    "dare_linear": {"density": 0.5}, "della": {"density": 0.5, "epsilon": 0.15},
    "della_linear": {"density": 0.5, "epsilon": 0.15},
}
GLOBAL = {"sce": {"select_topk": 0.5}, "ram": {"epsilon": 1e-5}, "ramplus_tl": {"epsilon": 1e-5},
          "linear": {"normalize": True}, "slerp": {"t": [0.2, 0.8]}, "nearswap": {"t": 0.0001},
          "karcher": {"max_iter": 10}}
# interpolation methods: how many fine-tunes they take, and per-model parameters
INTERPOLATION = {"slerp": 1, "nuslerp": 2, "multislerp": 3, "karcher": 3, "model_stock": 3, "nearswap": 1,
                 "arcee_fusion": 1, "passthrough": 1}
WEIGHTED_INTERPOLATION = {"nuslerp", "multislerp"}
METHODS = ["linear", "task_arithmetic", "ties", "breadcrumbs", "breadcrumbs_ties", "dare_linear", "dare_ties",
           "della_linear", "della", "sce", "ram", "ramplus_tl", *INTERPOLATION]
FLOAT32_IN_MERGEKIT = {"ramplus_tl", "arcee_fusion"}  # mergekit 0.1.5 writes float32 tensors for these

STABLE_MERGEKIT = f"""
import sys
sys.path.insert(0, {os.path.join(os.path.dirname(HERE), "tests")!r})
from mergekit_oracle import stable_sorts
from mergekit.scripts.run_yaml import main
with stable_sorts():
    main(sys.argv[1:], standalone_mode=False)
"""


def config_for(method: str, paths: List[str]) -> dict:
    if method in INTERPOLATION:
        models = [{"model": p, "parameters": {"weight": w}} if method in WEIGHTED_INTERPOLATION else {"model": p}
                  for p, w in zip(paths[1:1 + INTERPOLATION[method]], WEIGHTS)]
        with_base = method not in ("passthrough", "karcher")
    else:
        models = []
        for path, weight in zip(paths[1:], WEIGHTS):
            params = dict(PER_MODEL.get(method, {}))
            if method in PER_MODEL:
                params["weight"] = weight
            models.append({"model": path, "parameters": params} if params else {"model": path})
        if method == "linear":
            models.insert(0, {"model": paths[0], "parameters": {"weight": 0.4}})
        with_base = method != "linear"
    cfg = {"merge_method": method, "models": models, "dtype": "bfloat16"}
    if with_base:
        cfg["base_model"] = paths[0]
    if method in GLOBAL:
        cfg["parameters"] = GLOBAL[method]
    if method in FLOAT32_IN_MERGEKIT:
        cfg["out_dtype"] = "float32"
    return cfg


def compare(method: str, ours_dir: str, theirs_dir: str, base_dir: str) -> Dict[str, float]:
    """Parity figures of one method's outputs (one tensor in memory at a time)."""
    same = total = 0
    lowest = 1.0
    changed = {"ours": 0, "mergekit": 0}
    norm2 = {"ours": 0.0, "mergekit": 0.0}
    with contextlib.ExitStack() as stack:
        ours, theirs, base = (_Checkpoint(d, stack) for d in (ours_dir, theirs_dir, base_dir))
        for name in ours.names():
            a, b = ours.get(name), theirs.get(name)
            equal = int((_bits(a) == _bits(b)).sum())
            same, total = same + equal, total + a.numel()
            lowest = min(lowest, equal / max(1, a.numel()))
            if method in RANDOM:
                origin = base.get(name).double()
                for label, tensor in (("ours", a), ("mergekit", b)):
                    delta = tensor.double() - origin
                    changed[label] += int((delta != 0).sum())
                    norm2[label] += float(delta.square().sum())
    figures = {"bit_identical": same / total, "lowest_tensor": lowest}
    if method in RANDOM:
        figures.update({f"changed_{k}": v / total for k, v in changed.items()})
        figures.update({f"norm_{k}": v ** 0.5 for k, v in norm2.items()})
    return figures


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", default=os.path.join(HERE, "work"), metavar="DIR",
                   help="models, configs and outputs go here (default: bench/work, git-ignored)")
    p.add_argument("--scale", choices=sorted(SHAPES), default="small", help="model size (default: small)")
    p.add_argument("--methods", nargs="+", choices=METHODS, default=METHODS, metavar="METHOD",
                   help=f"methods to run (default: all: {' '.join(METHODS)})")
    p.add_argument("--num-workers", type=int, default=2, metavar="N", help="distmerge --num-workers (default: 2)")
    p.add_argument("--json", metavar="PATH", help="also save the results as JSON")
    return p.parse_args(argv)


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    root = os.path.abspath(os.path.join(args.work, args.scale))
    paths, _ = make_or_reuse_models(os.path.join(root, "models"), SHAPES[args.scale], fine_tunes=3,
                                    dtype=torch.bfloat16)
    files = input_files(paths)
    input_bytes = sum(os.path.getsize(f) for f in files)
    print(f"models: base + 3 fine-tunes, {format_bytes(input_bytes)} in all, bf16 ({args.scale} scale)", flush=True)
    rows = []
    failed = False
    for method in args.methods:
        config_path = os.path.join(root, f"{method}.yml")
        with open(config_path, "w", encoding="utf-8") as f:
            yaml.safe_dump(config_for(method, paths), f, sort_keys=False)
        outs = {tool: os.path.join(root, f"out-{method}-{tool}") for tool in ("mergekit", "distmerge")}
        commands = {
            "mergekit": [sys.executable, "-c", STABLE_MERGEKIT, config_path, outs["mergekit"],
                         "--no-copy-tokenizer", "--quiet"],
            "distmerge": console_script("distmerge", "distmerge.cli") + [
                "merge", config_path, outs["distmerge"], "--no-progress", "--num-workers", str(args.num_workers),
                "--overwrite", "--random-seed", "1"],
        }
        results = {}
        for tool, command in commands.items():
            shutil.rmtree(outs[tool], ignore_errors=True)
            read_files(files)  # warm the page cache for both tools alike
            results[tool] = run_measured(command)
            if results[tool].returncode != 0:
                failed = True
                print(f"[{method}] {tool} FAILED:\n{results[tool].stdout_tail}", flush=True)
        if failed:
            break
        figures = compare(method, outs["distmerge"], outs["mergekit"], paths[0])
        row = {"method": method, "mergekit_s": results["mergekit"].wall_s, "distmerge_s": results["distmerge"].wall_s,
               "mergekit_rss": results["mergekit"].peak_rss_sum, "distmerge_rss": results["distmerge"].peak_rss_sum,
               "mergekit_pss": results["mergekit"].peak_pss_sum, "distmerge_pss": results["distmerge"].peak_pss_sum,
               **figures}
        rows.append(row)
        print(_format_row(row), flush=True)
    print()
    print(f"=== every method, {args.scale} scale ({format_bytes(input_bytes)} in), {os.cpu_count()} CPUs, "
          f"torch {torch.__version__} ===")
    print(_HEADER)
    for row in rows:
        print(_format_row(row))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"scale": args.scale, "input_bytes": input_bytes, "rows": rows}, f, indent=2)
    return 1 if failed else 0


_HEADER = (f"{'method':<17} {'mergekit':>9} {'distmerge':>9} {'speed-up':>8} {'mk PSS':>10} {'dm PSS':>10}  "
           "parity")


def _format_row(row: dict) -> str:
    if row["method"] in RANDOM:
        parity = (f"changed {row['changed_ours']:.2%} vs {row['changed_mergekit']:.2%}, "
                  f"norm {row['norm_ours']:.4g} vs {row['norm_mergekit']:.4g}")
    else:
        parity = f"{row['bit_identical']:.4%} bit-identical (lowest tensor {row['lowest_tensor']:.4%})"
    return (f"{row['method']:<17} {row['mergekit_s']:>8.1f}s {row['distmerge_s']:>8.1f}s "
            f"{row['mergekit_s'] / row['distmerge_s']:>7.2f}x {format_bytes(row['mergekit_pss']):>10} "
            f"{format_bytes(row['distmerge_pss']):>10}  {parity}")


if __name__ == "__main__":
    sys.exit(main())
