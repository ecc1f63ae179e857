"""Where bytes live: local paths, or fsspec URLs (s3://, ...), shipped to workers as a recipe.

A `Storage` is a protocol-independent recipe: the fsspec keyword arguments (endpoint URL,
profile, region, anon, ...) to use for remote URLs. Workers rebuild their filesystem from
it (one per process), never receiving a live client. Secrets in it are never printed:
`redacted()` is what logs, errors and plans show.
"""

from __future__ import annotations

import json
import os
import threading
from dataclasses import dataclass, field
from typing import Any, Dict, Mapping, Optional, Tuple

from distmerge.errors import ConfigError

SECRET_KEYS = {"key", "secret", "token", "aws_access_key_id", "aws_secret_access_key", "aws_session_token",
               "password", "session_token", "secret_access_key", "access_key_id"}
S3_ATTEMPTS = 5
S3FS_RETRIES = 3
# Connections an S3 client keeps (botocore's default is 10): the writer uploads 16 parts
# at once (output.multipart.UPLOAD_THREADS), a worker fetches 8 ranges at once.
S3_CONNECTIONS = 32
_FILESYSTEMS: Dict[Tuple[str, str], Any] = {}
_DIRECT: Dict[str, Any] = {}
_FILESYSTEMS_LOCK = threading.Lock()


def split_url(url: str) -> Tuple[str, str]:
    """("s3", "bucket/key") for "s3://bucket/key"; ("file", "/abs/path") for local paths."""
    if "://" in url:
        protocol, rest = url.split("://", 1)
        if protocol in ("file", "local"):
            return "file", rest
        return protocol, rest
    return "file", url


def is_remote(url: str) -> bool:
    return split_url(url)[0] != "file"


def join(url: str, *parts: str) -> str:
    if is_remote(url):
        return "/".join([url.rstrip("/"), *parts])
    return os.path.join(url, *parts)


def s3_error_code(err: BaseException) -> Optional[str]:
    """The S3 error code ("PreconditionFailed", "NoSuchKey", ...) behind an error s3fs raised
    (it keeps botocore's error as the cause), or None when it did not come from S3."""
    seen = 0
    while err is not None and seen < 8:
        response = getattr(err, "response", None)
        if isinstance(response, dict) and isinstance(response.get("Error"), dict):
            return response["Error"].get("Code")
        err, seen = err.__cause__ or err.__context__, seen + 1
    return None


def _is_secret(key: str) -> bool:
    lowered = key.lower()
    return lowered in SECRET_KEYS or any(word in lowered for word in ("secret", "token", "password", "credential")) \
        or (lowered.endswith("key") and lowered not in ("key_prefix",))


def _redact(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {k: ("***" if _is_secret(str(k)) else _redact(v)) for k, v in value.items()}
    return value


@dataclass(frozen=True)
class Storage:
    """fsspec options for remote URLs; empty means the standard AWS environment/credential chain."""

    options: Mapping[str, Any] = field(default_factory=dict)

    def __repr__(self) -> str:  # tracebacks and reprs of configs/plans must not show secrets
        return f"Storage({self.redacted()!r})"

    def key(self) -> str:
        return json.dumps(self.options, sort_keys=True, default=str)

    def redacted(self) -> Dict[str, Any]:
        return _redact(dict(self.options))

    def filesystem(self, url: str):
        """The fsspec filesystem for `url` (cached per process and options)."""
        protocol, _ = split_url(url)
        cache_key = (protocol, self.key())
        with _FILESYSTEMS_LOCK:  # one per process: threads (a planner's readers) wait for the first
            if cache_key not in _FILESYSTEMS:
                _FILESYSTEMS[cache_key] = self._new_filesystem(protocol)
            return _FILESYSTEMS[cache_key]

    def direct_s3(self):
        """This process's `io.s3_direct.DirectS3` client for reading s3:// URLs with these
        options, or None where s3fs must serve them (an option only botocore understands)."""
        cache_key = self.key()
        with _FILESYSTEMS_LOCK:
            if cache_key not in _DIRECT:
                from distmerge.io.s3_direct import DirectS3

                _DIRECT[cache_key] = DirectS3.from_options(self.options)
            return _DIRECT[cache_key]

    def direct_s3_for(self, url: str):
        """The direct S3 client where it serves reads of `url` (an s3:// URL, these options,
        its bucket), else None."""
        if split_url(url)[0] != "s3":
            return None
        client = self.direct_s3()
        if client is None:
            return None
        from distmerge.io.s3_direct import split_bucket

        return client if client.serves(split_bucket(url)[0]) else None

    def read_filesystem(self, url: str):
        """What answers metadata reads (info, exists, cat_file, ls) of `url`: the direct S3
        client where it serves them, else the fsspec filesystem."""
        client = self.direct_s3_for(url)
        if client is not None:
            from distmerge.io.s3_direct import DirectS3Files

            return DirectS3Files(client)
        return self.filesystem(url)

    def _new_filesystem(self, protocol: str):
        import fsspec

        options = dict(self.options) if protocol != "file" else {}
        options.pop("direct_reads", None)  # ours: whether S3 reads may bypass s3fs (io.s3_direct)
        if protocol == "s3":
            options.setdefault("default_block_size", 8 * 2**20)
            # Bounded retries with backoff: botocore's standard mode (throttling, 5xx,
            # dropped connections), inside s3fs's own few tries on connection errors.
            # Both can be set in the storage options (config_kwargs.retries, retries).
            config = dict(options.get("config_kwargs") or {})
            config.setdefault("retries", {"mode": "standard", "max_attempts": S3_ATTEMPTS})
            config.setdefault("max_pool_connections", S3_CONNECTIONS)
            options["config_kwargs"] = config
            s3fs_retries = options.pop("retries", S3FS_RETRIES)
            if not isinstance(s3fs_retries, int) or s3fs_retries < 1:
                raise ConfigError(f"storage.retries: must be a whole number of tries, at least 1 "
                                  f"(got {s3fs_retries!r})")
            options["skip_instance_cache"] = True  # ours is keyed by every option, retries too
        fs = fsspec.filesystem(protocol, **options)
        if protocol == "s3":
            fs.retries = s3fs_retries  # an attribute of s3fs, not a constructor argument
        return fs

    def merged(self, extra: Optional[Mapping[str, Any]]) -> "Storage":
        return Storage({**self.options, **(extra or {})})


LOCAL = Storage()
