"""Run by test_faults.py in its own process: merge on a 3-node ray.cluster_utils.Cluster,
once undisturbed and once while a worker node is removed. Usage: CONFIG OUT_ROOT."""

import os
import sys
import threading
import time

from distmerge.engine.session import force_loopback

force_loopback()

import psutil  # noqa: E402
import ray  # noqa: E402
from ray.cluster_utils import Cluster  # noqa: E402

import distmerge  # noqa: E402


def main(config: str, root: str) -> None:
    cluster = Cluster(initialize_head=True, head_node_args=dict(
        num_cpus=0, object_store_memory=150 * 2**20, include_dashboard=False))
    try:
        doomed = cluster.add_node(num_cpus=2, object_store_memory=150 * 2**20)
        cluster.add_node(num_cpus=1, object_store_memory=150 * 2**20)
        ray.init(address=cluster.address)
        cluster.wait_for_nodes()
        distmerge.merge(config, os.path.join(root, "calm"), num_workers=3, memory_per_worker=1024 * 1024)

        raylet = psutil.Process(doomed.all_processes["raylet"][0].process.pid)

        def remove_when_busy() -> None:
            """Remove the node as soon as one of its workers is running a merge unit."""
            deadline = time.time() + 120
            while time.time() < deadline:
                try:
                    busy = any("merge_unit" in " ".join(p.cmdline()) for p in raylet.children(recursive=True))
                except psutil.Error:
                    busy = False
                if busy:
                    cluster.remove_node(doomed)
                    print("removed a worker node mid-merge", flush=True)
                    return
                time.sleep(0.01)

        remover = threading.Thread(target=remove_when_busy)
        remover.start()
        summary = distmerge.merge(config, os.path.join(root, "lost-node"), num_workers=3,
                                  memory_per_worker=512 * 1024)
        remover.join()
        print(f"finished: {summary.units} units", flush=True)
    finally:
        ray.shutdown()
        cluster.shutdown()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
