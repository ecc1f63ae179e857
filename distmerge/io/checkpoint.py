"""Open a model directory by its headers: which tensors it has and where their bytes are."""

import json
import os
import posixpath
from dataclasses import dataclass, field
from typing import Dict, List

from distmerge.errors import InputError
from distmerge.io.header import TensorInfo, read_header_from_path

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


@dataclass(frozen=True)
class Checkpoint:
    """A model's tensors (name -> TensorInfo) read from headers only."""

    ref: str
    path: str
    tensors: Dict[str, TensorInfo] = field(repr=False)
    files: List[str] = field(repr=False)

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())


def _shard_names_from_index(index_path: str) -> Dict[str, str]:
    try:
        with open(index_path, encoding="utf-8") as f:
            index = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise InputError(f"{index_path}: cannot read the index ({err})") from None
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise InputError(f"{index_path}: the index has no 'weight_map' object")
    for name, shard in weight_map.items():
        if not isinstance(shard, str) or not shard:
            raise InputError(f"{index_path}: weight_map[{name!r}] must be a file name")
        normalized = posixpath.normpath(shard)
        if (os.path.isabs(shard) or shard.startswith(("/", "\\")) or "://" in shard
                or normalized.startswith("..") or "\\" in shard):
            raise InputError(
                f"{index_path}: weight_map[{name!r}] = {shard!r} points outside the model directory; "
                "shard names must be relative paths inside it")
    return weight_map


def open_checkpoint(ref: str, path: str) -> Checkpoint:
    """Read the index and shard headers of the model at `path` (config reference `ref`)."""
    if not os.path.isdir(path):
        hint = ""
        if "/" in ref and not ref.startswith((".", "/")) and not os.path.exists(path):
            hint = (" (Hugging Face hub names are not downloaded; fetch the model first, e.g. "
                    "`huggingface-cli download NAME --local-dir DIR`, and use the directory)")
        raise InputError(f"model {ref!r}: directory {path} does not exist{hint}")
    index_path = os.path.join(path, INDEX_NAME)
    single_path = os.path.join(path, SINGLE_NAME)
    if os.path.exists(index_path):
        weight_map = _shard_names_from_index(index_path)
        files = sorted(set(weight_map.values()))
        tensors: Dict[str, TensorInfo] = {}
        for shard in files:
            shard_path = os.path.join(path, shard)
            if not os.path.isfile(shard_path):
                raise InputError(f"{index_path}: names shard {shard!r}, which does not exist")
            for name, info in read_header_from_path(shard_path).items():
                if weight_map.get(name) == shard:
                    tensors[name] = info
        missing = sorted(set(weight_map) - set(tensors))
        if missing:
            raise InputError(
                f"{index_path}: tensor {missing[0]!r} is listed in weight_map under "
                f"{weight_map[missing[0]]!r} but that shard's header does not contain it")
        return Checkpoint(ref, path, tensors, [os.path.join(path, s) for s in files])
    if os.path.exists(single_path):
        return Checkpoint(ref, path, read_header_from_path(single_path), [single_path])
    pickles = sorted(n for n in os.listdir(path) if n.endswith(PICKLE_SUFFIXES))
    if pickles:
        raise InputError(
            f"model {ref!r}: {path} holds only pickle checkpoints ({', '.join(pickles[:3])}); "
            "distmerge never unpickles files. Convert them to safetensors first "
            "(e.g. load with transformers and save_pretrained(..., safe_serialization=True)).")
    raise InputError(f"model {ref!r}: {path} has neither {INDEX_NAME} nor {SINGLE_NAME}")
