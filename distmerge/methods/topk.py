"""Exact order statistics by magnitude without sorting, mergeable across pieces.

Non-negative IEEE floats order like their bit patterns read as integers, so |x| can be
ranked by `bits(x) & 0x7F..F`. The key at a given rank is found digit by digit, 16
bits a pass (radix select): each piece histograms the current digit of the keys that
still match the prefix chosen so far; histograms add up across pieces; the reduction
picks the digit holding the wanted rank. 16-bit floats need one pass, 32-bit two,
64-bit four.

A `Selection` keeps a window of positions [start, stop) in one of two orders, the
orders a *stable* sort gives (mergekit's sorts made stable):
- "desc": largest key first, equal keys by flat index (top-k: the window [0, k));
- "asc": smallest key first, equal keys by flat index (breadcrumbs: drop the smallest
  and the largest, keep what lies between).
Each end of the window is a `Boundary`: the key of the element at that position and
its ordinal among the elements with that key (the ties, in flat-index order). Each
piece learns how many of those ties lie in the pieces before it from the last pass's
histograms, so it can tell on its own which of its ties fall inside the window.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

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
FLOAT_OF_BITS = {16: torch.float16, 32: torch.float32, 64: torch.float64}


def key_bits(dtype: torch.dtype) -> int:
    return torch.finfo(dtype).bits


def magnitude_keys(x: torch.Tensor) -> torch.Tensor:
    """Integer keys that order like |x| (for non-NaN x)."""
    int_dtype, mask = _KEY_INT[x.dtype]
    return x.contiguous().view(int_dtype) & mask


def keys_of(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Magnitude keys of `x` at `bits` wide (widening x first when the group's keys are wider)."""
    if key_bits(x.dtype) != bits:
        x = x.to(FLOAT_OF_BITS[bits])
    return magnitude_keys(x)


@dataclass(frozen=True)
class Boundary:
    """One end of a window: the element at one position of the order.

    While passes remain, `prefix` holds the key's digits chosen so far and `remaining`
    the element's rank, counted from the largest key (1-based), among keys with that
    prefix. Once found, `prefix` is the whole key, `ordinal` the element's place among
    the ties (0-based, flat-index order over the group) and `offset` how many of those
    ties lie in the pieces before this one.
    """

    remaining: int
    prefix: int = 0
    ordinal: int = -1
    offset: int = 0
    count: int = -1  # how many of the ties lie in this piece (-1: not known)


@dataclass(frozen=True)
class Selection:
    """The entries one input keeps over one reduction group (see the module docstring)."""

    bits: int
    order: str = "desc"  # "desc" or "asc"
    first: Optional[Boundary] = None  # None: the window starts at the first position
    last: Optional[Boundary] = None  # None: the window runs to the last position
    keeps: str = "window"  # "window", "all" or "none"

    @property
    def searching(self) -> bool:
        return self.keeps == "window"

    def boundaries(self) -> Dict[str, Boundary]:
        return {name: b for name, b in (("first", self.first), ("last", self.last)) if b is not None}


def top_k(bits: int, numel: int, k: int) -> Selection:
    """The k largest magnitudes, equal ones lowest flat index first (a stable descending sort)."""
    if k <= 0:
        return Selection(bits, keeps="none")
    if k >= numel:
        return Selection(bits, keeps="all")
    return Selection(bits, "desc", last=Boundary(k))


def ascending_window(bits: int, numel: int, start: int, stop: int) -> Selection:
    """Positions [start, stop) of a stable ascending sort of the magnitudes."""
    start, stop = max(0, start), min(numel, stop)
    if start >= stop:
        return Selection(bits, keeps="none")
    if start == 0 and stop == numel:
        return Selection(bits, keeps="all")
    first = Boundary(numel - start) if start > 0 else None
    last = Boundary(numel - (stop - 1)) if stop < numel else None
    return Selection(bits, "asc", first=first, last=last)


def digit_histogram(keys: torch.Tensor, bits: int, pass_index: int, prefix: int) -> np.ndarray:
    """Histogram of digit `pass_index` among keys whose higher digits equal `prefix`."""
    shift = bits - DIGIT_BITS * (pass_index + 1)
    flat = keys.reshape(-1)
    if pass_index > 0:  # (masked: a 64-bit order key's top bit reads as a sign)
        flat = flat[((flat >> (shift + DIGIT_BITS)) & ((1 << (bits - shift - DIGIT_BITS)) - 1)) == prefix]
    digits = flat >> shift if shift else flat
    if bits > DIGIT_BITS:
        digits = digits & (BINS - 1)
    array = digits.numpy()
    if array.dtype == np.int16:
        array = array.view(np.uint16)
    return np.bincount(array, minlength=BINS).astype(np.int64, copy=False)


def histograms(keys: torch.Tensor, selection: Selection, pass_index: int) -> Dict[str, np.ndarray]:
    """One piece's partial for a search pass: a histogram per boundary (shared when prefixes agree)."""
    out: Dict[str, np.ndarray] = {}
    by_prefix: Dict[int, np.ndarray] = {}
    for name, boundary in selection.boundaries().items():
        if boundary.prefix not in by_prefix:
            by_prefix[boundary.prefix] = digit_histogram(keys, selection.bits, pass_index, boundary.prefix)
        out[name] = by_prefix[boundary.prefix]
    return out


def choose_digit(histogram: np.ndarray, remaining: int) -> Tuple[int, int]:
    """The digit holding the `remaining`-th largest entry, and its rank within that digit."""
    from_top = np.cumsum(histogram[::-1])
    j = int(np.searchsorted(from_top, remaining))
    digit = BINS - 1 - j
    above = int(from_top[j]) - int(histogram[digit])
    return digit, remaining - above


def passes_for(bits: int) -> int:
    return bits // DIGIT_BITS


def reduce_pass(pass_index: int, selections: Sequence[Selection],
                partials: Sequence[Dict[str, np.ndarray]]) -> List[Selection]:
    """Combine one pass's per-piece histograms (in tie order); return each piece's next selection."""
    first = selections[0]
    if not first.searching:
        return list(selections)
    last_pass = DIGIT_BITS * (pass_index + 1) >= first.bits
    per_piece: List[Dict[str, Boundary]] = [{} for _ in selections]
    for name, boundary in first.boundaries().items():
        hists = [p[name] for p in partials]
        total = hists[0].astype(np.int64)
        for hist in hists[1:]:
            total += hist
        digit, within = choose_digit(total, boundary.remaining)
        prefix = (boundary.prefix << DIGIT_BITS) | digit
        if not last_pass:
            for row in per_piece:
                row[name] = Boundary(within, prefix)
            continue
        ties = int(total[digit])
        ordinal = within - 1 if first.order == "desc" else ties - within
        before = 0
        for row, hist in zip(per_piece, hists):
            row[name] = Boundary(within, prefix, ordinal, before, int(hist[digit]))
            before += int(hist[digit])
    return [replace(s, **row) for s, row in zip(selections, per_piece)]


def reduce_pass_each(pass_index: int, selections: Sequence[Sequence[Optional[Selection]]],
                     partials: Sequence[Sequence[Any]]) -> List[Tuple[Optional[Selection], ...]]:
    """`reduce_pass` for pieces that each carry several selections (one per model or order
    statistic), `selections[piece][i]` with `partials[piece][i]`; None stays None."""
    columns = []
    for i, state in enumerate(selections[0]):
        column = [row[i] for row in selections]
        if state is not None and state.searching:
            column = reduce_pass(pass_index, column, [p[i] for p in partials])
        columns.append(column)
    return [tuple(column[piece] for column in columns) for piece in range(len(selections))]


def split_boundaries(selection: Selection, part_ties: Callable[[int, int], int], parts: int) -> List[Selection]:
    """The selection of each of `parts` consecutive row ranges of one piece, given the
    piece's final `selection` and how many of each part's keys equal a key
    (`part_ties(j, key)`, asked for only when needed). A boundary whose ties this piece
    keeps all or none of holds for every part as it is; the piece holding the boundary
    counts its ties part by part."""
    if selection.keeps != "window":
        return [selection] * parts
    per_part: List[Dict[str, Boundary]] = [{} for _ in range(parts)]
    for name, b in selection.boundaries().items():
        local = b.ordinal - b.offset  # this piece's ties before the boundary element
        kept = local + 1 if name == "last" else b.count - local  # ties this piece keeps
        if b.count < 0 or 0 < kept < b.count:
            before = b.offset
            for j in range(parts):
                here = part_ties(j, b.prefix)
                per_part[j][name] = replace(b, offset=before, count=here)
                before += here
        else:
            for row in per_part:
                row[name] = b
    return [replace(selection, **row) for row in per_part]


def _tie_positions(keys: torch.Tensor, key: int) -> torch.Tensor:
    return torch.nonzero((keys == key).reshape(-1)).reshape(-1)


def kept_mask(keys: torch.Tensor, selection: Selection) -> torch.Tensor:
    """Boolean mask (keys' shape) of the entries this piece keeps."""
    if selection.keeps != "window":
        return torch.full(keys.shape, selection.keeps == "all", dtype=torch.bool)
    mask: Optional[torch.Tensor] = None
    for name, b in selection.boundaries().items():
        inside_is_smaller = (selection.order == "desc") == (name == "first")
        side = keys < b.prefix if inside_is_smaller else keys > b.prefix
        ties = _tie_positions(keys, b.prefix)
        local = b.ordinal - b.offset
        chosen = ties[max(0, local):] if name == "first" else ties[:max(0, local + 1)]
        side.reshape(-1)[chosen] = True
        mask = side if mask is None else mask & side
    assert mask is not None
    return mask


def keep_threshold(selection: Selection) -> Optional[Tuple[int, int]]:
    """A top-k selection as (threshold, tie quota): this piece keeps the keys above the
    threshold, and when the quota is >= 0 only the first `quota` (in flat order) of those
    equal to threshold + 1, the boundary key (quota -1: all of them). A selection that
    keeps everything gives (-1, -1), one that keeps nothing (the largest key of its
    width, -1). None for any other selection (windows from below, breadcrumbs)."""
    if selection.keeps != "window":
        return (-1 if selection.keeps == "all" else (1 << (selection.bits - 1)) - 1), -1
    if selection.order != "desc" or selection.first is not None:
        return None
    last = selection.last
    quota = last.ordinal - last.offset + 1  # how many of this piece's ties are kept
    if 0 <= last.count <= quota:
        return last.prefix - 1, -1
    if quota <= 0:
        return last.prefix, -1
    return last.prefix - 1, quota


def keep_bits(keys: torch.Tensor, selection: Selection) -> torch.Tensor:
    """An integer mask (same width as the keys): all ones where kept, only the sign bit elsewhere.

    `delta_bits & keep_bits` is bit-for-bit `delta * mask` for a 0/1 float mask (a dropped
    entry becomes a zero with the delta's sign), at the cost of integer ops.
    """
    sign_bit = torch.iinfo(keys.dtype).min
    rule = keep_threshold(selection) if selection.keeps == "window" else None
    if rule is not None:
        threshold, quota = rule
        mask = torch.sub(threshold, keys)  # negative exactly where key > threshold
        mask >>= keys.element_size() * 8 - 1  # -1 where kept, 0 elsewhere
        mask |= sign_bit
        if quota >= 0:
            mask.reshape(-1)[_tie_positions(keys, threshold + 1)[quota:]] = sign_bit
        return mask
    kept = kept_mask(keys, selection).to(keys.dtype)
    kept.neg_()  # -1 where kept, 0 elsewhere
    kept |= sign_bit
    return kept


_ORDER_INT = {16: (torch.int16, torch.int32, 0xFFFF), 32: (torch.int32, torch.int64, 0xFFFFFFFF)}


def order_keys(x: torch.Tensor) -> torch.Tensor:
    """Integer keys that order like the values of x (not their magnitudes): negative values
    below positive ones. 16- and 32-bit keys are held in the next wider integer type, so
    they are non-negative; 64-bit ones are int64 bit patterns read as unsigned by the digit
    passes (which mask what they shift)."""
    bits = key_bits(x.dtype)
    if bits == 64:
        raw = x.contiguous().view(torch.int64)
        return torch.where(raw < 0, ~raw, raw ^ torch.iinfo(torch.int64).min)
    narrow, wide, full = _ORDER_INT[bits]
    raw = x.contiguous().view(narrow).to(wide) & full
    sign = 1 << (bits - 1)
    return torch.where(raw >= sign, full - raw, raw | sign)


def value_of_order_key(key: int, dtype: torch.dtype) -> torch.Tensor:
    """The float (a 0-d tensor of `dtype`) whose order key is `key`."""
    bits = key_bits(dtype)
    narrow, _, full = _ORDER_INT.get(bits, (torch.int64, None, (1 << 64) - 1))
    sign = 1 << (bits - 1)
    raw = key - sign if key >= sign else full - key
    if raw >= sign:  # back to the signed integer the float's bits read as
        raw -= 1 << bits
    return torch.tensor([raw], dtype=narrow).view(dtype)[0]
