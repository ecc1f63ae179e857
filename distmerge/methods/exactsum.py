"""Exact sums of |x| that add up across pieces in any grouping (for L1 rescaling).

A float is mantissa * 2^exponent. Summing the integer mantissas per exponent (in
chunks small enough for float64 bincount weights to stay exact) gives partial sums
that are plain integers: pieces' parts add exactly, and the total is rounded once at
the end. So the result does not depend on how a tensor is split, unlike a float sum.
"""

from __future__ import annotations

from fractions import Fraction
from typing import Dict, Sequence, Tuple

import numpy as np
import torch

from distmerge.methods.topk import magnitude_keys

MANTISSA_BITS = {torch.bfloat16: 7, torch.float16: 10, torch.float32: 23, torch.float64: 52}
CHUNK = 1 << 24  # elements per bincount: 2^24 * 2^27 < 2^53 keeps float64 weights exact
HALF = 26


def _mantissa_table(dtype: torch.dtype) -> np.ndarray:
    """For every 15-bit magnitude key of a 16-bit float: its integer mantissa (implicit bit included)."""
    if dtype not in _TABLES:
        mbits = MANTISSA_BITS[dtype]
        keys = np.arange(1 << 15, dtype=np.int64)
        exponent = keys >> mbits
        _TABLES[dtype] = (keys & ((1 << mbits) - 1)) | np.where(exponent > 0, 1 << mbits, 0)
    return _TABLES[dtype]


_TABLES: Dict[torch.dtype, np.ndarray] = {}


def _abs_sum_parts_16(x: torch.Tensor) -> Dict[int, int]:
    """16-bit floats: one histogram of the magnitude keys; mantissa times count, summed per
    exponent in int64 (exact: at most 2^11 per entry, far below 2^63 for any real tensor)."""
    mbits = MANTISSA_BITS[x.dtype]
    counts = np.bincount(magnitude_keys(x).reshape(-1).numpy().view(np.uint16), minlength=1 << 15)
    per_exponent = (counts.astype(np.int64) * _mantissa_table(x.dtype)).reshape(-1, 1 << mbits).sum(axis=1)
    return {int(e): int(per_exponent[e]) for e in np.nonzero(per_exponent)[0]}


def abs_sum_parts(x: torch.Tensor) -> Dict[int, int]:
    """{biased exponent: integer sum of mantissas} for |x| (x finite)."""
    if x.element_size() == 2:
        return _abs_sum_parts_16(x)
    info = torch.finfo(x.dtype)
    mbits = MANTISSA_BITS[x.dtype]
    keys = magnitude_keys(x).reshape(-1).to(torch.int64)
    buckets = 1 << (info.bits - 1 - mbits)
    parts: Dict[int, int] = {}
    for start in range(0, keys.numel(), CHUNK):
        k = keys[start:start + CHUNK]
        exponent = k >> mbits
        mantissa = (k & ((1 << mbits) - 1)) | torch.where(exponent > 0, 1 << mbits, 0)
        hi = torch.bincount(exponent, weights=(mantissa >> HALF).double(), minlength=buckets)
        lo = torch.bincount(exponent, weights=(mantissa & ((1 << HALF) - 1)).double(), minlength=buckets)
        for e in torch.nonzero(hi + lo).reshape(-1).tolist():
            parts[e] = parts.get(e, 0) + (int(hi[e].item()) << HALF) + int(lo[e].item())
    return parts


def add_parts(items: Sequence[Dict[int, int]]) -> Dict[int, int]:
    total: Dict[int, int] = {}
    for parts in items:
        for e, v in parts.items():
            total[e] = total.get(e, 0) + v
    return total


def value(parts: Dict[int, int], dtype: torch.dtype) -> Fraction:
    """The exact sum the parts stand for."""
    mbits = MANTISSA_BITS[dtype]
    bias = (1 << (torch.finfo(dtype).bits - 2 - mbits)) - 1
    return sum((Fraction(v) * Fraction(2) ** (max(e, 1) - bias - mbits) for e, v in parts.items()), Fraction(0))


def signed_sum_parts(x: torch.Tensor) -> Tuple[Dict[int, int], Dict[int, int]]:
    """Exact parts of the sum of x: (parts of its positive entries, parts of its negative ones)."""
    return abs_sum_parts(torch.clamp(x, min=0)), abs_sum_parts(torch.clamp(x, max=0))


def add_signed(items: Sequence[Tuple[Dict[int, int], Dict[int, int]]]) -> Tuple[Dict[int, int], Dict[int, int]]:
    return add_parts([p for p, _ in items]), add_parts([n for _, n in items])


def signed_value(parts: Tuple[Dict[int, int], Dict[int, int]], dtype: torch.dtype) -> Fraction:
    """The exact (signed) sum that signed parts stand for."""
    return value(parts[0], dtype) - value(parts[1], dtype)
