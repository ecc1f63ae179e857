"""Read a piece's rows from local safetensors files through memory maps."""

from __future__ import annotations

import mmap
import os
from typing import Tuple

import torch

from distmerge.io.dtypes import SAFETENSORS_TO_TORCH

_PAGE = mmap.ALLOCATIONGRANULARITY


def map_range(path: str, start: int, end: int, dtype: str, shape: Tuple[int, ...]) -> torch.Tensor:
    """A tensor viewing bytes [start, end) of `path` through a private memory map.

    The map is released when the last tensor using it is freed, so the pages it
    touched stop counting against this process as soon as the piece is done.
    """
    torch_dtype = SAFETENSORS_TO_TORCH[dtype]
    if end == start:
        return torch.empty(shape, dtype=torch_dtype)
    aligned = start - start % _PAGE
    with open(path, "rb") as f:
        mapped = mmap.mmap(f.fileno(), end - aligned, access=mmap.ACCESS_COPY, offset=aligned)
    if hasattr(mapped, "madvise"):
        mapped.madvise(mmap.MADV_SEQUENTIAL)
    flat = torch.frombuffer(mapped, dtype=torch.uint8, offset=start - aligned, count=end - start)
    return flat.view(torch_dtype).view(shape)


def local_version(path: str) -> str:
    """The version string fsspec's local filesystem reports (mtime), for change checks."""
    return str(os.stat(path).st_mtime)
