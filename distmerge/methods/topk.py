"""Exact top-k by magnitude without sorting, mergeable across pieces.

Non-negative IEEE floats order like their bit patterns read as integers, so |x| can be
ranked by `bits(x) & 0x7F..F`. The k-th largest key is found digit by digit, 16 bits a
pass (radix select): each piece histograms the current digit of the keys that still
match the prefix chosen so far; histograms add up across pieces; the reduction picks
the digit holding the k-th largest. 16-bit floats need one pass, 32-bit two, 64-bit
four. Entries equal to the final threshold (ties) are kept lowest flat index first:
each piece learns how many of its own ties it keeps from the tie counts of the pieces
before it, which the last pass's histograms already hold.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence

import numpy as np
import torch

DIGIT_BITS = 16
BINS = 1 << DIGIT_BITS

_KEY_INT = {
    torch.float16: (torch.int16, 0x7FFF),
    torch.bfloat16: (torch.int16, 0x7FFF),
    torch.float32: (torch.int32, 0x7FFFFFFF),
    torch.float64: (torch.int64, 0x7FFFFFFFFFFFFFFF),
}


def key_bits(dtype: torch.dtype) -> int:
    return torch.finfo(dtype).bits


def magnitude_keys(x: torch.Tensor) -> torch.Tensor:
    """Integer keys that order like |x| (for non-NaN x)."""
    int_dtype, mask = _KEY_INT[x.dtype]
    return x.contiguous().view(int_dtype) & mask


@dataclass(frozen=True)
class Selection:
    """Selection state for one input model over one reduction group.

    While passes remain: `prefix` holds the digits chosen so far and `remaining` how
    many entries to keep among keys with that prefix. After the last pass `prefix` is
    the full threshold key and `quota` how many ties at the threshold this piece keeps.
    """

    bits: int
    prefix: int
    remaining: int
    quota: Optional[int] = None


def digit_histogram(keys: torch.Tensor, bits: int, pass_index: int, prefix: int) -> np.ndarray:
    """Histogram of digit `pass_index` among keys whose higher digits equal `prefix`."""
    shift = bits - DIGIT_BITS * (pass_index + 1)
    flat = keys.reshape(-1)
    if pass_index > 0:
        flat = flat[(flat >> (shift + DIGIT_BITS)) == prefix]
    digits = flat >> shift if shift else flat
    if bits > DIGIT_BITS:
        digits = digits & (BINS - 1)
    array = digits.numpy()
    if array.dtype == np.int16:
        array = array.view(np.uint16)
    return np.bincount(array, minlength=BINS).astype(np.int64, copy=False)


def choose_digit(histogram: np.ndarray, remaining: int) -> tuple:
    """The digit holding the `remaining`-th largest entry, and how many to keep within it."""
    from_top = np.cumsum(histogram[::-1])
    j = int(np.searchsorted(from_top, remaining))
    digit = BINS - 1 - j
    above = int(from_top[j]) - int(histogram[digit])
    return digit, remaining - above


def reduce_pass(pass_index: int, states: Sequence[Selection], histograms: Sequence[np.ndarray]) -> List[Selection]:
    """Combine one pass's per-piece histograms; return each piece's next state."""
    first = states[0]
    total = np.sum(np.stack(histograms), axis=0)
    digit, remaining = choose_digit(total, first.remaining)
    prefix = (first.prefix << DIGIT_BITS) | digit
    last = DIGIT_BITS * (pass_index + 1) >= first.bits
    if not last:
        return [Selection(first.bits, prefix, remaining) for _ in states]
    out = []
    before = 0
    for hist in histograms:
        ties_here = int(hist[digit])
        quota = min(ties_here, max(0, remaining - before))
        before += ties_here
        out.append(Selection(first.bits, prefix, remaining, quota))
    return out


def keep_bits(keys: torch.Tensor, selection: Selection) -> torch.Tensor:
    """An integer mask (same width as the keys): all ones where kept, only the sign bit elsewhere.

    `delta_bits & keep_bits` is bit-for-bit `delta * mask` for a 0/1 float mask (a dropped
    entry becomes a zero with the delta's sign), at the cost of integer ops.
    """
    sign_bit = torch.iinfo(keys.dtype).min
    mask = torch.sub(selection.prefix, keys)  # negative exactly where key > threshold
    mask >>= keys.element_size() * 8 - 1  # -1 where kept, 0 elsewhere
    mask |= sign_bit
    if selection.quota:
        ties = torch.nonzero((keys == selection.prefix).reshape(-1)).reshape(-1)[: selection.quota]
        mask.reshape(-1)[ties] = -1
    return mask


def kept_mask(keys: torch.Tensor, selection: Selection) -> torch.Tensor:
    """Boolean mask of the entries this piece keeps."""
    return keep_bits(keys, selection) == -1


def passes_for(bits: int) -> int:
    return bits // DIGIT_BITS
