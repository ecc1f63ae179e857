"""The driver: statistics passes, then apply, with bounded in-flight work.

Units are Ray generator tasks (retried by Ray if their worker dies): each yields its output
chunk by chunk (a streamed unit piece by piece), and the bytes go straight from the object
store to the writer actor without passing through the driver.
At most `max_in_flight` units are computing or waiting to be written at any time,
and never more than `max_in_flight_bytes` of output.

If the writer actor dies, a new one is started from what the destination holds durably
(`WriterActor.replace`): units it lost are computed again, writes that were in flight are
sent again, and the merge carries on.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterator, List, Optional, Set, Tuple

from distmerge.engine.writer import WriterActor
from distmerge.engine.worker import WHOLE_GROUP, WorkerStats, collect_unit, merge_unit, scan_unit, warm_up
from distmerge.errors import DistmergeError, MergeFailed, OutputFull, WriterLost
from distmerge.io.storage import is_remote, split_url
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
    first_task_started: Optional[float] = None  # wall clock (time.time())
    worker_cpu_seconds: float = 0.0
    phase_seconds: Dict[str, float] = field(default_factory=dict)  # statistics, apply, finalize

    def add(self, stats: WorkerStats) -> None:
        self.read_bytes += stats.read_bytes
        self.worker_peak_rss[stats.pid] = max(stats.peak_rss, self.worker_peak_rss.get(stats.pid, 0))
        self.worker_cpu_seconds += stats.cpu_seconds
        if stats.started and (self.first_task_started is None or stats.started < self.first_task_started):
            self.first_task_started = stats.started

    @contextmanager
    def timed(self, phase: str) -> Iterator[None]:
        started = time.perf_counter()
        try:
            yield
        finally:
            self.phase_seconds[phase] = self.phase_seconds.get(phase, 0.0) + time.perf_counter() - started


def _failure(unit: WorkUnit, err: BaseException) -> DistmergeError:
    """What a failed unit (or its write) ends the merge with: a full output is kept for a
    resume (`OutputFull`); anything else fails the merge, naming the unit."""
    cause = getattr(err, "cause", None) or err
    if isinstance(cause, OutputFull):
        return OutputFull(str(cause))
    return MergeFailed(f"work unit #{unit.index} ({unit.describe()}) failed: {type(cause).__name__}: {cause}")


@dataclass(eq=False)
class _UnitRun:
    """One unit being merged: its task's generator, and how many chunks were yielded and written."""

    unit: WorkUnit
    generator: Any
    yielded: int = 0
    written: int = 0
    computed: bool = False  # its task has finished (stats received)


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
        # A generator task: its chunks stream out while it runs, at most two waiting unread.
        self.merge_task = ray.remote(merge_unit).options(num_returns="streaming",
                                                         _generator_backpressure_num_objects=2, **options)

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

    def warm_up(self, workers: int) -> None:
        """Have `workers` worker processes import the worker code (torch) and connect the
        remote inputs' storage clients now, while the destination is prepared and the
        writer starts; nothing waits for them."""
        remote = {split_url(m.path)[0]: m.path for m in self.plan.config.inputs if is_remote(m.path)}
        task = self.ray.remote(warm_up).options(num_cpus=self.threads)
        for _ in range(workers):
            task.remote(self.plan.config.storage, sorted(remote.values()))

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
        """Merge every unit the writer does not hold yet, at most `max_in_flight` at a time
        and about `max_in_flight_bytes` of output waiting to be written; each chunk of output
        goes to the writer as soon as its task yields it (a streamed unit's piece by piece)."""
        pending = self._in_start_order(self.durable | self.acknowledged)
        producing: Dict[Any, _UnitRun] = {}  # generator -> its run, until its stats arrive
        writing: Dict[Any, Tuple[_UnitRun, Any]] = {}  # write ref -> (run, data ref)
        active: Dict[int, _UnitRun] = {}
        in_flight_bytes = 0
        while pending or active:
            while pending and len(active) < self.max_in_flight and (
                    in_flight_bytes == 0 or in_flight_bytes + pending[0].window_bytes <= self.max_in_flight_bytes):
                run = self._start(pending.pop(0), reduced)
                producing[run.generator] = active[run.unit.index] = run
                in_flight_bytes += run.unit.window_bytes
            for ref in self._wait(list(producing) + list(writing)):
                if ref in producing:
                    run = producing[ref]
                    try:
                        item = next(ref)
                    except StopIteration:  # the task failed: its last chunk's write reports why
                        del producing[ref]
                        continue
                    if run.yielded < len(run.unit.chunks):
                        writing[self._write(run, item)] = (run, item)
                        continue
                    del producing[ref]
                    try:
                        self.stats.add(self.ray.get(item))
                    except Exception as err:  # noqa: BLE001
                        raise _failure(run.unit, err) from err
                    run.computed = True
                else:
                    run, data_ref = writing.pop(ref)
                    try:
                        self.stats.written_bytes += self.ray.get(ref)
                    except self.ray.exceptions.RayActorError as err:
                        self._replace_writer(err)
                        pending, producing, writing = self._after_writer_replaced(active, producing, writing,
                                                                                 (run, data_ref))
                        in_flight_bytes = sum(r.unit.window_bytes for r in active.values())
                        break
                    except Exception as err:  # noqa: BLE001
                        raise _failure(run.unit, err) from err
                    run.written += 1
                if run.computed and run.written == len(run.unit.chunks):
                    del active[run.unit.index]
                    in_flight_bytes -= run.unit.window_bytes
                    self.acknowledged.add(run.unit.index)
                    self._report(run.unit)

    def _start(self, unit: WorkUnit, reduced: Dict[str, List[Any]]) -> "_UnitRun":
        generator = self.merge_task.remote(unit, self.plan.config.method.name, self.unit_carries(unit, reduced),
                                           self.plan.config.storage, self.threads, self.allow_nonfinite)
        return _UnitRun(unit, generator)

    def _after_writer_replaced(self, active: Dict[int, "_UnitRun"], producing: Dict[Any, "_UnitRun"],
                               writing: Dict[Any, Tuple["_UnitRun", Any]], failed: Tuple["_UnitRun", Any]):
        """After a new writer took over from what is durable: a unit in flight that sent
        the old writer nothing carries on; a one-chunk unit whose output is still in the
        object store is sent again; any other unit that sent the old writer output is
        computed again, as is every unit the old writer took but did not make durable.
        Returns (pending, producing, writing)."""
        in_flight = [failed, *writing.values()]
        resend = {run.unit.index: (run, data) for run, data in in_flight if len(run.unit.chunks) == 1}
        for index, run in list(active.items()):
            if index in self.durable or (run.yielded and index not in resend):
                if index not in self.durable:
                    self.ray.cancel(run.generator)
                del active[index]
        writing = {}
        for run, data in resend.values():
            if run.unit.index in active:
                run.yielded = run.written = 0
                writing[self._write(run, data)] = (run, data)
        producing = {g: r for g, r in producing.items() if r.unit.index in active}
        return self._in_start_order(self.durable | set(active)), producing, writing

    def _in_start_order(self, skip: Set[int]) -> List[WorkUnit]:
        """The units not in `skip`, streamed ones (the longest tasks) first, largest first."""
        units = [u for u in self.plan.units if u.index not in skip]
        return sorted(units, key=lambda u: (not u.streamed, -u.read_bytes if u.streamed else u.index))

    def _wait(self, refs: List[Any]) -> List[Any]:
        """The refs that are ready (at least one), checking `self.guard` while waiting: it
        raises to stop the run (an interruption from another thread, a lost output lock)."""
        while True:
            self.guard()
            ready, _ = self.ray.wait(refs, num_returns=1, timeout=GUARD_INTERVAL)
            if ready:
                return ready

    def _write(self, run: "_UnitRun", data_ref: Any) -> Any:
        """Send the run's next chunk to the writer; the last one logs the unit as written."""
        chunk = run.unit.chunks[run.yielded]
        run.yielded += 1
        segments = [(p.shard, p.out_offset, p.out_nbytes) for p in chunk]
        last = run.yielded == len(run.unit.chunks)
        return self.writer.handle.write.remote(segments, data_ref, run.unit.index if last else -1)

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
        with self.stats.timed("statistics"):
            reduced = self.run_statistics()
        with self.stats.timed("apply"):
            self.run_apply(reduced)
        with self.stats.timed("finalize"):
            written = self.finalize(reduced)
        return self.stats, written

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
