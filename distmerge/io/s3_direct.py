"""Direct S3 reads: SigV4-signed GET, HEAD and LIST requests over the standard library's HTTP client.

Why: reading inputs is the merge's hot path, and s3fs's stack (aiobotocore, aiohttp) costs
every process about half a second of imports and a fifth of a second of session before
its first byte, then about three times the client CPU per byte of a plain HTTP read
into a preallocated buffer. On a merge of 4 x 119 MiB inputs that was most of what S3
added to the local merge's time.

This client serves reads only, and only where it would send what botocore sends
(`DirectS3.from_options` returns None otherwise, and s3fs serves, as it does all writes):

- credentials: the options' `key`/`secret` (and `token`), else the environment's
  AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY (and AWS_SESSION_TOKEN), which botocore's chain
  takes first; or `anon` (unsigned requests). Profiles (AWS_PROFILE), SSO, instance and
  container roles are left to botocore.
- endpoint: `endpoint_url` (or `client_kwargs.endpoint_url`, AWS_ENDPOINT_URL_S3,
  AWS_ENDPOINT_URL), addressed path-style as botocore does for custom endpoints; else AWS
  (the aws and aws-us-gov partitions), virtual-hosted where the bucket's name allows it,
  following S3's redirect to a bucket's region as botocore does.
- the signing region: `client_kwargs.region_name`, else AWS_DEFAULT_REGION, else the
  shared config file's default profile (us-east-1 for a custom endpoint), as botocore.
- a shared config file (AWS_CONFIG_FILE, ~/.aws/config) whose default profile sets only
  the region, the CLI's own settings or credential sources; no proxy, FIPS or dual-stack
  setting in the environment. AWS_CA_BUNDLE, where set, is the CA bundle HTTPS trusts;
  otherwise certifi's, as botocore.
- retries, as s3fs over botocore: a request is made up to `config_kwargs.retries`'
  attempts (max_attempts + 1, or total_max_attempts) on 5xx, 429 and 400 RequestTimeout
  answers, and that many times s3fs's `retries` on dropped connections, bodies cut short
  and SlowDown, waiting as they wait (botocore's jittered exponential backoff within a
  call, s3fs's pause between its tries); timeouts are s3fs's (5 s to connect, 15 s
  between bytes) unless `config_kwargs` sets them.
- buckets: any but S3 Express directory buckets, Object Lambda and access point aliases
  and ARNs (`DirectS3.serves`), which need botocore's endpoints and sessions.

The storage option `direct_reads: false` sends every read through s3fs.
"""

from __future__ import annotations

import configparser
import datetime
import hashlib
import hmac
import http.client
import os
import random
import re
import select
import shlex
import ssl
import threading
import time
import xml.etree.ElementTree as ElementTree
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Tuple
from urllib.parse import quote, unquote_plus, urlsplit

from distmerge.errors import ConfigError, InputError
from distmerge.io.storage import S3_ATTEMPTS, S3_CONNECTIONS, S3FS_RETRIES

CONNECT_TIMEOUT = 5.0  # s3fs's connect and read timeouts (it overrides botocore's 60 s)
READ_TIMEOUT = 15.0
IDLE_SECONDS = 10.0  # a pooled connection idle longer is dropped (aiobotocore keeps 12 s)
RETRY_STATUSES = {429, 500, 502, 503, 504}
SLOW_DOWN_CODE, SLOW_DOWN_MESSAGE = "SlowDown", "reduce your request rate"  # what s3fs's tries repeat, as drops
BACKOFF_CAP = 20.0  # botocore's standard mode: random() * min(2 ** (attempt - 1), 20) s before a retry
TRIES_PAUSE_BASE, TRIES_PAUSE_GROWTH, TRIES_PAUSE_CAP = 0.1, 1.7, 15.0  # s3fs's pause between its tries
IDLE_CONNECTIONS = S3_CONNECTIONS  # idle keep-alive connections kept per host, unless max_pool_connections says
DIRECT_OPTIONS = {"key", "secret", "token", "anon", "endpoint_url", "client_kwargs", "config_kwargs", "retries",
                  "direct_reads", "default_block_size", "skip_instance_cache"}
DIRECT_CLIENT_KWARGS = {"region_name", "endpoint_url"}
DIRECT_CONFIG_KWARGS = {"retries", "max_pool_connections", "connect_timeout", "read_timeout"}
DECLINING_VARIABLES = ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy", "ALL_PROXY", "all_proxy",
                       "AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_USE_FIPS_ENDPOINT", "AWS_USE_DUALSTACK_ENDPOINT",
                       "AWS_IGNORE_CONFIGURED_ENDPOINT_URLS", "AWS_S3_US_EAST_1_REGIONAL_ENDPOINT",
                       "AWS_S3_DISABLE_MULTIREGION_ACCESS_POINTS", "AWS_S3_USE_ARN_REGION")
# Keys of the shared config file's default profile that change nothing this client sends:
# the CLI's own settings, and credential sources (used only where neither the options
# nor the environment give credentials, and then this client is not used).
CONFIG_FILE_KEYS = {"region", "output", "aws_access_key_id", "aws_secret_access_key", "aws_session_token",
                    "role_arn", "source_profile", "credential_source", "credential_process", "role_session_name",
                    "duration_seconds", "mfa_serial", "external_id", "web_identity_token_file", "sso_session",
                    "sso_account_id", "sso_role_name", "sso_region", "sso_start_url"}
AWS_REGION_NAME = re.compile(r"(?!cn-)[a-z]{2}(-gov)?-[a-z]+-\d+")  # the aws and aws-us-gov partitions (not cn-, iso)
UNSIGNED_EMPTY = hashlib.sha256(b"").hexdigest()
CLOSED_UNDER_US = (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError)
_JITTER = random.Random()  # its own, so that retries never move a global random state
_VIRTUAL_BUCKET = re.compile(r"^[a-z0-9][a-z0-9-]{1,61}[a-z0-9]$")
_REGION_LABEL = re.compile(r"[a-zA-Z0-9](?:[a-zA-Z0-9-]{0,61}[a-zA-Z0-9])?")  # botocore's validate_region_name
# Directory buckets (S3 Express One Zone) and their access points, Object Lambda and
# Outposts access point aliases, ARNs:
# botocore reaches these through their own endpoints and sessions.
_SPECIAL_BUCKET = re.compile(r"^arn:|--(x-s3|xa-s3|ol-s3|op-s3)$")


class S3ResponseError(OSError):
    """An S3 answer that is an error, with its code; `response` has botocore's shape, so
    `storage.s3_error_code` reads it as it reads s3fs's errors."""

    def __init__(self, url: str, status: int, code: str, message: str, region: str = "") -> None:
        super().__init__(f"{url}: {code or f'HTTP {status}'}" + (f": {message}" if message else ""))
        self.status = status
        self.code = code
        self.message = message
        self.region = region  # where S3 says the bucket is (a redirect), if it says
        self.response = {"Error": {"Code": code, "Message": message}, "ResponseMetadata": {"HTTPStatusCode": status}}


class S3NotFound(S3ResponseError, FileNotFoundError):
    pass


class S3AccessDenied(S3ResponseError, PermissionError):
    pass


class ShortBody(http.client.HTTPException):
    """An answer whose body ended before its length: sent again."""


class Cancelled(Exception):
    """The caller gave up on this request (another one of its batch failed)."""


@dataclass(frozen=True)
class Credentials:
    key: str
    secret: str
    token: str = ""


@dataclass(frozen=True)
class RetryBudget:
    """Attempts per request: `attempts` (botocore's) for error answers, `attempts x tries`
    (s3fs's tries around botocore's) for dropped connections, cut bodies and SlowDown."""

    attempts: int = S3_ATTEMPTS + 1
    tries: int = S3FS_RETRIES

    @property
    def most(self) -> int:
        return self.attempts * self.tries

    def pause(self, made: int) -> float:
        """Seconds to wait after the `made`-th failed attempt: botocore's backoff within
        one of s3fs's tries (a botocore call of `attempts` attempts), s3fs's own pause
        between two of them."""
        within, tries_done = made % self.attempts, made // self.attempts
        if within:
            return backoff(within - 1)
        return min(TRIES_PAUSE_BASE * TRIES_PAUSE_GROWTH ** (tries_done - 1), TRIES_PAUSE_CAP)


def _retry_budget(options: Mapping[str, Any], environ: Mapping[str, str]) -> Optional[RetryBudget]:
    """The options' budget, read as botocore and s3fs read it (`max_attempts` counts the
    retries after the first; botocore rewrites it in place as `total_max_attempts`, which
    counts them all); None where botocore would look elsewhere for it (a mode without a
    number: the environment, the config file; a number without a mode, where the
    environment names a mode other than standard or legacy) or the values are bad (s3fs
    says so)."""
    config = options.get("config_kwargs") or {}
    tries = options.get("retries", S3FS_RETRIES)
    if "retries" not in config:
        attempts = S3_ATTEMPTS + 1  # what io.storage gives botocore
    else:
        retries = config["retries"]
        if (not isinstance(retries, Mapping) or set(retries) - {"mode", "max_attempts", "total_max_attempts"}
                or retries.get("mode", environ.get("AWS_RETRY_MODE") or "legacy") not in ("standard", "legacy")):
            return None
        if "total_max_attempts" in retries:
            attempts = retries["total_max_attempts"]
        elif "max_attempts" in retries:
            attempts = retries["max_attempts"]
            attempts = attempts + 1 if isinstance(attempts, int) else attempts
        else:
            return None
    if not isinstance(attempts, int) or not isinstance(tries, int) or isinstance(tries, bool) or attempts < 1 \
            or tries < 1:
        return None
    return RetryBudget(attempts, tries)


def _credentials(options: Mapping[str, Any], environ: Mapping[str, str]) -> Tuple[bool, Optional[Credentials]]:
    """(whether this client signs as botocore would, the credentials; None: unsigned)."""
    if options.get("anon"):
        return True, None
    key, secret = options.get("key"), options.get("secret")
    if key or secret:
        usable = isinstance(key, str) and isinstance(secret, str) and bool(key and secret)
        return usable, Credentials(key, secret, options.get("token") or "") if usable else None
    key, secret = environ.get("AWS_ACCESS_KEY_ID"), environ.get("AWS_SECRET_ACCESS_KEY")
    if key and secret:
        return True, Credentials(key, secret, environ.get("AWS_SESSION_TOKEN") or environ.get("AWS_SECURITY_TOKEN")
                                 or "")
    return False, None


def _shared_config(environ: Mapping[str, str]) -> Optional[Dict[str, str]]:
    """The shared config file's default profile (the last of its `[default]` and `[profile
    default]` sections, as botocore reads them), or None where it sets anything this client
    does not do as botocore would (an endpoint, addressing style, CA bundle, retries...)."""
    path = os.path.expanduser(os.path.expandvars(environ.get("AWS_CONFIG_FILE") or "~/.aws/config"))
    if not os.path.exists(path):
        return {}
    parser = configparser.RawConfigParser()
    try:
        parser.read(path)
    except (configparser.Error, OSError, UnicodeDecodeError):
        return None
    profile: Dict[str, str] = {}
    for section in parser.sections():
        words = _section_words(section) if section.startswith("profile") else []
        if section == "default" or (len(words) == 2 and words[1] == "default"):
            profile = dict(parser.items(section))
    if any(k not in CONFIG_FILE_KEYS and not k.startswith("cli_") for k in profile):
        return None
    return profile


def _section_words(section: str) -> List[str]:
    """A `profile ...` section's name split as botocore splits it (`profile "default"` too)."""
    try:
        return shlex.split(section)
    except ValueError:
        return []


def _timeout(config: Mapping[str, Any], name: str, default: float) -> Optional[float]:
    value = config.get(name, default)
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0 else None


class DirectS3:
    """Signed read requests to one S3 endpoint; safe to share between threads (each request
    takes a pooled keep-alive connection of its own)."""

    def __init__(self, endpoint: str, region: str, credentials: Optional[Credentials], *, aws: bool = False,
                 budget: RetryBudget = RetryBudget(), ca_bundle: Optional[str] = None,
                 connect_timeout: float = CONNECT_TIMEOUT, read_timeout: float = READ_TIMEOUT,
                 idle_connections: int = IDLE_CONNECTIONS) -> None:
        parts = urlsplit(endpoint)
        self.secure = parts.scheme == "https"
        self.host = parts.hostname or ""
        self.port = parts.port or (443 if self.secure else 80)
        self.region = region
        self.credentials = credentials
        self.aws = aws  # virtual-hosted addressing, regional hosts, redirects to a bucket's region
        self.budget = budget
        self.ca_bundle = ca_bundle or None
        self.connect_timeout, self.read_timeout = connect_timeout, read_timeout
        self.idle_connections = idle_connections
        self._idle: Dict[Tuple[str, int], List[Tuple[http.client.HTTPConnection, float]]] = {}
        self._lock = threading.Lock()
        self._signing_keys: Dict[Tuple[str, str], bytes] = {}
        self._bucket_regions: Dict[str, str] = {}
        self._tls: Optional[ssl.SSLContext] = None

    @property
    def attempts(self) -> int:
        """The most attempts one request can take."""
        return self.budget.most

    @staticmethod
    def serves(bucket: str) -> bool:
        """Whether this client reads from `bucket`: not directory buckets (S3 Express),
        Object Lambda or access point aliases and ARNs, which only botocore addresses."""
        return not _SPECIAL_BUCKET.search(bucket)

    @classmethod
    def from_options(cls, options: Mapping[str, Any],
                     environ: Optional[Mapping[str, str]] = None) -> Optional["DirectS3"]:
        """The client for these s3fs options, or None where one of them (or the environment,
        or the shared config file) asks for something only botocore does."""
        environ = os.environ if environ is None else environ
        direct = options.get("direct_reads", True)
        if not isinstance(direct, bool):
            raise ConfigError(f"storage.direct_reads: must be true or false (got {direct!r})")
        client_kwargs = options.get("client_kwargs") or {}
        config_kwargs = options.get("config_kwargs") or {}
        if (not direct or set(options) - DIRECT_OPTIONS
                or not isinstance(client_kwargs, Mapping) or set(client_kwargs) - DIRECT_CLIENT_KWARGS
                or not isinstance(config_kwargs, Mapping) or set(config_kwargs) - DIRECT_CONFIG_KWARGS
                or any(environ.get(name) for name in DECLINING_VARIABLES)):
            return None
        budget = _retry_budget(options, environ)
        signs, credentials = _credentials(options, environ)
        shared = _shared_config(environ)
        connect_timeout = _timeout(config_kwargs, "connect_timeout", CONNECT_TIMEOUT)
        read_timeout = _timeout(config_kwargs, "read_timeout", READ_TIMEOUT)
        if budget is None or not signs or shared is None or connect_timeout is None or read_timeout is None:
            return None
        region = client_kwargs.get("region_name") or environ.get("AWS_DEFAULT_REGION") or shared.get("region")
        endpoint = (options.get("endpoint_url") or client_kwargs.get("endpoint_url")
                    or environ.get("AWS_ENDPOINT_URL_S3") or environ.get("AWS_ENDPOINT_URL"))
        pool = config_kwargs.get("max_pool_connections", IDLE_CONNECTIONS)
        if not isinstance(pool, int) or isinstance(pool, bool) or pool < 1:
            return None
        settings = dict(budget=budget, ca_bundle=environ.get("AWS_CA_BUNDLE"), connect_timeout=connect_timeout,
                        read_timeout=read_timeout, idle_connections=pool)
        if endpoint:
            parts = urlsplit(str(endpoint))
            if (parts.scheme not in ("http", "https") or not parts.hostname or ":" in parts.hostname
                    or parts.path.strip("/") or parts.query):
                return None  # IPv6 literals, endpoints with a path: botocore's
            return cls(str(endpoint), region or "us-east-1", credentials, **settings)
        if not region or not AWS_REGION_NAME.fullmatch(region):
            return None
        return cls(f"https://s3.{region}.amazonaws.com", region, credentials, aws=True, **settings)

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

    def read_into(self, bucket: str, key: str, start: int, view: memoryview, etag: str = "",
                  cancel: Optional[threading.Event] = None) -> None:
        """Bytes [start, start + len(view)) of the object straight into `view`; with `etag`,
        only from that version of it (412 PreconditionFailed otherwise). Stops between
        attempts once `cancel` is set (raising `Cancelled`)."""
        headers = {"range": f"bytes={start}-{start + len(view) - 1}"}
        if etag:
            headers["if-match"] = etag
        self._call("GET", bucket, key, headers=headers, into=view, start=start, cancel=cancel)

    def list(self, bucket: str, prefix: str, delimiter: str = "/", max_keys: Optional[int] = None,
             page_size: int = 1000) -> Tuple[List[dict], List[str]]:
        """(objects, common prefixes) under `prefix`: every page (of `page_size` entries at
        most; S3 gives 1,000), or about the first `max_keys` entries. Tags are matched
        whatever their XML namespace (servers differ), keys asked for URL-encoded (as
        botocore does: XML cannot carry every key)."""
        objects: List[dict] = []
        prefixes: List[str] = []
        token = None
        seen = set()
        while True:
            query = {"list-type": "2", "prefix": prefix, "max-keys": str(min(max_keys or page_size, page_size)),
                     "encoding-type": "url"}
            if delimiter:
                query["delimiter"] = delimiter
            if token:
                query["continuation-token"] = token
            root = ElementTree.fromstring(self._call("GET", bucket, "", query=query)[2])
            encoded = (root.findtext("{*}EncodingType") or "").lower() == "url"
            decode = unquote_plus if encoded else (lambda text: text)
            for item in root.findall("{*}Contents"):
                objects.append({"Key": decode(item.findtext("{*}Key", "")),
                                "Size": int(item.findtext("{*}Size", "0")),
                                "ETag": item.findtext("{*}ETag", "")})
            prefixes += [decode(p.findtext("{*}Prefix", "")) for p in root.findall("{*}CommonPrefixes")]
            token = root.findtext("{*}NextContinuationToken")
            if root.findtext("{*}IsTruncated") != "true" or not token or (
                    max_keys and len(objects) + len(prefixes) >= max_keys):
                return objects, prefixes
            if token in seen:
                raise S3ResponseError(f"s3://{bucket}/{prefix}", 200, "InvalidListing",
                                      "the listing repeated a continuation token")
            seen.add(token)

    def bucket_exists(self, bucket: str) -> bool:
        try:
            self._call("HEAD", bucket, "")
        except S3NotFound:
            return False
        return True

    # -- one request, with retries -------------------------------------------------------------

    def _call(self, method: str, bucket: str, key: str, *, query: Optional[Dict[str, str]] = None,
              headers: Optional[Dict[str, str]] = None, into: Optional[memoryview] = None, start: int = 0,
              cancel: Optional[threading.Event] = None) -> Tuple[int, Dict[str, str], bytes]:
        """Send one request, again where botocore or s3fs would (see `RetryBudget`), after
        their pause; once more, at once and uncounted, where the server names the bucket's
        region (a redirect, or a "wrong region" answer: on any endpoint, as botocore) and,
        once per attempt, where the connection closes as the request goes, before any
        answer (as aiohttp under s3fs). (status, lowercased headers, body; empty when read
        `into`)."""
        url = f"s3://{bucket}/{key}"
        made, redirected, resent, last = 0, False, False, None
        while True:
            if cancel is not None and cancel.is_set():
                raise Cancelled(url)
            host, path, region = self._address(bucket, key)
            target = quote(path, safe="/~") + ("?" + _canonical_query(query) if query else "")
            signed = self._signed(method, host, path, query or {}, dict(headers or {}), region)
            connection = response = None
            made += 1
            try:
                connection = self._connection(host)
                connection.request(method, target, headers=signed)
                response = connection.getresponse()
                answer = {k.lower(): v for k, v in response.getheaders()}
                if into is not None and response.status in (200, 206):
                    self._read_body_into(url, response, answer, into, start)
                    body = b""
                else:
                    body = response.read()
            except (OSError, http.client.HTTPException) as err:
                if connection is not None:
                    connection.close()
                if response is None and not resent and isinstance(err, CLOSED_UNDER_US):
                    resent, made = True, made - 1  # closed as the request went, no answer begun: not an attempt
                    continue
                resent, last, limit = False, err, self.budget.most
            except BaseException:
                if connection is not None:
                    connection.close()
                raise
            else:
                self._release(host, connection, response)
                if response.status < 300:
                    return response.status, answer, body
                error = _error(url, response.status, body, answer)
                moved = self._named_region(method, error)
                if moved and moved != region and not redirected:
                    self._bucket_regions[bucket] = moved  # the server said where the bucket is: ask there
                    redirected, made = True, made - 1
                    continue
                if not _retryable(error):
                    raise error
                slow_down = error.code == SLOW_DOWN_CODE or SLOW_DOWN_MESSAGE in error.message
                # an error answer ends s3fs's current try (its last error decides whether it tries again)
                resent, last = False, error
                limit = self.budget.most if slow_down else min(self.budget.most, -(-made // self.budget.attempts)
                                                                * self.budget.attempts)
            if made >= limit:
                raise ConnectionError(f"{url}: {method} failed {made} time(s), last: {type(last).__name__}: "
                                      f"{last}") from last
            pause = self.budget.pause(made)
            if cancel is not None:
                if cancel.wait(pause):
                    raise Cancelled(url)
            else:
                time.sleep(pause)

    def _named_region(self, method: str, error: S3ResponseError) -> str:
        """The region a redirect or a "wrong region" answer names for the bucket, where
        botocore follows it ("" if none, or none this client may address: on AWS, one of
        its own partitions' regions)."""
        follows = (error.status in (301, 302, 307) or (method == "HEAD" and error.status == 400)
                   or error.code in ("PermanentRedirect", "AuthorizationHeaderMalformed",
                                     "IllegalLocationConstraintException"))
        if not follows or not error.region:
            return ""
        valid = AWS_REGION_NAME if self.aws else _REGION_LABEL
        return error.region if valid.fullmatch(error.region) else ""

    @staticmethod
    def _read_body_into(url: str, response: http.client.HTTPResponse, answer: Dict[str, str], view: memoryview,
                        start: int) -> None:
        length = answer.get("content-length")
        end = start + len(view)
        if length is not None and int(length) != len(view):  # e.g. a server that ignores Range
            raise unranged_answer(url, start, end, f"{length} bytes")
        filled = 0
        while filled < len(view):
            n = response.readinto(view[filled:])
            if not n and response.chunked:  # it ended cleanly (a cut raises IncompleteRead): whole, but short
                raise short_read(url, start, end, filled)
            if not n:  # cut: the peer closed before Content-Length (or a close-delimited body) was done
                raise ShortBody(f"{url}: the answer ended after {filled} of {len(view)} bytes")
            filled += n
        if length is None and response.read(1):  # a chunked answer: it must end here too
            raise unranged_answer(url, start, end, "more")

    def _address(self, bucket: str, key: str) -> Tuple[str, str, str]:
        """(Host header, path, signing region): on AWS virtual-hosted where the bucket's
        name allows it, at the bucket's region once S3 has named it."""
        if self.aws:
            region = self._bucket_regions.get(bucket, self.region)
            host = f"s3.{region}.amazonaws.com"
            if _VIRTUAL_BUCKET.match(bucket) and "--" not in bucket:
                return f"{bucket}.{host}", f"/{key}", region
            return host, f"/{bucket}/{key}" if key else f"/{bucket}", region
        netloc = self.host if self.port == (443 if self.secure else 80) else f"{self.host}:{self.port}"
        return netloc, f"/{bucket}/{key}" if key else f"/{bucket}", self._bucket_regions.get(bucket, self.region)

    # -- connections ---------------------------------------------------------------------------

    def _connection(self, host: str) -> http.client.HTTPConnection:
        """A live idle keep-alive connection to `host`, else a new one. An idle connection
        the server has closed (its socket reads EOF), or that sat idle past IDLE_SECONDS
        (servers and balancers drop those), is thrown away, not tried."""
        name = self._pool_host(host)
        now = time.monotonic()
        while True:
            with self._lock:
                idle = self._idle.get((name, self.port))
                connection, since = idle.pop() if idle else (None, 0.0)
            if connection is None:
                break
            sock = connection.sock
            if sock is not None and now - since < IDLE_SECONDS and not _readable(sock):
                return connection
            connection.close()
        if self.secure:
            connection = http.client.HTTPSConnection(name, self.port, timeout=self.connect_timeout,
                                                     context=self._tls_context())
        else:
            connection = http.client.HTTPConnection(name, self.port, timeout=self.connect_timeout)
        try:
            connection.connect()
            connection.sock.settimeout(self.read_timeout)
        except BaseException:
            connection.close()  # a failed TLS handshake leaves its TCP socket open otherwise
            raise
        return connection

    def _release(self, host: str, connection: http.client.HTTPConnection, response: http.client.HTTPResponse) -> None:
        """Keep the connection for the next request unless the server is closing it."""
        if response.will_close or not response.isclosed() or connection.sock is None:
            connection.close()
            return
        name = self._pool_host(host)
        now = time.monotonic()
        with self._lock:
            idle = self._idle.setdefault((name, self.port), [])
            idle.append((connection, now))
            while idle and (now - idle[0][1] >= IDLE_SECONDS or len(idle) > self.idle_connections):
                idle.pop(0)[0].close()  # the oldest first: below the top, nothing else would look at them

    def _pool_host(self, host: str) -> str:
        """The host a connection for `host` is opened to: on AWS the virtual host itself
        (TLS names it), elsewhere the endpoint's."""
        return host if self.aws else self.host

    def _tls_context(self) -> ssl.SSLContext:
        """One per client: AWS_CA_BUNDLE's CAs, else certifi's (botocore's), else the system's."""
        with self._lock:
            if self._tls is None:
                cafile = self.ca_bundle
                if cafile is None:
                    try:
                        import certifi

                        cafile = certifi.where()
                    except ImportError:
                        cafile = None
                self._tls = ssl.create_default_context(cafile=cafile)
            return self._tls

    # -- signing (AWS Signature Version 4, unsigned payload digest of an empty body) ---------------

    def _signed(self, method: str, host: str, path: str, query: Dict[str, str], headers: Dict[str, str],
                region: str) -> Dict:
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
        scope = f"{day}/{region}/s3/aws4_request"
        to_sign = "\n".join(["AWS4-HMAC-SHA256", stamp, scope, hashlib.sha256(canonical.encode()).hexdigest()])
        signature = hmac.new(self._signing_key(day, region), to_sign.encode(), hashlib.sha256).hexdigest()
        headers["authorization"] = (f"AWS4-HMAC-SHA256 Credential={self.credentials.key}/{scope}, "
                                    f"SignedHeaders={';'.join(names)}, Signature={signature}")
        return headers

    def _signing_key(self, day: str, region: str) -> bytes:
        key = self._signing_keys.get((day, region))
        if key is None:
            key = ("AWS4" + self.credentials.secret).encode()
            for part in (day, region, "s3", "aws4_request"):
                key = hmac.new(key, part.encode(), hashlib.sha256).digest()
            self._signing_keys[(day, region)] = key
        return key


def _readable(sock) -> bool:
    """Whether an idle socket has something to read: EOF (the server closed it) or bytes
    nobody asked for; either way it is not fit for the next request. poll(), not
    select(), which fails on descriptors past 1024 (a Ray worker may hold that many)."""
    if hasattr(select, "poll"):
        poller = select.poll()
        poller.register(sock, select.POLLIN | select.POLLERR | select.POLLHUP)
        return bool(poller.poll(0))
    return bool(select.select([sock], [], [], 0)[0])


def _canonical_query(query: Dict[str, str]) -> str:
    return "&".join(f"{quote(k, safe='~')}={quote(str(v), safe='~')}" for k, v in sorted(query.items()))


def _retryable(error: S3ResponseError) -> bool:
    return error.status in RETRY_STATUSES or (error.status == 400 and error.code == "RequestTimeout")


def _error(url: str, status: int, body: bytes, headers: Mapping[str, str]) -> S3ResponseError:
    code = message = region = ""
    if body:
        try:
            root = ElementTree.fromstring(body)
            code, message = root.findtext("{*}Code") or "", root.findtext("{*}Message") or ""
            region = root.findtext("{*}Region") or ""
        except ElementTree.ParseError:
            message = body[:200].decode("utf-8", "replace")
    region = headers.get("x-amz-bucket-region") or region
    if status == 404:
        if code == "NoSuchBucket":
            return S3NotFound(url, status, code, f"bucket {url[5:].split('/')[0]!r} does not exist")
        return S3NotFound(url, status, code or "NoSuchKey", message)
    if status == 403:
        return S3AccessDenied(url, status, code or "AccessDenied", message)
    if status == 412:
        code = code or "PreconditionFailed"
    if status in (301, 307) and region:
        message = (message + " " if message else "") + f"(the bucket is in {region}: set client_kwargs.region_name)"
    return S3ResponseError(url, status, code, message, region)


def unranged_answer(url: str, start: int, end: int, answered: str) -> InputError:
    """A ranged read answered with other than the bytes asked for (a server ignoring Range)."""
    return InputError(f"{url}: asked for bytes {start}-{end}, the server answered with {answered} "
                      "(the storage must support ranged reads)")


def short_read(url: str, start: int, end: int, got: int) -> InputError:
    return InputError(f"{url}: short read at bytes {start}-{end} ({got} of {end - start})")


def backoff(attempt: int) -> float:
    """Seconds to wait before retry `attempt + 1` (0: the first retry): botocore's standard
    schedule, uniformly up to 2**attempt s, at most 20 s."""
    return _JITTER.random() * min(2.0**attempt, BACKOFF_CAP)


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
        """An object, a "directory" (a prefix some key starts with), or a bucket (False where
        the bucket cannot be looked at, as s3fs)."""
        bucket, key = split_bucket(url)
        key = key.rstrip("/")
        if not key:
            try:
                return self.client.bucket_exists(bucket)
            except S3ResponseError:
                return False
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
        """The names ("bucket/key") right below a directory, or the object's own name;
        FileNotFoundError if there is neither."""
        if detail:
            raise NotImplementedError("DirectS3Files.ls lists names only")
        bucket, key = split_bucket(url)
        prefix = key.rstrip("/") + "/" if key.strip("/") else ""
        objects, prefixes = self.client.list(bucket, prefix)
        names = [f"{bucket}/{o['Key']}" for o in objects if o["Key"] != prefix]
        names += [f"{bucket}/{p.rstrip('/')}" for p in prefixes]
        if not names and key.strip("/"):
            self.client.head(bucket, key.rstrip("/"))  # FileNotFoundError where there is no such object
            return [f"{bucket}/{key.rstrip('/')}"]
        if not names:
            raise FileNotFoundError(url)
        return sorted(names)
