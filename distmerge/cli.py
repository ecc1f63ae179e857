"""The `distmerge` command line."""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import signal
import sys
import tempfile
import threading
from dataclasses import dataclass
from typing import List, Optional

from distmerge.errors import DistmergeError
from distmerge.planner import DEFAULT_SHARD_SIZE

EPILOG = """\
examples:
  distmerge demo                                 tiny synthetic models, real TIES merge on local Ray
  distmerge plan merge.yml ./out                 validate and show the plan (reads headers only)
  distmerge merge merge.yml ./out                merge on a local Ray started on 127.0.0.1
  distmerge merge merge.yml ./out --address auto --shard-size 10GB
  distmerge batch s3://bucket/requests/ --report s3://bucket/reports/today.json
  distmerge submit merge.yml s3://bucket/merged/m1 --address http://HEAD:8265
  distmerge verify ./out --against ./other       check a checkpoint; compare it bit for bit
"""

PLAN, MERGE, BATCH, SUBMIT = "plan", "merge", "batch", "submit"
RUNS = {MERGE, BATCH, SUBMIT}  # commands that merge (here, or on a cluster through `submit`)


@dataclass(frozen=True)
class Option:
    """A command-line option, the commands that take it, and whether `submit` forwards it to
    the command it runs on the cluster."""

    flag: str
    settings: dict
    commands: frozenset
    forwarded: bool = True


def _options() -> List[Option]:
    everywhere = frozenset({PLAN, MERGE, BATCH, SUBMIT})
    return [
        Option("--num-workers", dict(type=int, metavar="N", help=(
            "merge tasks run at once (default: the CPUs of the Ray the merge runs on: this machine's for a "
            "local Ray, the whole cluster's with --address)")), everywhere),
        Option("--memory-per-worker", dict(metavar="SIZE", help=(
            "working memory one task may use, e.g. 2GiB; bigger tensors are split into row ranges (default: what "
            "an interrupted merge being resumed used, else a quarter of this machine's memory shared by the "
            "workers, 256 MiB to 1 GiB)")), everywhere),
        Option("--shard-size", dict(default=str(DEFAULT_SHARD_SIZE), metavar="SIZE", help=(
            "largest output shard, e.g. 5GB (decimal) or 4GiB (default: 5GB)")), everywhere),
        Option("--random-seed", dict(type=_seed, metavar="N", help=(
            "seed of random methods (dare_*, della*), over the config's random_seed; the same seed gives the "
            "same bits for any memory budget, worker count or resume (default: the seed of an interrupted merge "
            "being resumed, else a fresh one, printed and recorded in the card)")), everywhere),
        Option("--storage-options", dict(type=_json_object, metavar="JSON", help=(
            "fsspec options for s3:// (or other remote) URLs, over the config's `storage:` section, e.g. "
            "'{\"endpoint_url\": \"http://127.0.0.1:9000\"}'; default: the standard AWS environment and "
            "credential chain")), everywhere),
        Option("--address", dict(metavar="ADDR", help=(
            "Ray cluster to join: 'auto' (the cluster this machine belongs to) or ray://HOST:10001; default: "
            "start a local Ray bound to 127.0.0.1, even where another Ray runs")), frozenset({MERGE, BATCH}),
            forwarded=False),
        Option("--threads-per-worker", dict(type=int, default=1, metavar="N", help=(
            "CPU threads (and Ray CPUs) each merge task uses (default: 1)")), RUNS),
        Option("--part-size", dict(default=None, metavar="SIZE", help=(
            "multipart upload part size for s3:// output, 5MiB to 5GiB (default: 16MiB, or what the "
            "interrupted merge being resumed used)")), RUNS),
        Option("--overwrite", dict(action="store_true", help="replace a checkpoint already in the output"), RUNS),
        Option("--restart", dict(action="store_true", help=(
            "discard an interrupted merge in the output instead of resuming it")), RUNS),
        Option("--allow-nonfinite", dict(action="store_true", help=(
            "merge inputs holding NaN/Inf (default: fail, naming the tensor)")), RUNS),
        Option("--check-inputs", dict(action="store_true", help=(
            "read every input once before merging and refuse NaN/Inf before the output is touched (default: "
            "each tensor is checked as it is merged)")), RUNS),
        Option("--no-progress", dict(action="store_true", help="do not show the progress bar"),
               frozenset({MERGE}), forwarded=False),
        Option("--report", dict(metavar="URL", help=(
            "write a JSON report here (a local path or s3://...): per request its output, status, error, "
            "seconds and bytes read and written")), frozenset({BATCH, SUBMIT})),
        Option("--parallel", dict(type=int, default=1, metavar="N", help=(
            "requests merged at once, within the same Ray (default: 1)")), frozenset({BATCH, SUBMIT})),
    ]


def _add_options(p: argparse.ArgumentParser, command: str) -> None:
    for option in _options():
        if command in option.commands:
            p.add_argument(option.flag, **option.settings)


def forwarded_arguments(args: argparse.Namespace, command: str) -> List[str]:
    """The options of `args` that `command` takes (merge or batch), as arguments again: what
    `submit` passes on to the command it runs on the cluster. Defaults are left out."""
    arguments: List[str] = []
    for option in _options():
        if not option.forwarded or command not in option.commands:
            continue
        value = getattr(args, option.flag[2:].replace("-", "_"), None)
        if option.settings.get("action") == "store_true":
            arguments += [option.flag] if value else []
        elif value is not None and value != option.settings.get("default"):
            arguments += [option.flag, json.dumps(value) if isinstance(value, dict) else str(value)]
    return arguments


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
    _add_options(p, MERGE)

    p = sub.add_parser("plan", help="validate a config and show the merge plan",
                       description="Read only the inputs' headers; print the work units, bytes to read, "
                                   "output shards and the largest unit's memory estimate.")
    p.add_argument("config", metavar="CONFIG", help="mergekit-style YAML merge config")
    p.add_argument("out", metavar="OUT", nargs="?", help="output directory (only checked, not written)")
    p.add_argument("--units", action="store_true",
                   help="list every work unit: its tensors or row range, bytes, peak memory estimate")
    _add_options(p, PLAN)

    p = sub.add_parser("batch", help="merge every request under a prefix that is not merged yet",
                       description="Merge each request file (*.yml, *.yaml: a mergekit config with one more key, "
                       "`output: URL`) directly under SOURCE, in name order: skipped if its output already holds "
                       "this merge, resumed if interrupted, merged otherwise; failed (with the error) without "
                       "stopping the others; locked if another merge holds its output. Exit status 1 if any "
                       "request failed.")
    p.add_argument("source", metavar="SOURCE", help="directory or prefix (s3://bucket/requests/) of request files")
    _add_options(p, BATCH)

    p = sub.add_parser("submit", help="run a merge (or a batch) as a job on a Ray cluster",
                       description="Submit `distmerge merge CONFIG OUT` (or, with --batch, `distmerge batch "
                       "SOURCE`) through the Ray Jobs API of the cluster at --address, follow its logs, and exit "
                       "with its status. The config travels with the job. Submitting the same merge again "
                       "attaches to its job instead of starting another.")
    p.add_argument("config", metavar="CONFIG", nargs="?", help="mergekit-style YAML merge config")
    p.add_argument("out", metavar="OUT", nargs="?",
                   help="output as the cluster sees it: s3://bucket/prefix, or a path on the cluster's head")
    p.add_argument("--batch", metavar="SOURCE", help="submit `distmerge batch SOURCE` instead of one merge")
    p.add_argument("--address", metavar="URL",
                   default=os.environ.get("RAY_API_SERVER_ADDRESS") or os.environ.get("RAY_ADDRESS"),
                   help="the cluster's job server, e.g. http://HEAD:8265 (default: $RAY_API_SERVER_ADDRESS, "
                        "else $RAY_ADDRESS)")
    p.add_argument("--no-wait", action="store_true", help="submit and return, without following the job")
    p.add_argument("--retry", action="store_true",
                   help="if this merge's job failed or was stopped, delete it and submit the merge again")
    p.add_argument("--submission-id", metavar="ID", help="the job's submission id (--batch only; default: new)")
    _add_options(p, SUBMIT)

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


def _merge_options(args: argparse.Namespace):
    """The MergeOptions the flags of `args` set (a flag the command lacks keeps its default)."""
    from distmerge.job import MergeOptions

    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(MergeOptions) if hasattr(args, f.name)}
    values["progress"] = not getattr(args, "no_progress", True)
    return MergeOptions(**values)


def _merge(args: argparse.Namespace) -> int:
    from distmerge.job import MergeJob

    print(MergeJob(args.config, args.out, _merge_options(args)).execute().format())
    return 0


def _batch(args: argparse.Namespace) -> int:
    from distmerge.batch import run_batch

    options = _merge_options(args)

    def show(result) -> None:
        line = f"{result.status:8} {result.request}"
        if result.output:
            line += f" -> {result.output}"
        line += f" ({result.seconds:.1f} s)"
        if result.error:
            line += f"\n         {result.error}"
        print(line, flush=True)

    report = run_batch(args.source, options, parallel=args.parallel, report_url=args.report, on_result=show)
    print(report.format())
    return 1 if report.failed else 0


def _submit(args: argparse.Namespace) -> int:
    from distmerge.submit import SubmitError, batch_request, merge_request, submit

    if not args.address:
        raise SubmitError("submit needs the cluster's job server: --address http://HEAD:8265 "
                          "(or RAY_API_SERVER_ADDRESS)")
    if args.batch:
        if args.config or args.out:
            raise SubmitError("submit takes either CONFIG OUT (one merge) or --batch SOURCE, not both")
        request = batch_request(args.batch, forwarded_arguments(args, BATCH), args.submission_id)
    else:
        if not (args.config and args.out):
            raise SubmitError("submit needs CONFIG and OUT (one merge), or --batch SOURCE")
        if args.submission_id:
            raise SubmitError("--submission-id is for --batch; a merge's id comes from its config, OUT and options")
        if args.report or args.parallel != 1:
            raise SubmitError("--report and --parallel are options of a batch (--batch SOURCE), not of one merge")
        request = merge_request(args.config, args.out, forwarded_arguments(args, MERGE))
    return submit(request, args.address, wait=not args.no_wait, retry=args.retry)


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


def _exit_on_sigterm(signum: int, frame: object) -> None:
    """SIGTERM ends the command as Ctrl-C would, through its cleanup (the output lock is let
    go, an interrupted merge keeps what is durable); Ray installs the same once it runs."""
    raise SystemExit(128 + signum)


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _exit_on_sigterm)
    if args.command != "submit" and not getattr(args, "address", None):
        from distmerge.engine.session import force_loopback

        force_loopback()  # before anything imports Ray
    try:
        commands = {"merge": _merge, "plan": _plan, "batch": _batch, "submit": _submit, "verify": _verify,
                    "demo": _demo}
        return commands[args.command](args)
    except DistmergeError as err:
        print(f"distmerge: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("distmerge: interrupted", file=sys.stderr)
        return 130


def console_main() -> None:
    """The `distmerge` command: `main`, then exit without the interpreter's last garbage
    collections over every object torch and Ray created (about 0.3 s of a command's
    exit). Refcounting still frees what it frees, and exit handlers still run."""
    code = main()
    gc.freeze()
    sys.exit(code)


if __name__ == "__main__":
    console_main()
