"""The public entry points: plan a merge, and run one (a `MergeJob` driven start to end)."""

from __future__ import annotations

import os
from typing import Any, Mapping, Optional, Union

from distmerge.config import MergeConfig
from distmerge.job import MergeJob, MergeOptions, MergeSummary, as_config, build_plan
from distmerge.planner import DEFAULT_SHARD_SIZE, MergePlan

__all__ = ["plan", "merge", "MergeSummary", "MergeOptions", "MergeJob"]


def plan(config: Union[str, os.PathLike, MergeConfig], *, shard_size: Union[int, str] = DEFAULT_SHARD_SIZE,
         memory_per_worker: Union[int, str, None] = None, num_workers: Optional[int] = None,
         storage_options: Optional[Mapping[str, Any]] = None, random_seed: Optional[int] = None) -> MergePlan:
    """Validate the config and inputs and build the merge plan, reading headers only.

    `storage_options` are fsspec options for remote URLs (endpoint_url, profile, anon, ...),
    over the config's `storage:` section. `random_seed` (over the config's `random_seed`)
    seeds random methods; without either, a fresh seed is drawn for them.
    """
    return build_plan(as_config(config, storage_options), shard_size=shard_size,
                      memory_per_worker=memory_per_worker, num_workers=num_workers, random_seed=random_seed)


def merge(config: Union[str, os.PathLike, MergeConfig], out_dir: Union[str, os.PathLike], *,
          address: Optional[str] = None, num_workers: Optional[int] = None,
          shard_size: Union[int, str] = DEFAULT_SHARD_SIZE, memory_per_worker: Union[int, str, None] = None,
          overwrite: bool = False, progress: bool = False, threads_per_worker: int = 1,
          storage_options: Optional[Mapping[str, Any]] = None,
          part_size: Union[int, str, None] = None, allow_nonfinite: bool = False,
          restart: bool = False, check_inputs: bool = False, random_seed: Optional[int] = None) -> MergeSummary:
    """Merge the models of a mergekit-style config into a sharded safetensors checkpoint.

    Without `address` a local Ray is started on 127.0.0.1 (and stopped afterwards), even
    where another Ray runs on this machine; with `address="auto"` or `"ray://host:10001"`
    the merge runs on that cluster. Everything is validated before any tensor data is
    read; on failure nothing that looks like a finished checkpoint is left at `out_dir`.
    Inputs and `out_dir` may be local paths or fsspec URLs (s3://bucket/prefix);
    `part_size` is the multipart part size for S3 output (default 16 MiB, or what the
    interrupted run being resumed used). The merge holds the output's lock throughout: a
    second merge into the same output is refused, naming the holder.
    NaN/Inf in an input fails the merge naming the tensor, unless `allow_nonfinite`; it is
    found as each unit reads its inputs, or, with `check_inputs`, by one extra read of
    every input before the destination is touched.
    Re-running an interrupted merge resumes it (units already written are reused; a
    dead writer actor is replaced the same way mid-run); `restart` discards an
    interrupted merge instead. Running out of space keeps the merge resumable likewise.
    Random methods draw from a generator keyed by `random_seed` (over the config's
    `random_seed`; default: the interrupted merge's seed when resuming, else a fresh one,
    reported in the summary and the model card).
    """
    options = MergeOptions(address=address, num_workers=num_workers, shard_size=shard_size,
                           memory_per_worker=memory_per_worker, overwrite=overwrite, progress=progress,
                           threads_per_worker=threads_per_worker, storage_options=storage_options,
                           part_size=part_size, allow_nonfinite=allow_nonfinite, restart=restart,
                           check_inputs=check_inputs, random_seed=random_seed)
    return MergeJob(config, out_dir, options).execute()
