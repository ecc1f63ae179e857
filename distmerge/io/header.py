"""Parse and validate one safetensors header, reading only its bytes.

The format: an 8-byte little-endian header length N, N bytes of JSON (an object of
tensor name -> {dtype, shape, data_offsets}, plus optional "__metadata__"), then the
data buffer. Offsets are relative to the start of the data buffer.
"""

import json
import math
import struct
from dataclasses import dataclass
from typing import Callable, Dict, Tuple

from distmerge.errors import InputError
from distmerge.io.dtypes import ELEMENT_SIZE

MAX_HEADER_BYTES = 100 * 1000 * 1000


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor's bytes live: file, absolute byte range, dtype and shape."""

    name: str
    path: str
    dtype: str
    shape: Tuple[int, ...]
    start: int  # absolute offset of the first byte in the file
    end: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.end - self.start


def read_header(read_range: Callable[[int, int], bytes], path: str, file_size: int) -> Dict[str, TensorInfo]:
    """Parse the header of a safetensors file through `read_range(start, end)`; reads only its bytes.

    Raises InputError naming `path` if the header is broken.
    """
    prefix = read_range(0, 8) if file_size >= 8 else b""
    if len(prefix) != 8:
        raise InputError(f"{path}: truncated safetensors file ({file_size} bytes, header length missing)")
    (header_len,) = struct.unpack("<Q", prefix)
    if header_len > MAX_HEADER_BYTES:
        raise InputError(f"{path}: safetensors header is {header_len} bytes, over the {MAX_HEADER_BYTES} limit")
    if 8 + header_len > file_size:
        raise InputError(f"{path}: header length {header_len} runs past the end of the file ({file_size} bytes)")
    raw = read_range(8, 8 + header_len)
    if len(raw) != header_len:
        raise InputError(f"{path}: truncated safetensors header")
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise InputError(f"{path}: safetensors header is not valid JSON ({err})") from None
    if not isinstance(header, dict):
        raise InputError(f"{path}: safetensors header must be a JSON object")
    return parse_entries(header, path, data_start=8 + header_len, file_size=file_size)


def parse_entries(header: dict, path: str, data_start: int, file_size: int) -> Dict[str, TensorInfo]:
    tensors: Dict[str, TensorInfo] = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        where = f"{path}: tensor {name!r}"
        if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
            raise InputError(f"{where}: entry must have exactly dtype, shape and data_offsets")
        dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
        if dtype not in ELEMENT_SIZE:
            raise InputError(f"{where}: unknown dtype {dtype!r}")
        if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                                                  for d in shape):
            raise InputError(f"{where}: shape must be a list of non-negative integers, got {shape!r}")
        if (not isinstance(offsets, list) or len(offsets) != 2
                or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)):
            raise InputError(f"{where}: data_offsets must be two integers, got {offsets!r}")
        begin, end = offsets
        expected = math.prod(shape) * ELEMENT_SIZE[dtype]
        if not 0 <= begin <= end or data_start + end > file_size:
            raise InputError(f"{where}: data_offsets {offsets} lie outside the file's data "
                             f"({file_size - data_start} bytes)")
        if end - begin != expected:
            raise InputError(f"{where}: data_offsets cover {end - begin} bytes but shape {shape} x {dtype} "
                             f"needs {expected}")
        tensors[name] = TensorInfo(name, path, dtype, tuple(shape), data_start + begin, data_start + end)
    spans = sorted((t.start, t.end, t.name) for t in tensors.values() if t.end > t.start)
    for (s0, e0, n0), (s1, _e1, n1) in zip(spans, spans[1:]):
        if s1 < e0:
            raise InputError(f"{path}: tensors {n0!r} and {n1!r} overlap in the data buffer")
    return tensors
