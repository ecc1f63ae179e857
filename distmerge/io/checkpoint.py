"""Open a model by its headers: which tensors it has and where their bytes are.

A model is a directory (local path or fsspec URL such as s3://bucket/prefix) holding
`model.safetensors.index.json` + shards, or a single `model.safetensors`. Only the
index and the shard headers are read. Each file's size and version (ETag or mtime) are
recorded, so a worker can refuse to mix versions if a file changes mid-merge.
"""

import json
import posixpath
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Set, Tuple

from distmerge.errors import InputError
from distmerge.io.header import TensorInfo, read_header
from distmerge.io.storage import LOCAL, Storage, is_remote, join, split_url

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
    versions: Dict[str, Tuple[int, str]] = field(repr=False, default_factory=dict)  # file -> (size, version)

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())


def file_version(info: dict) -> str:
    """What identifies one version of a file: ETag (object stores) or mtime (local)."""
    for key in ("ETag", "etag", "VersionId", "mtime", "LastModified", "last_modified", "created"):
        if info.get(key) is not None:
            return str(info[key]).strip('"')
    return ""


def storage_error(url: str, err: BaseException) -> InputError:
    """A clear InputError for a failed storage call on `url` (no secrets in it)."""
    protocol, path = split_url(url)
    if isinstance(err, FileNotFoundError):
        if protocol == "s3" and "bucket" in str(err).lower():
            return InputError(f"{url}: bucket {path.split('/')[0]!r} does not exist")
        return InputError(f"{url}: does not exist")
    if isinstance(err, PermissionError):
        return InputError(f"{url}: access denied (check the credentials or storage options)")
    return InputError(f"{url}: cannot read ({type(err).__name__}: {err})")


class ModelFiles:
    """Metadata reads of one model's files through fsspec (local or remote; S3 through the
    direct client where it serves the storage options)."""

    def __init__(self, root: str, storage: Storage) -> None:
        self.root = root
        self.fs = storage.read_filesystem(root)
        self._names: Optional[Set[str]] = None

    def has(self, name: str) -> bool:
        """Whether the model directory holds `name`, from one listing of it (kept): a
        request per file asked about would cost a round trip each on object storage."""
        if self._names is None:
            self._names = set(self.list_names())
        return name in self._names

    def url(self, name: str) -> str:
        return join(self.root, name)

    def _path(self, url: str) -> str:
        return split_url(url)[1] if not is_remote(url) else url

    def info(self, url: str) -> dict:
        try:
            return self.fs.info(self._path(url))
        except Exception as err:  # noqa: BLE001 - mapped to a clear error
            raise storage_error(url, err) from err

    def exists(self, url: str) -> bool:
        try:
            return bool(self.fs.exists(self._path(url)))
        except FileNotFoundError:
            return False
        except Exception as err:  # noqa: BLE001
            raise storage_error(url, err) from err

    def read(self, url: str, start=None, end=None) -> bytes:
        try:
            return self.fs.cat_file(self._path(url), start=start, end=end)
        except Exception as err:  # noqa: BLE001
            raise storage_error(url, err) from err

    def list_names(self) -> List[str]:
        try:
            return sorted(posixpath.basename(p.rstrip("/")) for p in self.fs.ls(self._path(self.root), detail=False))
        except FileNotFoundError:
            return []
        except Exception as err:  # noqa: BLE001
            raise storage_error(self.root, err) from err


def _shard_names_from_index(index_url: str, raw: bytes) -> Dict[str, str]:
    try:
        index = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise InputError(f"{index_url}: cannot read the index ({err})") from err
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise InputError(f"{index_url}: the index has no 'weight_map' object")
    for name, shard in weight_map.items():
        if not isinstance(shard, str) or not shard:
            raise InputError(f"{index_url}: weight_map[{name!r}] must be a file name")
        normalized = posixpath.normpath(shard)
        if (shard.startswith(("/", "\\")) or "://" in shard or normalized.startswith("..")
                or "\\" in shard or (len(shard) > 1 and shard[1] == ":")):
            raise InputError(
                f"{index_url}: weight_map[{name!r}] = {shard!r} points outside the model directory; "
                "shard names must be relative paths inside it")
    return weight_map


def _read_shard(files: ModelFiles, url: str) -> Tuple[Dict[str, TensorInfo], Tuple[int, str]]:
    info = files.info(url)
    size = int(info.get("size") or 0)
    return read_header(lambda a, b: files.read(url, a, b), url, size), (size, file_version(info))


HEADER_READERS = 16  # shard headers read at once


def open_checkpoint(ref: str, location: str, storage: Storage = LOCAL) -> Checkpoint:
    """Read the index and shard headers of the model at `location` (config reference `ref`)."""
    files = ModelFiles(location, storage)
    index_url, single_url = files.url(INDEX_NAME), files.url(SINGLE_NAME)
    versions: Dict[str, Tuple[int, str]] = {}
    if files.exists(index_url):
        weight_map = _shard_names_from_index(index_url, files.read(index_url))
        shard_names = sorted(set(weight_map.values()))
        tensors: Dict[str, TensorInfo] = {}

        def shard_header(shard: str) -> Tuple[str, str, Dict[str, TensorInfo], Tuple[int, str]]:
            shard_url = files.url(shard)
            if not files.exists(shard_url):
                raise InputError(f"{index_url}: names shard {shard!r}, which does not exist")
            return (shard, shard_url, *_read_shard(files, shard_url))

        # Shard headers are read concurrently (on S3 each costs a few requests' latency); the
        # results, and the first error, come in shard-name order whatever finishes first.
        with ThreadPoolExecutor(min(HEADER_READERS, len(shard_names)), thread_name_prefix="headers") as pool:
            read = list(pool.map(shard_header, shard_names))
        for shard, shard_url, header, version in read:
            versions[shard_url] = version
            for name, info in header.items():
                if weight_map.get(name) == shard:
                    tensors[name] = info
        missing = sorted(set(weight_map) - set(tensors))
        if missing:
            raise InputError(
                f"{index_url}: tensor {missing[0]!r} is listed in weight_map under "
                f"{weight_map[missing[0]]!r} but that shard's header does not contain it")
        return Checkpoint(ref, location, tensors, [files.url(s) for s in shard_names], versions)
    if files.exists(single_url):
        header, versions[single_url] = _read_shard(files, single_url)
        return Checkpoint(ref, location, header, [single_url], versions)
    names = files.list_names()
    if not names and not files.exists(location):
        hint = ""
        if not is_remote(location) and "/" in ref and not ref.startswith((".", "/", "~")):
            hint = (" (Hugging Face hub names are not downloaded; fetch the model first, e.g. "
                    "`huggingface-cli download NAME --local-dir DIR`, and use the directory)")
        raise InputError(f"model {ref!r}: {location} does not exist{hint}")
    pickles = [n for n in names if n.endswith(PICKLE_SUFFIXES)]
    if pickles:
        raise InputError(
            f"model {ref!r}: {location} holds only pickle checkpoints ({', '.join(pickles[:3])}); "
            "distmerge never unpickles files. Convert them to safetensors first "
            "(e.g. load with transformers and save_pretrained(..., safe_serialization=True)).")
    raise InputError(f"model {ref!r}: {location} has neither {INDEX_NAME} nor {SINGLE_NAME}")
