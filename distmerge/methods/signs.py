"""TIES's sign agreement as integer bit operations on float tensors.

mergekit computes `mask = sign(W).to(int8) == elected`, then `(W * mask).sum(0)` and
`(weights * mask).sum(0)`; the conversions and bool promotions dominate its run time.
The same values come out of a few integer ops on the float bit patterns: the sign bit
says the sign, the magnitude bits say zero or not, and `W_bits & (mask | sign_bit)` is
`W * mask` exactly (a dropped entry becomes a zero carrying W's sign, as W * 0 does).
Finite inputs are assumed (non-finite ones are rejected before merging).
"""

from __future__ import annotations

import torch

INT_OF = {2: torch.int16, 4: torch.int32, 8: torch.int64}
ONE_BITS = {
    torch.bfloat16: 0x3F80, torch.float16: 0x3C00, torch.float32: 0x3F800000, torch.float64: 0x3FF0000000000000,
}


def as_int(x: torch.Tensor) -> torch.Tensor:
    return x.view(INT_OF[x.element_size()])


def agreement(signs_of: torch.Tensor, vote: torch.Tensor) -> torch.Tensor:
    """-1 (all bits set) where signs_of[i] is non-zero and has the elected sign, else 0.

    `signs_of` is stacked (n, ...) floats; the elected sign is +1 where vote >= 0, else -1.
    """
    bits = as_int(signs_of)
    width = bits.element_size() * 8
    elected_negative = (vote >= 0).to(bits.dtype)
    elected_negative -= 1  # 0 where elected +1, -1 where elected -1
    agree = bits >> (width - 1)  # -1 where negative, 0 where non-negative
    agree ^= elected_negative
    agree.bitwise_not_()  # -1 where the signs match
    nonzero = bits & torch.iinfo(bits.dtype).max
    nonzero += torch.iinfo(bits.dtype).max  # wraps negative for any non-zero magnitude
    nonzero >>= width - 1
    agree &= nonzero
    return agree


# Up to this many models torch sums dim 0 of a contiguous tensor in model order from +0
# (beyond, in a tree of partial sums; sum_models then follows torch).
SEQUENTIAL_SUM_MAX = 16


def sum_models(stacked: torch.Tensor) -> torch.Tensor:
    """`stacked.sum(dim=0)` as mergekit computes it over a whole tensor: for 16-bit floats
    of up to SEQUENTIAL_SUM_MAX models, in float32 from +0 in model order, rounded once.

    That is torch's order for every element but a tensor's last few: past its last full
    block of vector lanes (32 or 64 elements, by the CPU's vector width) torch interleaves
    four partial sums, so with five or more models those elements' sums depend on the
    CPU and on where a tensor is cut. Here every element sums in model order, so any cut
    gives the same bits (and the fused kernel sums so too)."""
    if stacked.dtype in (torch.bfloat16, torch.float16) and stacked.shape[0] <= SEQUENTIAL_SUM_MAX:
        total = torch.zeros(stacked.shape[1:], dtype=torch.float32)
        for model in stacked:
            total += model
        return total.to(stacked.dtype)
    return stacked.sum(dim=0)


def masked(values: torch.Tensor, agree: torch.Tensor) -> torch.Tensor:
    """values * mask, bit for bit, for the 0/-1 integer mask `agree`."""
    keep = agree | torch.iinfo(agree.dtype).min
    keep &= as_int(values)
    return keep.view(values.dtype)


def as_float_mask(agree: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The 0/-1 integer mask as 0.0/1.0 floats of `dtype` (same width)."""
    return (agree & ONE_BITS[dtype]).view(dtype)


def zeros_to_one(x: torch.Tensor) -> None:
    """`x[x == 0] = 1` in place (either zero), as a few integer ops on the bit patterns."""
    bits = as_int(x)
    zero = bits & torch.iinfo(bits.dtype).max
    zero -= 1
    zero >>= bits.element_size() * 8 - 1  # -1 where the magnitude is zero, else 0
    swap = bits ^ ONE_BITS[x.dtype]
    swap &= zero
    bits ^= swap


def keep_bits_of(kept: torch.Tensor, int_dtype: torch.dtype) -> torch.Tensor:
    """A boolean keep mask as integer keep bits of `int_dtype`: all ones where kept, only the
    sign bit elsewhere (so `bits & keep` is `x * mask` bit for bit)."""
    bits = kept.to(int_dtype)
    bits.neg_()  # -1 where kept, 0 elsewhere
    bits |= torch.iinfo(int_dtype).min
    return bits

