"""Start or join Ray: a loopback-only local instance on demand, or an existing cluster."""

from __future__ import annotations

import contextlib
import os
import sys
from typing import Iterator, Optional

LOOPBACK = "127.0.0.1"


def default_num_workers() -> int:
    return max(1, os.cpu_count() or 1)


def force_loopback() -> None:
    """Make a Ray started by this process bind 127.0.0.1 only.

    Ray reads RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 when it is imported (and its child
    processes when they start): with it, every Ray server listens on loopback. If Ray
    was imported before we could set it, the constant it was read into is updated too.
    Usage statistics are off as well (nothing leaves the machine).
    """
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    # A local Ray of ours reports no usage statistics: its dashboard process would send
    # them to Ray's servers, off this machine (an explicit setting by the user wins).
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if "ray" in sys.modules:
        import ray._private.ray_constants as constants

        constants.ENABLE_RAY_CLUSTER = False


@contextlib.contextmanager
def ray_session(address: Optional[str], num_workers: int, object_store_memory: int) -> Iterator[None]:
    """Use the Ray already initialised in this process, join `address`, or start a local one.

    A local instance binds 127.0.0.1 only, has `num_workers` CPUs, no dashboard, and is
    shut down on exit. An instance this function did not start is left running.
    """
    if not address and not ("ray" in sys.modules and sys.modules["ray"].is_initialized()):
        force_loopback()
    import ray

    if ray.is_initialized():
        yield
        return
    if address:
        ray.init(address=address, log_to_driver=True)
    else:
        ray.init(
            address="local",  # our own instance, even beside a running or stale local cluster
            num_cpus=num_workers,
            object_store_memory=object_store_memory,
            include_dashboard=False,
            _node_ip_address=LOOPBACK,
            log_to_driver=True,
            configure_logging=True,
            logging_level="WARNING",
        )
    try:
        yield
    finally:
        ray.shutdown()
