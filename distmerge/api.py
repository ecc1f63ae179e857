"""The public entry points: plan a merge, run it, and summarise what happened."""

from __future__ import annotations

import dataclasses
import os
import time
from dataclasses import dataclass
from typing import Any, Dict, Mapping, Optional, Set, Tuple, Union

from distmerge.config import MergeConfig, load_config
from distmerge.errors import MergeFailed, WriterLost
from distmerge.engine.session import default_num_workers, ray_session
from distmerge.io.commit import Destination, commit_checkpoint
from distmerge.io.multipart import DEFAULT_PART_SIZE
from distmerge.memory import peak_rss
from distmerge.planner import DEFAULT_SHARD_SIZE, MergePlan, plan_merge
from distmerge.sizes import format_bytes, parse_size


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
        )


def _as_config(config: Union[str, os.PathLike, MergeConfig],
               storage_options: Optional[Mapping[str, Any]] = None) -> MergeConfig:
    loaded = config if isinstance(config, MergeConfig) else load_config(os.fspath(config))
    if storage_options:
        loaded = dataclasses.replace(loaded, storage=loaded.storage.merged(storage_options))
    return loaded


def plan(config: Union[str, os.PathLike, MergeConfig], *, shard_size: Union[int, str] = DEFAULT_SHARD_SIZE,
         memory_per_worker: Union[int, str, None] = None, num_workers: Optional[int] = None,
         storage_options: Optional[Mapping[str, Any]] = None, random_seed: Optional[int] = None) -> MergePlan:
    """Validate the config and inputs and build the merge plan, reading headers only.

    `storage_options` are fsspec options for remote URLs (endpoint_url, profile, anon, ...),
    over the config's `storage:` section. `random_seed` (over the config's `random_seed`)
    seeds random methods; without either, a fresh seed is drawn for them.
    """
    merge_config = _as_config(config, storage_options)
    seed, drawn = _merge_seed(merge_config, random_seed)
    merge_plan = plan_merge(
        merge_config,
        shard_size=parse_size(shard_size),
        memory_per_worker=parse_size(memory_per_worker) if memory_per_worker else None,
        num_workers=num_workers or default_num_workers(),
        seed=seed,
    )
    return dataclasses.replace(merge_plan, seed_drawn=drawn)


def _merge_seed(config: MergeConfig, given: Optional[int]) -> Tuple[int, bool]:
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


def merge(config: Union[str, os.PathLike, MergeConfig], out_dir: Union[str, os.PathLike], *,
          address: Optional[str] = None, num_workers: Optional[int] = None,
          shard_size: Union[int, str] = DEFAULT_SHARD_SIZE, memory_per_worker: Union[int, str, None] = None,
          overwrite: bool = False, progress: bool = False, threads_per_worker: int = 1,
          storage_options: Optional[Mapping[str, Any]] = None,
          part_size: Union[int, str, None] = None, allow_nonfinite: bool = False,
          restart: bool = False, check_inputs: bool = False, random_seed: Optional[int] = None) -> MergeSummary:
    """Merge the models of a mergekit-style config into a sharded safetensors checkpoint.

    Without `address` a local Ray is started on 127.0.0.1 (and stopped afterwards); with
    `address="auto"` or `"ray://host:10001"` the merge runs on that cluster. Everything is
    validated before any tensor data is read; on failure nothing that looks like a
    finished checkpoint is left at `out_dir`. Inputs and `out_dir` may be local paths or
    fsspec URLs (s3://bucket/prefix); `part_size` is the multipart part size for S3 output
    (default 64 MiB, or what the interrupted run being resumed used).
    NaN/Inf in an input fails the merge naming the tensor, unless `allow_nonfinite`; it is
    found as each unit reads its inputs, or, with `check_inputs`, by one extra read of
    every input before the destination is touched.
    Re-running an interrupted merge resumes it (units already written are reused; a
    dead writer actor is replaced the same way mid-run); `restart` discards an
    interrupted merge instead.
    Random methods draw from a generator keyed by `random_seed` (over the config's
    `random_seed`; default: the interrupted merge's seed when resuming, else a fresh one,
    reported in the summary and the model card).
    """
    import ray

    from distmerge.engine.driver import Driver
    from distmerge.engine.writer import writer_class
    started = time.perf_counter()
    workers = num_workers or default_num_workers()
    merge_config = _as_config(config, storage_options)
    dest = Destination(os.fspath(out_dir), merge_config.storage)
    writer_cls = writer_class(dest.url)
    recorded = dest.recorded_options() if not restart else {}  # a resume plans as the interrupted run did
    memory_per_worker = memory_per_worker or recorded.get("memory_per_worker")
    part_size = part_size or recorded.get("part_size") or DEFAULT_PART_SIZE
    if random_seed is None and merge_config.random_seed is None:
        random_seed = recorded.get("random_seed")
    merge_plan = plan(merge_config, shard_size=shard_size, memory_per_worker=memory_per_worker, num_workers=workers,
                      random_seed=random_seed)
    parts = parse_size(part_size) if dest.s3 else 0
    dest.check(overwrite, merge_plan, restart, parts)  # refusals come before Ray starts

    largest_output = max(u.out_bytes for u in merge_plan.units)
    max_in_flight_bytes = max(2 * workers * largest_output, 256 * 2**20)
    store = int(min(max(2 * max_in_flight_bytes, 512 * 2**20), 8 * 2**30))

    with ray_session(address, workers, store):
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)

        def start_writer(state: Any) -> Any:
            """A writer actor, constructed (so that a failing constructor fails here, with its error)."""
            actor = ray.remote(writer_cls).options(num_cpus=0, scheduling_strategy=here).remote(
                dest.url, merge_plan.layout, merge_plan.config.storage, parts, state)
            try:
                pids[actor] = ray.get(actor.process_id.remote())
            except ray.exceptions.RayActorError as err:
                reason = [line for line in str(err).splitlines() if line.strip()][-1].strip()  # not Ray's traceback
                raise MergeFailed(f"the writer actor could not start at {dest.url}: {reason}") from err
            return actor

        def restart_writer(dead: Any) -> Tuple[Any, Set[int]]:
            _stop_actor(dead, pids.get(dead))
            point = dest.resume_point(merge_plan, parts)
            if point is None:
                raise MergeFailed(f"the writer actor died and {dest.url} no longer holds its partial shards")
            return start_writer(point.writer_state), point.finished

        pids: Dict[Any, int] = {}
        driver = Driver(merge_plan, max_in_flight=2 * workers, max_in_flight_bytes=max_in_flight_bytes,
                        threads_per_worker=threads_per_worker, allow_nonfinite=allow_nonfinite,
                        restart_writer=restart_writer)
        if check_inputs and not allow_nonfinite:
            driver.check_inputs()  # NaN/Inf refused before the destination is touched
        resume = dest.prepare(overwrite, merge_plan, restart, parts)
        bar = _progress_bar(merge_plan, progress)
        try:
            if bar:
                driver.on_written = bar.unit_written
            driver.attach_writer(start_writer(resume.writer_state), resume.finished)
            stats, written = driver.run()
        except BaseException as err:
            # Interrupted (Ctrl-C, or SIGTERM, which Ray's driver turns into SystemExit): keep
            # what is durable, for a resume. Failed: stop the writer, then clean up.
            interrupted = isinstance(err, (KeyboardInterrupt, SystemExit))
            _stop_writer(driver.writer, pids.get(driver.writer), graceful=interrupted)
            driver.writer = None
            if not interrupted and not isinstance(err, WriterLost):
                dest.discard()
            raise
        finally:
            if bar:
                bar.close()
            if driver.writer is not None:
                _stop_writer(driver.writer, pids.get(driver.writer), graceful=False)
    commit_checkpoint(merge_plan, dest, written["checksums"], written["checksum_algorithm"])
    dest.finish()
    return MergeSummary(
        out_dir=dest.url,
        tensors=merge_plan.tensor_count,
        units=len(merge_plan.units),
        shards=len(merge_plan.layout.shards),
        read_bytes=stats.read_bytes,
        written_bytes=written["bytes_written"],
        seconds=time.perf_counter() - started,
        driver_peak_rss=peak_rss(),
        worker_peak_rss=max(stats.worker_peak_rss.values(), default=0),
        workers=len(stats.worker_peak_rss),
        writer_peak_rss=written["peak_rss"],
        reused_units=len(resume.finished),
        writer_restarts=driver.writer_restarts,
        recomputed_units=driver.recomputed,
        random_seed=merge_plan.seed if merge_config.method.uses_random else None,
    )


def _stop_actor(actor: Any, pid: Optional[int], timeout: float = 60.0) -> None:
    """Kill `actor` and wait until it is gone, so that nothing it still runs can touch the
    output while its replacement reads what is durable: until Ray reports it dead, and,
    when its process is on this machine, until that process has exited."""
    import ray

    try:
        ray.kill(actor, no_restart=True)
    except Exception:  # noqa: BLE001 - already gone
        pass
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            ray.get(actor.__ray_ready__.remote(), timeout=5)
        except ray.exceptions.ActorDiedError:
            break
        except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
            pass
        time.sleep(0.1)
    else:
        raise MergeFailed(f"the writer actor did not stop within {timeout:.0f} s; re-run the merge to resume it")
    while pid and _is_writer_process(pid) and time.monotonic() < deadline:
        time.sleep(0.05)


def _is_writer_process(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return b"Writer" in f.read()
    except OSError:
        return False


def _stop_writer(actor: Any, pid: Optional[int], graceful: bool) -> None:
    """Stop the writer at the end of a run: `graceful` lets it record what is durable first."""
    import ray

    if actor is None:
        return
    try:
        if graceful:
            ray.get(actor.interrupted.remote(), timeout=120)
        _stop_actor(actor, pid)
    except Exception:  # noqa: BLE001 - a dead or unreachable writer: the original error matters more
        pass


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


def _progress_bar(merge_plan: MergePlan, enabled: bool) -> Optional[_ProgressBar]:
    return _ProgressBar(merge_plan) if enabled else None
