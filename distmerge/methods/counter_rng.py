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

import numpy as np
import torch

GOLDEN = np.uint64(0x9E3779B97F4A7C15)
MIX1 = np.uint64(0xBF58476D1CE4E5B9)
MIX2 = np.uint64(0x94D049BB133111EB)
CHUNK = 1 << 22  # elements per block: bounds the uint64 temporaries to a few tens of MiB


def stream_key(seed: int, tensor: str, model: int) -> int:
    digest = hashlib.blake2b(f"{seed}\0{tensor}\0{model}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


def _uniform_block(key: np.uint64, start: int, count: int) -> np.ndarray:
    with np.errstate(over="ignore"):
        x = np.arange(start + 1, start + 1 + count, dtype=np.uint64)
        x *= GOLDEN
        x += key
        x ^= x >> np.uint64(30)
        x *= MIX1
        x ^= x >> np.uint64(27)
        x *= MIX2
        x ^= x >> np.uint64(31)
    x >>= np.uint64(11)
    return x.astype(np.float64) * (1.0 / (1 << 53))


def uniform(seed: int, tensor: str, model: int, start: int, count: int) -> torch.Tensor:
    """Uniform float64 numbers in [0, 1) for flat elements [start, start + count) of `tensor`."""
    key = np.uint64(stream_key(seed, tensor, model))
    out = np.empty(count, dtype=np.float64)
    for offset in range(0, count, CHUNK):
        n = min(CHUNK, count - offset)
        out[offset:offset + n] = _uniform_block(key, start + offset, n)
    return torch.from_numpy(out)


def draw_seed() -> int:
    """A fresh seed for a merge that was given none (recorded so it can be reproduced)."""
    import secrets

    return secrets.randbits(63)
