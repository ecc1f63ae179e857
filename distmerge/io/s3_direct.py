"""Direct S3 reads: SigV4-signed GET, HEAD and LIST requests over the standard library's HTTP client.

Why: reading inputs is the merge's hot path, and s3fs's stack (aiobotocore, aiohttp) costs
every process about half a second of imports and a fifth of a second of session before
its first byte, then about three times the client CPU per byte of a plain HTTP read
into a preallocated buffer. On a merge of 4 x 119 MiB inputs that is most of what S3
added to the local merge's time.

This client serves reads only, and only where it understands every storage option
(`DirectS3.from_options` returns None otherwise and s3fs serves, as it does for all
writes):

- credentials: the options' `key`/`secret` (and `token`), else the environment's
  AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY (and AWS_SESSION_TOKEN) where no AWS_PROFILE
  is set, as botocore's chain would find them first; or `anon` (unsigned requests).
  Profiles, SSO, instance and container roles are left to botocore.
- endpoint: `endpoint_url` (or `client_kwargs.endpoint_url`, AWS_ENDPOINT_URL_S3,
  AWS_ENDPOINT_URL), addressed path-style as botocore does for custom endpoints; else
  AWS in the region of `client_kwargs.region_name` (or AWS_REGION/AWS_DEFAULT_REGION),
  virtual-hosted where the bucket name allows it.
- no proxy in the environment; AWS_CA_BUNDLE, where set, is the CA bundle HTTPS trusts.
- retries: as many attempts per request as botocore's inside s3fs's tries
  (`config_kwargs.retries`, `retries`), with capped, jittered backoff, on dropped
  connections, bodies cut short, 429 and 5xx answers.

Set the storage option `direct_reads: false` to read through s3fs everywhere.
"""

from __future__ import annotations

import datetime
import hashlib
import hmac
import http.client
import os
import random
import re
import threading
import time
import xml.etree.ElementTree as ElementTree
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Tuple
from urllib.parse import quote, urlsplit

from distmerge.io.storage import S3_ATTEMPTS, S3FS_RETRIES

TIMEOUT = 60.0  # seconds to connect, and between bytes of an answer (botocore's defaults)
RETRY_STATUSES = {429, 500, 502, 503, 504}
BACKOFF_BASE = 0.1
BACKOFF_CAP = 5.0
DIRECT_OPTIONS = {"key", "secret", "token", "anon", "endpoint_url", "client_kwargs", "config_kwargs", "retries",
                  "direct_reads", "default_block_size", "skip_instance_cache"}
DIRECT_CLIENT_KWARGS = {"region_name", "endpoint_url"}
DIRECT_CONFIG_KWARGS = {"retries", "max_pool_connections"}
PROXY_VARIABLES = ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy", "ALL_PROXY", "all_proxy")
UNSIGNED_EMPTY = hashlib.sha256(b"").hexdigest()
S3_NAMESPACE = "{http://s3.amazonaws.com/doc/2006-03-01/}"
_JITTER = random.Random()  # its own, so that retries never move a global random state
_VIRTUAL_BUCKET = re.compile(r"^[a-z0-9][a-z0-9-]{1,61}[a-z0-9]$")


class S3ResponseError(OSError):
    """An S3 answer that is an error, with its code; `response` has botocore's shape, so
    `storage.s3_error_code` reads it as it reads s3fs's errors."""

    def __init__(self, url: str, status: int, code: str, message: str) -> None:
        super().__init__(f"{url}: {code or f'HTTP {status}'}" + (f": {message}" if message else ""))
        self.status = status
        self.response = {"Error": {"Code": code, "Message": message}, "ResponseMetadata": {"HTTPStatusCode": status}}


class S3NotFound(S3ResponseError, FileNotFoundError):
    pass


class S3AccessDenied(S3ResponseError, PermissionError):
    pass


class ShortBody(http.client.HTTPException):
    """An answer whose body ended before its Content-Length: sent again."""


@dataclass(frozen=True)
class Credentials:
    key: str
    secret: str
    token: str = ""


def _attempts(options: Mapping[str, Any]) -> Optional[int]:
    """Attempts per request, as s3fs and botocore would make them: s3fs's tries x botocore's
    attempts (`max_attempts` counts the retries after the first; botocore rewrites it in
    place as `total_max_attempts`, which counts them all)."""
    config = options.get("config_kwargs") or {}
    retries = config.get("retries") or {}
    if not isinstance(retries, Mapping) or set(retries) - {"mode", "max_attempts", "total_max_attempts"}:
        return None
    if "total_max_attempts" in retries:
        attempts = retries["total_max_attempts"]
    else:
        attempts = retries.get("max_attempts", S3_ATTEMPTS)
        attempts = attempts + 1 if isinstance(attempts, int) else attempts
    tries = options.get("retries", S3FS_RETRIES)
    if not isinstance(attempts, int) or not isinstance(tries, int) or attempts < 1 or tries < 1:
        return None  # s3fs's construction reports the bad value
    return attempts * tries


def _credentials(options: Mapping[str, Any], environ: Mapping[str, str]) -> Tuple[bool, Optional[Credentials]]:
    """(whether this client can sign as botocore would, the credentials; None: unsigned)."""
    if options.get("anon"):
        return True, None
    key, secret = options.get("key"), options.get("secret")
    if key or secret:
        usable = isinstance(key, str) and isinstance(secret, str) and bool(key and secret)
        return usable, Credentials(key, secret, options.get("token") or "") if usable else None
    if environ.get("AWS_PROFILE") or environ.get("AWS_DEFAULT_PROFILE"):
        return False, None
    key, secret = environ.get("AWS_ACCESS_KEY_ID"), environ.get("AWS_SECRET_ACCESS_KEY")
    if key and secret:
        return True, Credentials(key, secret, environ.get("AWS_SESSION_TOKEN") or environ.get("AWS_SECURITY_TOKEN")
                                 or "")
    return False, None


class DirectS3:
    """Signed read requests to one S3 endpoint; safe to share between threads (each request
    takes a pooled keep-alive connection of its own)."""

    def __init__(self, endpoint: str, region: str, credentials: Optional[Credentials], *,
                 virtual_hosted: bool = False, attempts: int = (S3_ATTEMPTS + 1) * S3FS_RETRIES,
                 ca_bundle: Optional[str] = None) -> None:
        parts = urlsplit(endpoint)
        self.secure = parts.scheme == "https"
        self.host = parts.hostname or ""
        self.port = parts.port or (443 if self.secure else 80)
        self.region = region
        self.credentials = credentials
        self.virtual_hosted = virtual_hosted
        self.attempts = attempts
        self.ca_bundle = ca_bundle or None
        self._idle: Dict[str, List[http.client.HTTPConnection]] = {}
        self._lock = threading.Lock()
        self._signing_keys: Dict[str, bytes] = {}

    @classmethod
    def from_options(cls, options: Mapping[str, Any],
                     environ: Optional[Mapping[str, str]] = None) -> Optional["DirectS3"]:
        """The client for these s3fs options, or None where one of them (or the environment)
        asks for something only botocore does."""
        environ = os.environ if environ is None else environ
        client_kwargs = options.get("client_kwargs") or {}
        config_kwargs = options.get("config_kwargs") or {}
        if (options.get("direct_reads", True) is False or set(options) - DIRECT_OPTIONS
                or not isinstance(client_kwargs, Mapping) or set(client_kwargs) - DIRECT_CLIENT_KWARGS
                or not isinstance(config_kwargs, Mapping) or set(config_kwargs) - DIRECT_CONFIG_KWARGS
                or any(environ.get(name) for name in PROXY_VARIABLES)
                or environ.get("AWS_IGNORE_CONFIGURED_ENDPOINT_URLS")):
            return None
        attempts = _attempts(options)
        signs, credentials = _credentials(options, environ)
        if attempts is None or not signs:
            return None
        region = client_kwargs.get("region_name") or environ.get("AWS_REGION") or environ.get("AWS_DEFAULT_REGION")
        endpoint = (options.get("endpoint_url") or client_kwargs.get("endpoint_url")
                    or environ.get("AWS_ENDPOINT_URL_S3") or environ.get("AWS_ENDPOINT_URL"))
        if endpoint:
            parts = urlsplit(endpoint)
            if parts.scheme not in ("http", "https") or not parts.hostname or parts.path.strip("/") or parts.query:
                return None
            return cls(endpoint, region or "us-east-1", credentials, attempts=attempts,
                       ca_bundle=environ.get("AWS_CA_BUNDLE"))
        if not region or not re.fullmatch(r"[a-z]{2}(-gov)?-[a-z]+-\d", region):  # the aws partition only
            return None
        return cls(f"https://s3.{region}.amazonaws.com", region, credentials, virtual_hosted=True,
                   attempts=attempts, ca_bundle=environ.get("AWS_CA_BUNDLE"))

    # -- requests ------------------------------------------------------------------------------

    def head(self, bucket: str, key: str) -> Dict[str, Any]:
        """The object's metadata as s3fs's `info` gives it: name, size, ETag, LastModified, type."""
        _, headers, _ = self._call("HEAD", bucket, key)
        return {"name": f"{bucket}/{key}", "size": int(headers.get("content-length", 0)), "type": "file",
                "ETag": headers.get("etag", ""), "LastModified": headers.get("last-modified", "")}

    def get(self, bucket: str, key: str, start: Optional[int] = None, end: Optional[int] = None) -> bytes:
        """The object's bytes [start, end) (all of them by default)."""
        headers = {}
        if start is not None or end is not None:
            first = start or 0
            if end is not None and end <= first:
                return b""
            headers["range"] = f"bytes={first}-{'' if end is None else end - 1}"
        return self._call("GET", bucket, key, headers=headers)[2]

    def read_into(self, bucket: str, key: str, start: int, view: memoryview, etag: str = "") -> None:
        """Bytes [start, start + len(view)) of the object straight into `view`; with `etag`,
        only from that version of it (412 PreconditionFailed otherwise)."""
        headers = {"range": f"bytes={start}-{start + len(view) - 1}"}
        if etag:
            headers["if-match"] = etag
        self._call("GET", bucket, key, headers=headers, into=view, start=start)

    def list(self, bucket: str, prefix: str, delimiter: str = "/", max_keys: Optional[int] = None,
             page_size: int = 1000) -> Tuple[List[dict], List[str]]:
        """(objects, common prefixes) under `prefix`: every page (of `page_size` entries at
        most; S3 gives 1,000), or about the first `max_keys` entries."""
        objects: List[dict] = []
        prefixes: List[str] = []
        token = None
        while True:
            query = {"list-type": "2", "prefix": prefix, "max-keys": str(min(max_keys or page_size, page_size))}
            if delimiter:
                query["delimiter"] = delimiter
            if token:
                query["continuation-token"] = token
            root = ElementTree.fromstring(self._call("GET", bucket, "", query=query)[2])
            for item in root.iter(f"{S3_NAMESPACE}Contents"):
                objects.append({"Key": item.findtext(f"{S3_NAMESPACE}Key", ""),
                                "Size": int(item.findtext(f"{S3_NAMESPACE}Size", "0")),
                                "ETag": item.findtext(f"{S3_NAMESPACE}ETag", "")})
            prefixes += [p.findtext(f"{S3_NAMESPACE}Prefix", "") for p in root.iter(f"{S3_NAMESPACE}CommonPrefixes")]
            token = root.findtext(f"{S3_NAMESPACE}NextContinuationToken")
            if root.findtext(f"{S3_NAMESPACE}IsTruncated") != "true" or not token or (
                    max_keys and len(objects) + len(prefixes) >= max_keys):
                return objects, prefixes

    def bucket_exists(self, bucket: str) -> bool:
        try:
            self._call("HEAD", bucket, "")
        except S3NotFound:
            return False
        return True

    # -- one request, with retries -------------------------------------------------------------

    def _call(self, method: str, bucket: str, key: str, *, query: Optional[Dict[str, str]] = None,
              headers: Optional[Dict[str, str]] = None, into: Optional[memoryview] = None,
              start: int = 0) -> Tuple[int, Dict[str, str], bytes]:
        """Send one request (again on a dropped connection, a cut body, 429 or 5xx, up to
        `attempts` times); (status, lowercased headers, body; empty when read `into`)."""
        url = f"s3://{bucket}/{key}"
        host, path = self._address(bucket, key)
        target = quote(path, safe="/~") + ("?" + _canonical_query(query) if query else "")
        last: Optional[BaseException] = None
        for attempt in range(self.attempts):
            if attempt:
                time.sleep(backoff(attempt - 1))
            connection = self._connection(host)
            try:
                connection.request(method, target, headers=self._signed(method, host, path, query or {},
                                                                         dict(headers or {})))
                response = connection.getresponse()
                answer = {k.lower(): v for k, v in response.getheaders()}
                if into is not None and response.status in (200, 206):
                    self._read_body_into(url, response, answer, into, start)
                    body = b""
                else:
                    body = response.read()
            except (OSError, http.client.HTTPException) as err:
                connection.close()
                last = err
                continue
            except BaseException:
                connection.close()
                raise
            self._release(host, connection, response)
            if response.status in RETRY_STATUSES:
                last = _error(url, response.status, body)
                continue
            if response.status >= 300:
                raise _error(url, response.status, body)
            return response.status, answer, body
        raise ConnectionError(f"{url}: {method} failed {self.attempts} time(s), last: {type(last).__name__}: {last}") \
            from last

    @staticmethod
    def _read_body_into(url: str, response: http.client.HTTPResponse, answer: Dict[str, str], view: memoryview,
                        start: int) -> None:
        length = answer.get("content-length")
        if length is None or int(length) != len(view):  # e.g. a server that ignores Range
            from distmerge.errors import InputError

            raise InputError(f"{url}: asked for bytes {start}-{start + len(view)}, the server answered with "
                             f"{length} bytes (the storage must support ranged reads)")
        filled = 0
        while filled < len(view):
            n = response.readinto(view[filled:])
            if not n:
                raise ShortBody(f"{url}: the answer ended after {filled} of {len(view)} bytes")
            filled += n

    def _address(self, bucket: str, key: str) -> Tuple[str, str]:
        """(Host header, path): virtual-hosted on AWS where the bucket's name allows it."""
        if self.virtual_hosted and _VIRTUAL_BUCKET.match(bucket) and "--" not in bucket:
            return f"{bucket}.{self.host}", f"/{key}"
        netloc = self.host if self.port in (80, 443) else f"{self.host}:{self.port}"
        return netloc, f"/{bucket}/{key}" if key else f"/{bucket}"

    # -- connections ---------------------------------------------------------------------------

    def _connection(self, host: str) -> http.client.HTTPConnection:
        """An idle keep-alive connection to `host`, else a new one."""
        with self._lock:
            idle = self._idle.get(host)
            if idle:
                return idle.pop()
        name = host.rsplit(":", 1)[0] if host.count(":") == 1 else host
        if self.secure:
            import ssl

            context = ssl.create_default_context(cafile=self.ca_bundle)
            return http.client.HTTPSConnection(name, self.port, timeout=TIMEOUT, context=context)
        return http.client.HTTPConnection(name, self.port, timeout=TIMEOUT)

    def _release(self, host: str, connection: http.client.HTTPConnection, response: http.client.HTTPResponse) -> None:
        """Keep the connection for the next request unless the server is closing it."""
        if response.will_close or not response.isclosed():
            connection.close()
            return
        with self._lock:
            self._idle.setdefault(host, []).append(connection)

    # -- signing (AWS Signature Version 4, unsigned payload digest of an empty body) ---------------

    def _signed(self, method: str, host: str, path: str, query: Dict[str, str], headers: Dict[str, str]) -> Dict:
        headers["host"] = host
        if self.credentials is None:
            return headers
        now = datetime.datetime.now(datetime.timezone.utc)
        stamp = now.strftime("%Y%m%dT%H%M%SZ")
        day = stamp[:8]
        headers["x-amz-date"] = stamp
        headers["x-amz-content-sha256"] = UNSIGNED_EMPTY
        if self.credentials.token:
            headers["x-amz-security-token"] = self.credentials.token
        names = sorted(headers)
        canonical = "\n".join([method, quote(path, safe="/~"), _canonical_query(query),
                               "".join(f"{name}:{' '.join(str(headers[name]).split())}\n" for name in names),
                               ";".join(names), UNSIGNED_EMPTY])
        scope = f"{day}/{self.region}/s3/aws4_request"
        to_sign = "\n".join(["AWS4-HMAC-SHA256", stamp, scope, hashlib.sha256(canonical.encode()).hexdigest()])
        signature = hmac.new(self._signing_key(day), to_sign.encode(), hashlib.sha256).hexdigest()
        headers["authorization"] = (f"AWS4-HMAC-SHA256 Credential={self.credentials.key}/{scope}, "
                                    f"SignedHeaders={';'.join(names)}, Signature={signature}")
        return headers

    def _signing_key(self, day: str) -> bytes:
        key = self._signing_keys.get(day)
        if key is None:
            key = ("AWS4" + self.credentials.secret).encode()
            for part in (day, self.region, "s3", "aws4_request"):
                key = hmac.new(key, part.encode(), hashlib.sha256).digest()
            self._signing_keys = {day: key}
        return key


def _canonical_query(query: Dict[str, str]) -> str:
    return "&".join(f"{quote(k, safe='~')}={quote(str(v), safe='~')}" for k, v in sorted(query.items()))


def _error(url: str, status: int, body: bytes) -> S3ResponseError:
    code = message = ""
    if body:
        try:
            root = ElementTree.fromstring(body)
            code, message = root.findtext("Code") or "", root.findtext("Message") or ""
        except ElementTree.ParseError:
            message = body[:200].decode("utf-8", "replace")
    if status == 404:
        if code == "NoSuchBucket":
            return S3NotFound(url, status, code, f"bucket {url[5:].split('/')[0]!r} does not exist")
        return S3NotFound(url, status, code or "NoSuchKey", message)
    if status == 403:
        return S3AccessDenied(url, status, code or "AccessDenied", message)
    if status == 412:
        code = code or "PreconditionFailed"
    return S3ResponseError(url, status, code, message)


def backoff(attempt: int) -> float:
    """Seconds to wait before retry `attempt + 1`: exponential, capped, with jitter."""
    return min(BACKOFF_CAP, BACKOFF_BASE * 2**attempt) * (0.5 + _JITTER.random() / 2)


def split_bucket(url: str) -> Tuple[str, str]:
    """("bucket", "key/of/object") for "s3://bucket/key/of/object" (or "bucket/key/of/object")."""
    path = url.split("://", 1)[1] if "://" in url else url
    bucket, _, key = path.partition("/")
    return bucket, key


class DirectS3Files:
    """The metadata reads `io.checkpoint.ModelFiles` makes (fsspec's `info`, `exists`,
    `cat_file` and `ls`), answered by a `DirectS3` client as s3fs answers them."""

    def __init__(self, client: DirectS3) -> None:
        self.client = client

    def info(self, url: str) -> Dict[str, Any]:
        return self.client.head(*split_bucket(url))

    def cat_file(self, url: str, start: Optional[int] = None, end: Optional[int] = None) -> bytes:
        return self.client.get(*split_bucket(url), start, end)

    def exists(self, url: str) -> bool:
        """An object, a "directory" (a prefix some key starts with), or a bucket."""
        bucket, key = split_bucket(url)
        key = key.rstrip("/")
        if not key:
            return self.client.bucket_exists(bucket)
        try:
            self.client.head(bucket, key)
            return True
        except S3NotFound:
            pass
        try:
            objects, prefixes = self.client.list(bucket, key + "/", max_keys=1)
        except S3NotFound:
            return False
        return bool(objects or prefixes)

    def ls(self, url: str, detail: bool = False) -> List[str]:
        """The names ("bucket/key") right below a directory; FileNotFoundError if there are none."""
        if detail:
            raise NotImplementedError("DirectS3Files.ls lists names only")
        bucket, key = split_bucket(url)
        prefix = key.rstrip("/") + "/" if key.strip("/") else ""
        objects, prefixes = self.client.list(bucket, prefix)
        names = [f"{bucket}/{o['Key']}" for o in objects if o["Key"] != prefix]
        names += [f"{bucket}/{p.rstrip('/')}" for p in prefixes]
        if not names:
            raise FileNotFoundError(url)
        return sorted(names)
