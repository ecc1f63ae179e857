"""What a worker does with one work unit. Stateless and Ray-free: the driver wraps it.

For each piece: map its input rows, cast them to the compute dtype, and run the
method's protocol step (a statistics pass, or apply). Pieces of single-piece reduction
groups run the whole protocol here, so the common case reads its inputs once.
"""

from __future__ import annotations

import os
import resource
import time
from dataclasses import dataclass
from typing import Any, List, Optional, Sequence, Tuple

import numpy as np
import torch

from distmerge.io.reader import map_range
from distmerge.methods import get_method
from distmerge.methods.base import PieceInputs, StatisticsPlan
from distmerge.plan import Piece, WorkUnit

LOCAL = "local"  # carry marker: run this piece's statistics passes in the worker


@dataclass(frozen=True)
class WorkerStats:
    pid: int
    read_bytes: int
    seconds: float
    peak_rss: int


def _load(piece: Piece, uses_base: bool) -> PieceInputs:
    meta = piece.meta
    rows = meta.row_end - meta.row_start
    shape = (rows, *meta.shape[1:]) if meta.shape else ()
    tensors = [map_range(s.path, s.start, s.end, s.dtype, shape).to(meta.dtype) for s in piece.sources]
    if uses_base:
        return PieceInputs(meta, tensors[0], tuple(tensors[1:]))
    return PieceInputs(meta, None, tuple(tensors))


def _stats(started: float, read_bytes: int) -> WorkerStats:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return WorkerStats(os.getpid(), read_bytes, time.perf_counter() - started, peak)


def collect_unit(unit: WorkUnit, method_name: str, pass_index: int, carries: Sequence[Any],
                 threads: int = 1) -> Tuple[List[Any], WorkerStats]:
    """Statistics pass `pass_index` over the pieces of `unit` whose carry is not None."""
    torch.set_num_threads(threads)
    started = time.perf_counter()
    method = get_method(method_name)
    partials: List[Any] = []
    read = 0
    for piece, carry in zip(unit.pieces, carries):
        if carry is None:
            partials.append(None)
            continue
        inputs = _load(piece, method.uses_base)
        read += sum(s.nbytes for s in piece.sources)
        partials.append(method.collect(pass_index, inputs, carry))
        del inputs
    return partials, _stats(started, read)


def apply_unit(unit: WorkUnit, method_name: str, carries: Sequence[Any],
               local_plans: Sequence[Optional[StatisticsPlan]], threads: int = 1) -> Tuple[WorkerStats, np.ndarray]:
    """Merge every piece of `unit`; return stats and the output bytes (pieces in order)."""
    torch.set_num_threads(threads)
    started = time.perf_counter()
    method = get_method(method_name)
    out = np.empty(unit.out_bytes, dtype=np.uint8)
    position = 0
    read = 0
    for piece, carry, local_plan in zip(unit.pieces, carries, local_plans):
        inputs = _load(piece, method.uses_base)
        read += sum(s.nbytes for s in piece.sources)
        if isinstance(carry, str) and carry == LOCAL:
            carry = local_plan.carries[0]
            for pass_index in range(local_plan.passes):
                partial = method.collect(pass_index, inputs, carry)
                (carry,) = method.reduce(pass_index, [piece.meta], [partial], [carry])
        result = method.apply(inputs, carry).to(piece.out_dtype).contiguous()
        del inputs
        nbytes = piece.out_nbytes
        if nbytes:
            out[position:position + nbytes] = result.reshape(-1).view(torch.uint8).numpy()
        position += nbytes
        del result
    return _stats(started, read), out
