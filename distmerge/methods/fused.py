"""Fused 16-bit float kernels for the task-vector methods (C, `_fused.c`), with their contract.

The torch path of a TIES merge makes some thirty passes over each piece (a delta per
model, its keys, a histogram, keep bits, weights, a vote, the agreement, two sums, a
division, the base added back), each a kernel launch with temporaries. These kernels do
the same work in two passes, the selection histogram and the merge, and give the torch
path's results bit for bit (tests/test_fused.py checks them against it on hostile data).

They are used when every input of a piece is bfloat16 (or every one float16) and
contiguous, at most MAX_MODELS models are merged, and the method's options fit
(`TaskVectorMerge` decides); otherwise, or when the extension was not built (no C
compiler at install time), or with DISTMERGE_FUSED=0 in the environment, the torch path
runs.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Optional, Sequence

import numpy as np
import torch

try:
    from distmerge.methods import _fused
except ImportError:  # built without a C compiler
    _fused = None

MAX_MODELS = _fused.MAX_MODELS if _fused is not None else 0
# The kernels' code for each 16-bit float type built in (float16 needs the compiler's _Float16).
_HALF = {torch.bfloat16: 0, **({torch.float16: 1} if _fused is not None and _fused.HAVE_FLOAT16 else {})}
KEEP_ALL = -1  # a threshold below every key

_enabled = _fused is not None and os.environ.get("DISTMERGE_FUSED", "1") != "0"


@dataclass(frozen=True)
class KeepRule:
    """Which entries of one model's task vector a piece keeps: those whose magnitude key
    exceeds `threshold`, and when `tie_quota` >= 0 only the first `tie_quota` (in flat
    order) of those whose key is threshold + 1; or, given `bits`, where an int16
    keep-bits tensor says so (all ones kept, only the sign bit dropped)."""

    threshold: int = KEEP_ALL
    tie_quota: int = -1
    bits: Optional[torch.Tensor] = None


def built() -> bool:
    """Whether the C extension was built and imports."""
    return _fused is not None


def usable(*tensors: Optional[torch.Tensor]) -> bool:
    """Whether the kernels may run over these tensors (contiguous, all bfloat16 or all
    float16, and the kernels enabled)."""
    if not _enabled or tensors[0] is None or tensors[0].dtype not in _HALF:
        return False
    dtype = tensors[0].dtype
    return all(t is not None and t.dtype == dtype and t.is_contiguous() for t in tensors)


@contextmanager
def disabled() -> Iterator[None]:
    """Run the torch path within (tests and benchmarks compare the two)."""
    global _enabled
    was, _enabled = _enabled, False
    try:
        yield
    finally:
        _enabled = was


def _buffer(t: torch.Tensor) -> np.ndarray:
    return t.reshape(-1).view(torch.int16).numpy()


HISTOGRAM_SPAN = 1 << 31  # elements per kernel call (its counts are uint32)


def delta_histogram(base: torch.Tensor, model: torch.Tensor) -> np.ndarray:
    """The 65,536-bin histogram of the magnitude keys (`topk.magnitude_keys`) of the
    16-bit task vector `model - base`: `topk.digit_histogram` of those keys, one pass
    (uint32 counts, int64 for a piece of 2^32 elements or more)."""
    flat_base, flat_model = base.reshape(-1), model.reshape(-1)
    total = None
    for start in range(0, max(1, flat_base.numel()), HISTOGRAM_SPAN):
        hist = np.zeros(1 << 16, dtype=np.uint32)
        end = start + HISTOGRAM_SPAN
        _fused.delta_histogram(_HALF[base.dtype], _buffer(flat_base[start:end]), _buffer(flat_model[start:end]),
                               hist)
        total = hist if total is None else total.astype(np.int64) + hist
    return total


def delta_key_count(base: torch.Tensor, model: torch.Tensor, key: int) -> int:
    """How many magnitude keys of the 16-bit task vector `model - base` equal `key`."""
    return _fused.delta_key_count(_HALF[base.dtype], _buffer(base), _buffer(model), key)


_EXPONENT_BITS = {torch.bfloat16: 0x7F80, torch.float16: 0x7C00}


def first_nonfinite(values: torch.Tensor) -> Optional[int]:
    """The flat index of the first Inf or NaN in a tensor `scans_finite` accepts (a
    contiguous 16-bit float tensor), None if there is none: an integer scan of the
    exponent bits, several times cheaper than torch's isfinite or a sum."""
    index = _fused.first_nonfinite(_buffer(values), _EXPONENT_BITS[values.dtype])
    return None if index == values.numel() else index


def scans_finite(values: torch.Tensor) -> bool:
    """Whether `first_nonfinite` can scan this tensor."""
    return built() and values.dtype in _EXPONENT_BITS and values.is_contiguous()


def merge(base: torch.Tensor, models: Sequence[torch.Tensor], keeps: Sequence[KeepRule], weights: torch.Tensor, *,
          consensus: bool, normalize: bool, divisor: float, scale: Optional[float]) -> torch.Tensor:
    """`TaskVectorMerge.apply`'s torch path without rescale, in one pass (16-bit floats;
    `weights` in the inputs' dtype):

        d_i = kept(m_i - base)       keeps[i]: which entries model i keeps
        W_i = d_i * weights[i]
        consensus: elected = sign(sum W_i); mixed = sum of agreeing W_i;
                   div = sum of agreeing weights (0 -> 1)
        else:      mixed = sum W_i; div = divisor
        normalize: mixed /= div;  scale: mixed *= scale (as a float32 scalar)
        out = base + mixed
    """
    masks = [None if k.bits is None else _buffer(k.bits.contiguous()) for k in keeps]
    out = torch.empty_like(base)
    _fused.merge(_HALF[base.dtype], _buffer(base), [_buffer(m) for m in models], [k.threshold for k in keeps],
                 [k.tie_quota if k.bits is None else -1 for k in keeps], masks, _buffer(weights), _buffer(out),
                 consensus, normalize, float(divisor), scale)
    return out
