"""The driver: statistics passes, then apply, with bounded in-flight work.

Units are Ray tasks (retried by Ray if their worker dies); their output bytes go
straight from the object store to the writer actor without passing through the driver.
At most `max_in_flight` units are computing or waiting to be written at any time,
and never more than `max_in_flight_bytes` of output.

If the writer actor dies, a new one is started from what the destination holds durably
(`WriterActor.replace`): units it lost are computed again, writes that were in flight are
sent again, and the merge carries on.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Set, Tuple

from distmerge.engine.writer import WriterActor
from distmerge.engine.worker import WHOLE_GROUP, WorkerStats, apply_unit, collect_unit, scan_unit
from distmerge.errors import DistmergeError, MergeFailed, OutputFull, WriterLost
from distmerge.methods import get_method
from distmerge.planner import MergePlan, WorkUnit

TASK_RETRIES = 3
WRITER_RESTARTS = 3
GUARD_INTERVAL = 0.5  # seconds


@dataclass
class RunStats:
    read_bytes: int = 0
    written_bytes: int = 0
    worker_peak_rss: Dict[int, int] = field(default_factory=dict)

    def add(self, stats: WorkerStats) -> None:
        self.read_bytes += stats.read_bytes
        self.worker_peak_rss[stats.pid] = max(stats.peak_rss, self.worker_peak_rss.get(stats.pid, 0))


def _failure(unit: WorkUnit, err: BaseException) -> DistmergeError:
    """What a failed unit (or its write) ends the merge with: a full output is kept for a
    resume (`OutputFull`); anything else fails the merge, naming the unit."""
    cause = getattr(err, "cause", None) or err
    if isinstance(cause, OutputFull):
        return OutputFull(str(cause))
    return MergeFailed(f"work unit #{unit.index} ({unit.describe()}) failed: {type(cause).__name__}: {cause}")


class Driver:
    def __init__(self, plan: MergePlan, *, max_in_flight: int, max_in_flight_bytes: int,
                 threads_per_worker: int = 1, allow_nonfinite: bool = False) -> None:
        """The writer comes later (`attach_writer`): `check_inputs` runs before it exists.
        `on_written(unit)` is called once per unit the writer holds; `guard()` at least every
        GUARD_INTERVAL seconds while waiting, and before the writer finalizes: what it raises
        ends the run."""
        import ray

        self.ray = ray
        self.plan = plan
        self.writer: Optional[WriterActor] = None
        self.max_in_flight = max(1, max_in_flight)
        self.max_in_flight_bytes = max_in_flight_bytes
        self.threads = threads_per_worker
        self.allow_nonfinite = allow_nonfinite
        self.durable: Set[int] = set()  # units the writer holds for sure
        self.acknowledged: Set[int] = set()  # units the writer took (maybe not durable yet)
        self.reported: Set[int] = set()
        self.writer_restarts = 0
        self.recomputed = 0  # units written once, lost with a dead writer, computed again
        self.on_written: Callable[[WorkUnit], None] = lambda unit: None
        self.guard: Callable[[], None] = lambda: None
        self.stats = RunStats()
        self.position = {ref: i for g in plan.groups.values() for i, ref in enumerate(g.pieces)}
        options = dict(num_cpus=threads_per_worker, max_retries=TASK_RETRIES, retry_exceptions=False)
        self.collect_task = ray.remote(collect_unit).options(**options)
        self.apply_task = ray.remote(apply_unit).options(num_returns=2, **options)

    # -- statistics ---------------------------------------------------------------------

    def run_statistics(self) -> Dict[str, List[Any]]:
        """Run the phases of every group that spans several pieces; return final carries.

        Each round runs the next phase of every group that has one (the method says which,
        from what was reduced so far), so all groups share the rounds' reads and tasks;
        the engine never looks inside a phase."""
        method = get_method(self.plan.config.method.name)
        groups = {gid: g for gid, g in self.plan.groups.items() if g.distributed}
        carries = {gid: list(g.statistics.carries) for gid, g in groups.items()}
        done = {gid: 0 for gid in groups}
        phases = {gid: phase for gid, g in groups.items()
                  if (phase := method.next_phase(g.statistics, 0, carries[gid])) is not None}
        while phases:
            by_unit: Dict[int, List[Any]] = {}  # per piece: (phase, carry), or None
            slot: Dict[tuple, tuple] = {}
            for gid, phase in phases.items():
                for position, (u, j) in enumerate(groups[gid].pieces):
                    by_unit.setdefault(u, [None] * len(self.plan.units[u].pieces))[j] = (
                        phase, carries[gid][position])
                    slot[(u, j)] = (gid, position)
            partials: Dict[str, List[Any]] = {gid: [None] * len(groups[gid].pieces) for gid in phases}
            jobs = [(u, work) for u, work in by_unit.items()]
            for u, (unit_partials, stats) in self._completed(jobs):
                self.stats.add(stats)
                for j, partial in enumerate(unit_partials):
                    if (u, j) in slot:
                        gid, position = slot[(u, j)]
                        partials[gid][position] = partial
            following = {}
            for gid, phase in phases.items():
                metas = [self.plan.units[u].pieces[j].meta for u, j in groups[gid].pieces]
                carries[gid] = method.reduce(phase, metas, partials[gid], carries[gid])
                done[gid] += 1
                next_phase = method.next_phase(groups[gid].statistics, done[gid], carries[gid])
                if next_phase is not None:
                    following[gid] = next_phase
            phases = following
        return carries

    def _completed(self, jobs: List[tuple]):
        """Run one round of statistics phases over (unit index, per-piece work) jobs; yield (unit index, result)."""
        method_name = self.plan.config.method.name

        def submit(u: int, work: Any) -> Any:
            return self.collect_task.remote(self.plan.units[u], method_name, work,
                                            self.plan.config.storage, self.threads, self.allow_nonfinite)

        yield from self._bounded(jobs, submit)

    def _bounded(self, jobs: List[tuple], submit: Callable[[int, Any], Any]):
        """Submit (unit index, payload) jobs, at most max_in_flight at a time; yield
        (unit index, result) as each finishes; a failure names its unit."""
        pending = list(jobs)
        running: Dict[Any, int] = {}
        while pending or running:
            while pending and len(running) < self.max_in_flight:
                u, payload = pending.pop(0)
                running[submit(u, payload)] = u
            done = self._wait(list(running))
            for ref in done:
                u = running.pop(ref)
                try:
                    yield u, self.ray.get(ref)
                except Exception as err:  # noqa: BLE001 - reported with the unit named
                    raise _failure(self.plan.units[u], err) from err

    def check_inputs(self) -> None:
        """Read every input byte once and refuse NaN/Inf before anything is merged or written."""
        scan = self.ray.remote(scan_unit).options(num_cpus=self.threads, max_retries=TASK_RETRIES,
                                                  retry_exceptions=False)
        storage = self.plan.config.storage
        jobs = [(u.index, None) for u in self.plan.units]
        for _, stats in self._bounded(jobs, lambda u, _: scan.remote(self.plan.units[u], storage, self.threads)):
            self.stats.add(stats)

    # -- apply --------------------------------------------------------------------------

    def unit_carries(self, unit: WorkUnit, reduced: Dict[str, List[Any]]) -> List[Any]:
        carries = []
        for j, piece in enumerate(unit.pieces):
            group = self.plan.groups[piece.group]
            carries.append(reduced[piece.group][self.position[(unit.index, j)]] if group.distributed else WHOLE_GROUP)
        return carries

    def run_apply(self, reduced: Dict[str, List[Any]]) -> None:
        method_name = self.plan.config.method.name
        done = self.durable | self.acknowledged
        pending = [u for u in self.plan.units if u.index not in done]
        computing: Dict[Any, tuple] = {}  # stats ref -> (unit, data ref)
        writing: Dict[Any, tuple] = {}  # write ref -> (unit, data ref)
        in_flight_bytes = 0
        while pending or computing or writing:
            while pending and len(computing) + len(writing) < self.max_in_flight and (
                    in_flight_bytes == 0 or in_flight_bytes + pending[0].out_bytes <= self.max_in_flight_bytes):
                unit = pending.pop(0)
                carries = self.unit_carries(unit, reduced)
                stats_ref, data_ref = self.apply_task.remote(unit, method_name, carries, self.plan.config.storage,
                                                             self.threads, self.allow_nonfinite)
                computing[stats_ref] = (unit, data_ref)
                in_flight_bytes += unit.out_bytes
            ready = self._wait(list(computing) + list(writing))
            for ref in ready:
                if ref in computing:
                    unit, data_ref = computing.pop(ref)
                    try:
                        self.stats.add(self.ray.get(ref))
                    except Exception as err:  # noqa: BLE001
                        raise _failure(unit, err) from err
                    writing[self._write(unit, data_ref)] = (unit, data_ref)
                    continue
                unit, data_ref = writing.pop(ref)
                try:
                    self.stats.written_bytes += self.ray.get(ref)
                except self.ray.exceptions.RayActorError as err:
                    writing[ref] = (unit, data_ref)
                    self._replace_writer(err)
                    # Writes in flight go to the new writer (their results are still in
                    # the object store); every other unit it does not hold is computed again.
                    in_flight_bytes -= sum(u.out_bytes for u, _ in writing.values() if u.index in self.durable)
                    writing = {self._write(u, d): (u, d) for u, d in writing.values() if u.index not in self.durable}
                    busy = {u.index for u, _ in computing.values()} | {u.index for u, _ in writing.values()}
                    pending = [u for u in self.plan.units if u.index not in self.durable and u.index not in busy]
                    break
                except Exception as err:  # noqa: BLE001
                    raise _failure(unit, err) from err
                in_flight_bytes -= unit.out_bytes
                self.acknowledged.add(unit.index)
                self._report(unit)

    def _wait(self, refs: List[Any]) -> List[Any]:
        """The refs that are ready (at least one), checking `self.guard` while waiting: it
        raises to stop the run (an interruption from another thread, a lost output lock)."""
        while True:
            self.guard()
            ready, _ = self.ray.wait(refs, num_returns=1, timeout=GUARD_INTERVAL)
            if ready:
                return ready

    def _write(self, unit: WorkUnit, data_ref: Any) -> Any:
        segments = [(p.shard, p.out_offset, p.out_nbytes) for p in unit.pieces]
        return self.writer.handle.write.remote(segments, data_ref, unit.index)

    def _report(self, unit: WorkUnit) -> None:
        if unit.index not in self.reported:
            self.reported.add(unit.index)
            self.on_written(unit)

    def _replace_writer(self, err: BaseException) -> None:
        """Start a new writer from the durable state (the old one is stopped first)."""
        if self.writer_restarts >= WRITER_RESTARTS:
            raise WriterLost(f"the writer actor died ({self.writer_restarts} restart(s) so far): {err}; "
                             "re-run the merge to resume it") from err
        self.writer_restarts += 1
        try:
            durable = self.writer.replace()
        except Exception as failure:  # noqa: BLE001 - the durable state stays for a resume
            raise WriterLost(f"the writer actor died ({err}) and could not be replaced: {failure}; "
                             "re-run the merge to resume it") from failure
        self.recomputed += len(self.acknowledged - set(durable))
        self._holds(durable)

    def attach_writer(self, writer: WriterActor, durable: Set[int]) -> None:
        """The writer actor to send results to, and the units it already holds."""
        self.writer = writer
        self._holds(durable)

    def _holds(self, durable: Set[int]) -> None:
        """The writer holds exactly `durable` (and has taken nothing else yet)."""
        self.durable = set(durable)
        self.acknowledged = set()
        for unit in self.plan.units:
            if unit.index in self.durable:
                self._report(unit)

    def run(self) -> Tuple[RunStats, Dict[str, Any]]:
        """Run the whole merge; return the run's statistics and what the writer's finalize
        reported."""
        reduced = self.run_statistics()
        self.run_apply(reduced)
        return self.stats, self.finalize(reduced)

    def finalize(self, reduced: Dict[str, List[Any]]) -> Dict[str, Any]:
        """Have the writer commit its shards; if it dies first, restart it and finish the units it lost."""
        while True:
            self.guard()
            try:
                return self.ray.get(self.writer.handle.finalize.remote())
            except OutputFull as err:  # Ray's error is also an instance of its cause's class
                raise OutputFull(str(getattr(err, "cause", None) or err)) from err
            except self.ray.exceptions.RayActorError as err:
                self._replace_writer(err)
                self.run_apply(reduced)
            except self.ray.exceptions.RayTaskError as err:  # the writer ran, and failed
                cause = getattr(err, "cause", None) or err
                raise MergeFailed(f"the writer could not finish the shards: {type(cause).__name__}: {cause}") from err
