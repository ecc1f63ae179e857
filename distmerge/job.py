"""One merge as an object with a plain lifecycle, which every front-end drives (`merge`,
`batch`, and `submit` through `merge` on the cluster):

    plan  ->  open the destination (lock; fresh, resume, or refuse)  ->  run  ->  commit
                                                     or, on failure: clean up (fail) / keep (interrupt)

`plan` reads headers only. `open` takes the output's lock and refuses what would clobber
or not fit before Ray starts; the destination is only changed once the run starts (after
the optional input check). A failed run (a bad input, a unit that kept failing, storage
refusing the output) removes what it wrote; an interrupted one (Ctrl-C, SIGTERM, a full
disk, a writer that could not be replaced, a lost lock, a lost Ray) keeps what is
durable, so running the same merge again resumes it.
"""

from __future__ import annotations

import dataclasses
import os
import threading
import time
from dataclasses import dataclass
from typing import Any, Mapping, Optional, Tuple, Union

from distmerge.config import MergeConfig, load_config
from distmerge.engine.session import default_num_workers, ray_session
from distmerge.errors import DistmergeError, LockLost, OutputFull, WriterLost
from distmerge.memory import peak_rss
from distmerge.output.destination import Destination
from distmerge.output.lock import OutputLock, output_lock
from distmerge.output.multipart import DEFAULT_PART_SIZE
from distmerge.planner import DEFAULT_SHARD_SIZE, MergePlan, plan_merge
from distmerge.sizes import format_bytes, parse_size

Size = Union[int, str, None]
# Errors that end a run as an interruption, keeping what is durable for a resume.
KEPT_ERRORS = (WriterLost, OutputFull, LockLost)


@dataclass(frozen=True)
class MergeOptions:
    """How to run a merge (what the `distmerge merge` flags set)."""

    address: Optional[str] = None  # None: a local Ray on 127.0.0.1, started for this merge
    num_workers: Optional[int] = None
    shard_size: Size = DEFAULT_SHARD_SIZE
    memory_per_worker: Size = None
    overwrite: bool = False
    progress: bool = False
    threads_per_worker: int = 1
    storage_options: Optional[Mapping[str, Any]] = None
    part_size: Size = None
    allow_nonfinite: bool = False
    restart: bool = False
    check_inputs: bool = False
    random_seed: Optional[int] = None


@dataclass(frozen=True)
class MergeSummary:
    out_dir: str
    tensors: int
    units: int
    shards: int
    read_bytes: int
    written_bytes: int
    seconds: float
    driver_peak_rss: int
    worker_peak_rss: int
    workers: int
    writer_peak_rss: int
    reused_units: int = 0
    writer_restarts: int = 0
    recomputed_units: int = 0
    random_seed: Optional[int] = None  # set for methods that draw random numbers
    # seconds: "planned" (plan + lock + checks), "ray ready" and "first unit" (since the start),
    # "statistics", "apply", "commit" (each phase's own time), "worker cpu" (all tasks)
    timeline: Mapping[str, float] = dataclasses.field(default_factory=dict)

    @property
    def throughput(self) -> float:
        """Input bytes read per second."""
        return self.read_bytes / self.seconds if self.seconds else 0.0

    def format(self) -> str:
        return (
            f"merged {self.tensors} tensors in {self.units} units into {self.shards} shard(s) at {self.out_dir}"
            + (f" (resumed: {self.reused_units} units reused)" if self.reused_units else "")
            + (f" (writer actor restarted {self.writer_restarts}x, {self.recomputed_units} units computed again)"
               if self.writer_restarts else "") + "\n"
            f"read {format_bytes(self.read_bytes)}, wrote {format_bytes(self.written_bytes)} "
            f"in {self.seconds:.1f} s ({format_bytes(self.throughput)}/s read)\n"
            f"peak memory: driver {format_bytes(self.driver_peak_rss)}, "
            f"largest worker {format_bytes(self.worker_peak_rss)} ({self.workers} worker process(es)), "
            f"writer {format_bytes(self.writer_peak_rss)}"
            + (f"\nrandom seed: {self.random_seed} (--random-seed {self.random_seed} reproduces this merge)"
               if self.random_seed is not None else "")
            + (f"\n{self.format_timeline()}" if self.timeline else "")
        )

    def format_timeline(self) -> str:
        t = self.timeline
        at = ", ".join(f"{label} at {t[key]:.1f} s" for key, label in
                       (("planned", "planned"), ("ray ready", "Ray ready"), ("first unit", "first unit computing"))
                       if key in t)
        took = ", ".join(f"{key} {t[key]:.1f} s" for key in ("statistics", "apply", "commit") if key in t)
        cpu = f" (workers' CPU {t['worker cpu']:.1f} s)" if "worker cpu" in t else ""
        return f"time: {at}; {took}{cpu}"


def object_store_size(needed: int) -> int:
    """A local Ray's object store for `needed` bytes of results in flight: 512 MiB to
    8 GiB, within /dev/shm's room (`fit_shared_memory`)."""
    return fit_shared_memory(int(min(max(needed, 512 * 2**20), 8 * 2**30)))


def fit_shared_memory(size: int) -> int:
    """`size`, or 80% of /dev/shm's free room where that is less: a Ray object store larger
    than the room would live in /tmp, on disk. Left as is where /dev/shm is missing or has
    room for less than 512 MiB (Ray then uses /tmp, and says so)."""
    try:
        stats = os.statvfs("/dev/shm")
    except OSError:
        return size
    room = int(stats.f_bavail * stats.f_frsize * 0.8)
    return min(size, room) if room >= 512 * 2**20 else size


def as_config(config: Union[str, os.PathLike, MergeConfig],
              storage_options: Optional[Mapping[str, Any]] = None) -> MergeConfig:
    loaded = config if isinstance(config, MergeConfig) else load_config(os.fspath(config))
    if storage_options:
        loaded = dataclasses.replace(loaded, storage=loaded.storage.merged(storage_options))
    return loaded


def merge_seed(config: MergeConfig, given: Optional[int]) -> Tuple[int, bool]:
    """(The seed random methods use, whether it was drawn): given, else the config's, else
    drawn; 0 for methods without randomness."""
    if not config.method.uses_random:
        return 0, False
    if given is not None:
        return given, False
    if config.random_seed is not None:
        return config.random_seed, False
    from distmerge.methods.counter_rng import draw_seed

    return draw_seed(), True


def build_plan(config: MergeConfig, *, shard_size: Size = DEFAULT_SHARD_SIZE, memory_per_worker: Size = None,
               num_workers: Optional[int] = None, random_seed: Optional[int] = None) -> MergePlan:
    """The merge plan of a loaded config (headers only)."""
    seed, drawn = merge_seed(config, random_seed)
    merge_plan = plan_merge(config, shard_size=parse_size(shard_size),
                            memory_per_worker=parse_size(memory_per_worker) if memory_per_worker else None,
                            num_workers=num_workers or default_num_workers(), seed=seed)
    return dataclasses.replace(merge_plan, seed_drawn=drawn)


@dataclass(frozen=True)
class RunResult:
    stats: Any  # engine.driver.RunStats
    written: dict  # what the writer's finalize reported: bytes, checksums, its peak memory
    reused_units: int  # units an interrupted run had made durable
    writer_restarts: int
    recomputed_units: int


class MergeJob:
    """One merge of `config` into `out`. `execute` runs the whole lifecycle; the stages are
    public so that front-ends can look before they leap (e.g. `batch` plans and asks
    `is_done` before taking the lock)."""

    def __init__(self, config: Union[str, os.PathLike, MergeConfig], out: Union[str, os.PathLike],
                 options: MergeOptions = MergeOptions(), purpose: str = "distmerge merge") -> None:
        self.options = options
        self.config = as_config(config, options.storage_options)
        self.destination = Destination(os.fspath(out), self.config.storage)
        self.destination.writer_class()  # an output we cannot write is refused before anything else
        self.workers = options.num_workers or default_num_workers()
        self.purpose = purpose
        self.plan: Optional[MergePlan] = None
        self.part_size = 0
        self.lock: Optional[OutputLock] = None
        self.resumed = False
        self.cancel = threading.Event()  # set from another thread to interrupt `run`

    # -- plan ----------------------------------------------------------------------------

    def make_plan(self) -> MergePlan:
        """Plan as an interrupted merge here was planned (its memory budget, part size and
        seed), unless told to restart; headers only."""
        options = self.options
        recorded = self.destination.recorded_options() if not options.restart else {}
        random_seed = options.random_seed
        if random_seed is None and self.config.random_seed is None:
            random_seed = recorded.get("random_seed")
        self.plan = build_plan(self.config, shard_size=options.shard_size,
                               memory_per_worker=options.memory_per_worker or recorded.get("memory_per_worker"),
                               num_workers=self.workers, random_seed=random_seed)
        if self.destination.s3:
            self.part_size = parse_size(options.part_size or recorded.get("part_size") or DEFAULT_PART_SIZE)
        return self.plan

    def is_done(self) -> bool:
        """Whether the destination already holds this merge, finished (same config and inputs)."""
        return self.destination.holds_merge_of(self.plan or self.make_plan())

    # -- open ------------------------------------------------------------------------------

    def acquire_lock(self) -> None:
        """Take the output's lock (raises `OutputLocked`, naming the holder); idempotent."""
        if self.lock is None:
            lock = output_lock(self.destination, self.purpose)
            lock.acquire()
            self.lock = lock

    def check(self) -> None:
        """Raise every refusal (clobbering a checkpoint, an interrupted merge of another plan,
        too little space) without changing anything; note whether this run resumes one."""
        plan = self.plan or self.make_plan()
        interrupted = self.destination.check(self.options.overwrite, plan, self.options.restart, self.part_size)
        self.resumed = interrupted and not self.options.restart

    def open(self) -> None:
        """Take the output's lock and check the destination (the lock is let go on a refusal)."""
        self.acquire_lock()
        try:
            self.check()
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Release the output's lock."""
        if self.lock is not None:
            self.lock.release()
            self.lock = None

    # -- run ---------------------------------------------------------------------------------

    def object_store_bytes(self) -> int:
        """Object store a local Ray needs for this merge's results in flight, within /dev/shm's room."""
        return object_store_size(2 * self._max_in_flight_bytes())

    def _max_in_flight_bytes(self, workers: Optional[int] = None) -> int:
        largest_output = max(u.out_bytes for u in self.plan.units)
        return max(2 * (workers or self.workers) * largest_output, 256 * 2**20)

    def _running_workers(self) -> int:
        """Tasks to keep running: --num-workers, else every CPU of the Ray we run on (a
        cluster's, when joined; this machine's, for the local Ray started with that many)."""
        if self.options.num_workers:
            return self.options.num_workers
        import ray

        return max(1, int(ray.cluster_resources().get("CPU", self.workers)) // self.options.threads_per_worker)

    def run(self) -> RunResult:
        """Merge every unit into the destination (within a Ray session)."""
        from distmerge.engine.driver import Driver
        from distmerge.engine.writer import WriterActor

        plan, options = self.plan, self.options
        workers = self._running_workers()
        driver = Driver(plan, max_in_flight=2 * workers, max_in_flight_bytes=self._max_in_flight_bytes(workers),
                        threads_per_worker=options.threads_per_worker, allow_nonfinite=options.allow_nonfinite)
        driver.warm_up(workers)
        if options.check_inputs and not options.allow_nonfinite:
            driver.check_inputs()  # NaN/Inf refused before the destination is touched
        start = self.destination.prepare(options.overwrite, plan, options.restart, self.part_size)
        writer = WriterActor(self.destination, plan, self.part_size)
        bar = _ProgressBar(plan) if options.progress else None
        if bar:
            driver.on_written = bar.unit_written
        driver.guard = self._guard
        try:
            writer.start(start)
            driver.attach_writer(writer, start.finished)
            stats, written = driver.run()
        except BaseException as err:
            # A merge that failed (a bad input, a unit that kept failing, storage refusing
            # the output) cleans up once its writer is surely gone. Anything else is an
            # interruption and keeps what is durable, for a resume.
            failed = isinstance(err, DistmergeError) and not isinstance(err, KEPT_ERRORS)
            stopped = writer.stop(graceful=not failed)
            if failed and stopped and not (self.lock and self.lock.lost):
                self.destination.discard()
            raise
        finally:
            if bar:
                bar.close()
            writer.stop(graceful=False)
        return RunResult(stats, written, len(start.finished), driver.writer_restarts, driver.recomputed)

    def _guard(self) -> None:
        """Checked by the driver while it waits: stop when told to, or when the lock is lost."""
        if self.cancel.is_set():
            raise KeyboardInterrupt(f"the merge into {self.destination.url} was interrupted")
        if self.lock is not None:
            self.lock.check_held()

    # -- commit ------------------------------------------------------------------------------

    def commit(self, result: RunResult) -> None:
        """Write the companion files and the index (last), then drop the resume state."""
        from distmerge.output.commit import commit_checkpoint

        self.lock.check_held()
        commit_checkpoint(self.plan, self.destination, result.written["checksums"],
                          result.written["checksum_algorithm"])
        self.destination.finish()

    def execute(self) -> MergeSummary:
        """plan -> open -> run -> commit, in one call; the lock is released in every case."""
        started = time.time()
        plan = self.plan or self.make_plan()
        self.open()
        timeline = {"planned": time.time() - started}
        try:
            with ray_session(self.options.address, self.workers, self.object_store_bytes()):
                timeline["ray ready"] = time.time() - started
                result = self.run()
            committing = time.time()
            self.commit(result)
        finally:
            self.close()
        stats = result.stats
        if stats.first_task_started is not None:
            timeline["first unit"] = max(0.0, stats.first_task_started - started)
        timeline.update({key: stats.phase_seconds.get(key, 0.0) for key in ("statistics", "apply")})
        timeline["commit"] = stats.phase_seconds.get("finalize", 0.0) + time.time() - committing
        timeline["worker cpu"] = stats.worker_cpu_seconds
        return MergeSummary(
            out_dir=self.destination.url,
            tensors=plan.tensor_count,
            units=len(plan.units),
            shards=len(plan.layout.shards),
            read_bytes=result.stats.read_bytes,
            written_bytes=result.written["bytes_written"],
            seconds=time.time() - started,
            driver_peak_rss=peak_rss(),
            worker_peak_rss=max(result.stats.worker_peak_rss.values(), default=0),
            workers=len(result.stats.worker_peak_rss),
            writer_peak_rss=result.written["peak_rss"],
            reused_units=result.reused_units,
            writer_restarts=result.writer_restarts,
            recomputed_units=result.recomputed_units,
            random_seed=plan.seed if self.config.method.uses_random else None,
            timeline=timeline,
        )


class _ProgressBar:
    """Output bytes written, with finished tensors as the postfix."""

    def __init__(self, merge_plan: MergePlan) -> None:
        from tqdm import tqdm

        self.total_tensors = merge_plan.tensor_count
        self.done_tensors = 0
        self.bar = tqdm(total=merge_plan.layout.total_size, unit="B", unit_scale=True, unit_divisor=1024,
                        desc="merging", dynamic_ncols=True)

    def unit_written(self, unit) -> None:
        self.done_tensors += sum(1 for p in unit.pieces if p.meta.row_end == (p.meta.shape[0] if p.meta.shape else 1))
        self.bar.set_postfix_str(f"{self.done_tensors}/{self.total_tensors} tensors", refresh=False)
        self.bar.update(unit.out_bytes)

    def close(self) -> None:
        self.bar.close()
