"""The writer actor of one merge: a shard writer (`distmerge.output`) run as a Ray actor
on the driver's node, started from a resume point, replaced from what is durable when it
dies, and stopped at the end (gracefully, recording what is durable, when interrupted)."""

from __future__ import annotations

import time
from typing import Any, Optional, Set

from distmerge.errors import MergeFailed
from distmerge.output.destination import Destination, ResumePoint
from distmerge.planner import MergePlan


class WriterActor:
    """Owns the live writer actor: `handle` is what the driver sends units to."""

    def __init__(self, destination: Destination, plan: MergePlan, part_size: int) -> None:
        self.destination = destination
        self.plan = plan
        self.part_size = part_size
        self.writer_class = destination.writer_class()
        self.handle: Any = None
        self.pid: Optional[int] = None

    def start(self, point: ResumePoint) -> None:
        """Start a writer carrying on from `point`, and wait until it is constructed (so that a
        failing constructor fails here, with its error)."""
        import ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
        self.handle = ray.remote(self.writer_class).options(num_cpus=0, scheduling_strategy=here).remote(
            self.destination.url, self.plan.layout, self.plan.config.storage, self.part_size, point.writer_state)
        try:
            self.pid = ray.get(self.handle.process_id.remote())
        except ray.exceptions.RayActorError as err:
            reason = [line for line in str(err).splitlines() if line.strip()][-1].strip()  # not Ray's traceback
            raise MergeFailed(f"the writer actor could not start at {self.destination.url}: {reason}") from err

    def replace(self) -> Set[int]:
        """Stop the (dead) writer, start a new one from what is durable; return the units it holds."""
        self._kill()
        point = self.destination.resume_point(self.plan, self.part_size)
        if point is None:
            raise MergeFailed(f"the writer actor died and {self.destination.url} no longer holds its partial shards")
        self.start(point)
        return point.finished

    def stop(self, graceful: bool) -> bool:
        """Stop the writer: `graceful` lets it record what is durable first. A dead or
        unreachable writer is let go quietly (the error that ended the run matters more);
        returns False if it could not be made sure that the writer is gone (then nothing
        may touch the output after it)."""
        import ray

        if self.handle is None:
            return True
        try:
            if graceful:
                ray.get(self.handle.interrupted.remote(), timeout=120)
        except Exception:  # noqa: BLE001 - see the docstring
            pass
        try:
            self._kill()
        except MergeFailed:
            return False
        finally:
            self.handle = None
        return True

    def _kill(self, timeout: float = 60.0) -> None:
        """Kill the actor and wait until it is gone, so that nothing it still runs can touch the
        output while a replacement reads what is durable: until Ray reports it dead, and,
        when its process is on this machine, until that process has exited."""
        import ray

        try:
            ray.kill(self.handle, no_restart=True)
        except Exception:  # noqa: BLE001 - already gone
            pass
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                ray.get(self.handle.__ray_ready__.remote(), timeout=5)
            except ray.exceptions.ActorDiedError:
                break
            except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
                pass
            time.sleep(0.1)
        else:
            raise MergeFailed(f"the writer actor did not stop within {timeout:.0f} s; re-run the merge to resume it")
        while self.pid and _is_writer_process(self.pid) and time.monotonic() < deadline:
            time.sleep(0.05)


def _is_writer_process(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return b"Writer" in f.read()
    except OSError:
        return False
