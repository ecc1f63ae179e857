"""A counter-based random generator: one uniform number per (seed, tensor, model, element).

mergekit draws DARE and DELLA masks from torch's global generator, so its output
depends on the order tensors happen to be processed in. Here every element's number is
a pure function of the merge seed, the tensor's name, the input model and the element's
flat index in the whole tensor: the same seed gives the same bits whatever the split
into row ranges, the worker count, the scheduling order, or a resume.

The stream of a (seed, tensor, model) is a 64-bit key from BLAKE2b; element i's number
is SplitMix64's finalizer applied to key + (i + 1) * golden-ratio increment (the
SplitMix64 sequence itself, entered at position i), and its top 53 bits make a float64
in [0, 1).
"""

from __future__ import annotations

import hashlib
import math

import numpy as np
import torch

GOLDEN = np.uint64(0x9E3779B97F4A7C15)
MIX1 = np.uint64(0xBF58476D1CE4E5B9)
MIX2 = np.uint64(0x94D049BB133111EB)
CHUNK = 1 << 15  # elements per block: the uint64 temporaries stay in the CPU caches


def stream_key(seed: int, tensor: str, model: int) -> int:
    digest = hashlib.blake2b(f"{seed}\0{tensor}\0{model}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


def _bits53_block(key: np.uint64, start: int, x: np.ndarray, tmp: np.ndarray) -> np.ndarray:
    """The top 53 bits of elements start .. start + len(x) - 1's numbers, into x (uint64)."""
    with np.errstate(over="ignore"):
        x[:] = np.arange(start + 1, start + 1 + len(x), dtype=np.uint64)
        x *= GOLDEN
        x += key
        for shift, multiplier in ((30, MIX1), (27, MIX2)):
            np.right_shift(x, np.uint64(shift), out=tmp)
            x ^= tmp
            x *= multiplier
        np.right_shift(x, np.uint64(31), out=tmp)
        x ^= tmp
    x >>= np.uint64(11)
    return x


def _blocks(seed: int, tensor: str, model: int, start: int, count: int):
    """(offset, top-53-bit integers) blocks covering elements [start, start + count)."""
    key = np.uint64(stream_key(seed, tensor, model))
    x = np.empty(min(CHUNK, count), dtype=np.uint64)
    tmp = np.empty_like(x)
    for offset in range(0, count, CHUNK):
        n = min(CHUNK, count - offset)
        yield offset, _bits53_block(key, start + offset, x[:n], tmp[:n])


def uniform(seed: int, tensor: str, model: int, start: int, count: int) -> torch.Tensor:
    """Uniform float64 numbers in [0, 1) for flat elements [start, start + count) of `tensor`."""
    out = np.empty(count, dtype=np.float64)
    for offset, bits in _blocks(seed, tensor, model, start, count):
        np.multiply(bits, 1.0 / (1 << 53), out=out[offset:offset + len(bits)])
    return torch.from_numpy(out)


def below(seed: int, tensor: str, model: int, start: int, count: int, probability: float) -> torch.Tensor:
    """A boolean tensor: element i's uniform number < `probability` (the same test as
    `uniform(...) < probability`, done on the integers: u < p exactly when bits < ceil(p * 2^53))."""
    limit = np.uint64(min(1 << 53, max(0, math.ceil(probability * (1 << 53)))))
    out = np.empty(count, dtype=np.bool_)
    for offset, bits in _blocks(seed, tensor, model, start, count):
        np.less(bits, limit, out=out[offset:offset + len(bits)])
    return torch.from_numpy(out)


def draw_seed() -> int:
    """A fresh seed for a merge that was given none (recorded so it can be reproduced)."""
    import secrets

    return secrets.randbits(63)
