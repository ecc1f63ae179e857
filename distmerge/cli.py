"""The `distmerge` command line."""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from typing import List, Optional

from distmerge.errors import DistmergeError
from distmerge.planner import DEFAULT_SHARD_SIZE

EPILOG = """\
examples:
  distmerge demo                                 tiny synthetic models, real TIES merge on local Ray
  distmerge plan merge.yml ./out                 validate and show the plan (reads headers only)
  distmerge merge merge.yml ./out                merge on a local Ray started on 127.0.0.1
  distmerge merge merge.yml ./out --address auto --shard-size 10GB
  distmerge verify ./out --against ./other       check a checkpoint; compare it bit for bit
"""


def _add_run_options(p: argparse.ArgumentParser, *, merging: bool) -> None:
    p.add_argument("--num-workers", type=int, metavar="N",
                   help="merge tasks run at once (default: CPUs of this machine; on a cluster, the local "
                        "CPU count unless set)")
    p.add_argument("--memory-per-worker", metavar="SIZE",
                   help="working memory one task may use, e.g. 2GiB; bigger tensors are split into row "
                        "ranges (default: what an interrupted merge being resumed used, else a quarter of this "
                        "machine's memory shared by the workers, 256 MiB to 1 GiB)")
    p.add_argument("--shard-size", default=str(DEFAULT_SHARD_SIZE), metavar="SIZE",
                   help="largest output shard, e.g. 5GB (decimal) or 4GiB (default: 5GB)")
    p.add_argument("--random-seed", type=_seed, metavar="N",
                   help="seed of random methods (dare_*, della*), over the config's random_seed; the same seed "
                        "gives the same bits for any memory budget, worker count or resume (default: the seed of "
                        "an interrupted merge being resumed, else a fresh one, printed and recorded in the card)")
    p.add_argument("--storage-options", type=_json_object, metavar="JSON",
                   help='fsspec options for s3:// (or other remote) URLs, over the config\'s `storage:` '
                        'section, e.g. \'{"endpoint_url": "http://127.0.0.1:9000"}\'; default: the standard '
                        "AWS environment and credential chain")
    if merging:
        p.add_argument("--address", metavar="ADDR",
                       help="Ray cluster to join: 'auto' (the cluster this machine belongs to) or "
                            "ray://HOST:10001; default: start a local Ray bound to 127.0.0.1")
        p.add_argument("--threads-per-worker", type=int, default=1, metavar="N",
                       help="CPU threads (and Ray CPUs) each merge task uses (default: 1)")
        p.add_argument("--part-size", default=None, metavar="SIZE",
                       help="multipart upload part size for s3:// output, 5MiB to 5GiB (default: 64MiB, or "
                            "what the interrupted merge being resumed used)")
        p.add_argument("--overwrite", action="store_true", help="replace a checkpoint already in OUT")
        p.add_argument("--restart", action="store_true",
                       help="discard an interrupted merge in OUT instead of resuming it")
        p.add_argument("--allow-nonfinite", action="store_true",
                       help="merge inputs holding NaN/Inf (default: fail, naming the tensor)")
        p.add_argument("--check-inputs", action="store_true",
                       help="read every input once before merging and refuse NaN/Inf before OUT is touched "
                            "(default: each tensor is checked as it is merged)")
        p.add_argument("--no-progress", action="store_true", help="do not show the progress bar")


def _seed(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if not 0 <= value < 2**63:
        raise argparse.ArgumentTypeError("must be from 0 to 2**63 - 1")
    return value


def _json_object(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise argparse.ArgumentTypeError(f"not JSON: {err}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("must be a JSON object of fsspec options")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="distmerge",
        description="Merge large language models (mergekit YAML configs) out of core on Ray, "
                    "into a sharded safetensors checkpoint.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("merge", help="run a merge",
                       description="Run the merge CONFIG describes and write it to OUT. If OUT holds an "
                       "interrupted run of the same merge, it is resumed.")
    p.add_argument("config", metavar="CONFIG", help="mergekit-style YAML merge config")
    p.add_argument("out", metavar="OUT", help="output directory (or s3://bucket/prefix) for the merged checkpoint")
    _add_run_options(p, merging=True)

    p = sub.add_parser("plan", help="validate a config and show the merge plan",
                       description="Read only the inputs' headers; print the work units, bytes to read, "
                                   "output shards and the largest unit's memory estimate.")
    p.add_argument("config", metavar="CONFIG", help="mergekit-style YAML merge config")
    p.add_argument("out", metavar="OUT", nargs="?", help="output directory (only checked, not written)")
    p.add_argument("--units", action="store_true",
                   help="list every work unit: its tensors or row range, bytes, peak memory estimate")
    _add_run_options(p, merging=False)

    p = sub.add_parser("verify", help="check a merged checkpoint (and optionally compare it with another)",
                       description="Check OUT's index against its shards: every tensor present, offsets and sizes "
                                   "consistent, headers valid, total_size right, the checksums the merge recorded. "
                                   "With --against, also compare every tensor bit for bit. Exit status 0 on pass.")
    p.add_argument("out", metavar="OUT", help="checkpoint directory or URL")
    p.add_argument("--against", metavar="OTHER", help="another checkpoint whose tensors must be bit-identical")
    p.add_argument("--storage-options", type=_json_object, metavar="JSON", help="fsspec options for remote URLs")

    p = sub.add_parser("demo", help="make tiny synthetic models and TIES-merge them on local Ray",
                       description="Write a synthetic Llama-shaped base model and three fine-tunes, then run "
                                   "a real TIES merge of them (weights 0.5/0.3/0.2, density 0.5, bf16).")
    p.add_argument("--out", metavar="DIR", help="where to put models and result (default: a temporary directory)")
    p.add_argument("--num-workers", type=int, default=2, metavar="N", help="Ray workers (default: 2)")
    return parser


def _merge(args: argparse.Namespace) -> int:
    from distmerge.api import merge

    summary = merge(args.config, args.out, address=args.address, num_workers=args.num_workers,
                    shard_size=args.shard_size, memory_per_worker=args.memory_per_worker,
                    overwrite=args.overwrite, progress=not args.no_progress,
                    threads_per_worker=args.threads_per_worker, storage_options=args.storage_options,
                    part_size=args.part_size, allow_nonfinite=args.allow_nonfinite, restart=args.restart,
                    check_inputs=args.check_inputs, random_seed=args.random_seed)
    print(summary.format())
    return 0


def _plan(args: argparse.Namespace) -> int:
    from distmerge.output.destination import existing_checkpoint
    from distmerge.api import plan
    from distmerge.planner import format_plan

    merge_plan = plan(args.config, shard_size=args.shard_size, memory_per_worker=args.memory_per_worker,
                      num_workers=args.num_workers, storage_options=args.storage_options,
                      random_seed=args.random_seed)
    print(format_plan(merge_plan, units=args.units))
    if args.out and existing_checkpoint(args.out, merge_plan.config.storage):
        print(f"warning: {args.out} already holds a checkpoint; `distmerge merge` needs --overwrite")
    return 0


def _verify(args: argparse.Namespace) -> int:
    from distmerge.io.storage import Storage
    from distmerge.verify import verify_checkpoint

    report = verify_checkpoint(args.out, args.against, Storage(args.storage_options or {}))
    print(report.format())
    return 0 if report.ok else 1


def _demo(args: argparse.Namespace) -> int:
    import yaml

    from distmerge.api import merge
    from distmerge.synthetic import make_models, ties_config

    root = args.out or tempfile.mkdtemp(prefix="distmerge-demo-")
    print(f"writing synthetic models under {root} ...")
    paths = make_models(os.path.join(root, "models"))
    config_path = os.path.join(root, "merge.yml")
    with open(config_path, "w", encoding="utf-8") as f:
        yaml.safe_dump(ties_config(paths), f, sort_keys=False)
    print(f"config: {config_path}")
    summary = merge(config_path, os.path.join(root, "merged"), num_workers=args.num_workers,
                    overwrite=True, progress=True)
    print(summary.format())
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if not getattr(args, "address", None):
        from distmerge.engine.session import force_loopback

        force_loopback()  # before anything imports Ray
    try:
        return {"merge": _merge, "plan": _plan, "verify": _verify, "demo": _demo}[args.command](args)
    except DistmergeError as err:
        print(f"distmerge: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("distmerge: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
