"""Fused bfloat16 kernels for the task-vector methods (C, `_fused.c`), with their contract.

The torch path of a TIES merge makes some thirty passes over each piece (a delta per
model, its keys, a histogram, keep bits, weights, a vote, the agreement, two sums, a
division, the base added back), each a kernel launch with temporaries. These kernels do
the same work in two passes, the selection histogram and the merge, and give the torch
path's results bit for bit (tests/test_fused.py checks them against it on hostile data).

They are used when every input of a piece is bfloat16 and contiguous, at most
MAX_MODELS models are merged, and the method's options fit (`TaskVectorMerge` decides);
otherwise, or when the extension was not built (no C compiler at install time), or with
DISTMERGE_FUSED=0 in the environment, the torch path runs.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Iterator, Optional, Sequence, Union

import numpy as np
import torch

try:
    from distmerge.methods import _fused
except ImportError:  # built without a C compiler
    _fused = None

MAX_MODELS = _fused.MAX_MODELS if _fused is not None else 0
KEEP_ALL = -1  # a threshold below every key
KEEP_NONE = 0x7FFF  # a threshold no key exceeds

_enabled = _fused is not None and os.environ.get("DISTMERGE_FUSED", "1") != "0"

# A model's keep rule: entries whose magnitude key exceeds this threshold are kept, or an
# int16 keep-bits tensor (all ones kept, only the sign bit dropped: see signs.keep_bits_of).
Keep = Union[int, torch.Tensor]


def built() -> bool:
    """Whether the C extension was built and imports."""
    return _fused is not None


def usable(*tensors: Optional[torch.Tensor]) -> bool:
    """Whether the kernels may run over these tensors (bf16, contiguous, enabled)."""
    return _enabled and all(t is not None and t.dtype == torch.bfloat16 and t.is_contiguous() for t in tensors)


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


def delta_histogram(base: torch.Tensor, model: torch.Tensor) -> np.ndarray:
    """The 65,536-bin histogram of the magnitude keys (`topk.magnitude_keys`) of the
    bfloat16 task vector `model - base`: `topk.digit_histogram` of those keys, one pass."""
    hist = np.zeros(1 << 16, dtype=np.int64)
    _fused.delta_histogram(_buffer(base), _buffer(model), hist)
    return hist


def merge(base: torch.Tensor, models: Sequence[torch.Tensor], keeps: Sequence[Keep], weights: torch.Tensor, *,
          consensus: bool, normalize: bool, divisor: float, scale: Optional[float]) -> torch.Tensor:
    """`TaskVectorMerge.apply`'s torch path without rescale, in one pass (bfloat16):

        d_i = kept(m_i - base)       keeps[i]: a key threshold or keep bits
        W_i = d_i * weights[i]
        consensus: elected = sign(sum W_i); mixed = sum of agreeing W_i;
                   div = sum of agreeing weights (0 -> 1)
        else:      mixed = sum W_i; div = divisor
        normalize: mixed /= div;  scale: mixed *= scale (as a float32 scalar)
        out = base + mixed
    """
    thresholds = [k if isinstance(k, int) else KEEP_ALL for k in keeps]
    masks = [None if isinstance(k, int) else _buffer(k.contiguous()) for k in keeps]
    out = torch.empty_like(base)
    _fused.merge(_buffer(base), [_buffer(m) for m in models], thresholds, masks, _buffer(weights), _buffer(out),
                 consensus, normalize, float(divisor), scale)
    return out
