"""The output checkpoint's layout, fixed before any tensor is computed.

Tensors go in natural name order into shards of at most `shard_size` bytes (a tensor
bigger than that gets a shard of its own). Every shard's header, and so every
tensor's absolute byte offset, is known up front: workers' results can be written
in any order, and the bytes do not depend on scheduling.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Dict, List, Sequence, Tuple

SHARD_PATTERN = "model-{index:05d}-of-{count:05d}.safetensors"
INDEX_NAME = "model.safetensors.index.json"
PARTIAL_SUFFIX = ".partial"  # local shards are written under this suffix until complete
SHARD_FILE = re.compile(r"model-\d{5}-of-\d{5}\.safetensors")  # what SHARD_PATTERN names


def natural_key(name: str) -> List:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


@dataclass(frozen=True)
class OutputTensor:
    name: str
    dtype: str  # safetensors dtype name
    shape: Tuple[int, ...]
    nbytes: int


@dataclass(frozen=True)
class OutputShard:
    file_name: str
    header: bytes  # the 8-byte length prefix plus the padded JSON header
    tensors: Tuple[OutputTensor, ...]
    offsets: Dict[str, int]  # tensor name -> absolute offset of its first byte in the file
    size: int  # total file size


@dataclass(frozen=True)
class OutputLayout:
    shards: Tuple[OutputShard, ...]

    @property
    def total_size(self) -> int:
        return sum(t.nbytes for s in self.shards for t in s.tensors)

    def locate(self, tensor: str) -> Tuple[int, int]:
        """(shard index, absolute offset) of a tensor's first byte."""
        for i, shard in enumerate(self.shards):
            if tensor in shard.offsets:
                return i, shard.offsets[tensor]
        raise KeyError(tensor)

    def index_json(self, extra_metadata: Dict[str, object] = None) -> str:
        weight_map = {t.name: s.file_name for s in self.shards for t in s.tensors}
        metadata = {"total_size": self.total_size, **(extra_metadata or {})}
        return json.dumps({"metadata": metadata, "weight_map": dict(sorted(weight_map.items()))}, indent=2) + "\n"


def _shard_header(tensors: Sequence[OutputTensor]) -> Tuple[bytes, Dict[str, int]]:
    entries = {"__metadata__": {"format": "pt"}}
    relative = {}
    offset = 0
    for t in tensors:
        entries[t.name] = {"dtype": t.dtype, "shape": list(t.shape), "data_offsets": [offset, offset + t.nbytes]}
        relative[t.name] = offset
        offset += t.nbytes
    body = json.dumps(entries, separators=(",", ":")).encode()
    body += b" " * (-(8 + len(body)) % 8)
    prefix = len(body).to_bytes(8, "little") + body
    return prefix, {name: len(prefix) + off for name, off in relative.items()}


def plan_layout(tensors: Sequence[OutputTensor], shard_size: int) -> OutputLayout:
    ordered = sorted(tensors, key=lambda t: natural_key(t.name))
    groups: List[List[OutputTensor]] = []
    current: List[OutputTensor] = []
    used = 0
    for t in ordered:
        if current and used + t.nbytes > shard_size:
            groups.append(current)
            current, used = [], 0
        current.append(t)
        used += t.nbytes
    if current:
        groups.append(current)
    shards = []
    for i, group in enumerate(groups):
        header, offsets = _shard_header(group)
        shards.append(OutputShard(
            file_name=SHARD_PATTERN.format(index=i + 1, count=len(groups)),
            header=header,
            tensors=tuple(group),
            offsets=offsets,
            size=len(header) + sum(t.nbytes for t in group),
        ))
    return OutputLayout(tuple(shards))
