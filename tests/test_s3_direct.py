"""The direct S3 read client (io/s3_direct.py) against the real S3 server (SeaweedFS, which
checks every SigV4 signature) and against s3fs's answers to the same questions."""

from __future__ import annotations

import uuid

import numpy as np
import pytest

from distmerge.errors import ConfigError, InputError
from distmerge.io.s3_direct import (DirectS3, DirectS3Files, RetryBudget, S3AccessDenied, S3NotFound, _error,
                                    backoff)
from distmerge.io.storage import Storage, s3_error_code
from s3util import CHUNKED, CHUNKED_SHORT, DROP, error_xml

ODD_KEYS = ["plain.bin", "with space.bin", "plus+equals=amp&.bin", "unicodé/ñame.bin", "tilde~star*quote'.bin",
            "semi;colon,comma(paren).bin"]


@pytest.fixture(scope="module")
def bucket_with_objects(s3):
    bucket = f"d-{uuid.uuid4().hex[:12]}"
    client = s3.client()
    client.create_bucket(Bucket=bucket)
    rng = np.random.default_rng(7)
    objects = {}
    for i, key in enumerate(ODD_KEYS):
        data = rng.integers(0, 256, size=1000 + 37 * i, dtype=np.uint8).tobytes()
        client.put_object(Bucket=bucket, Key=f"dir/{key}", Body=data)
        objects[f"dir/{key}"] = data
    for i in range(5):
        client.put_object(Bucket=bucket, Key=f"many/obj-{i}", Body=bytes([i]) * 10)
    return bucket, objects


@pytest.mark.parametrize("options, environ, direct", [
    ({"key": "k", "secret": "s", "endpoint_url": "http://127.0.0.1:9000"}, {}, True),
    ({"key": "k", "secret": "s", "client_kwargs": {"region_name": "eu-west-1"}}, {}, True),
    ({"anon": True, "endpoint_url": "http://127.0.0.1:9000"}, {}, True),
    ({"endpoint_url": "http://127.0.0.1:9000"}, {"AWS_ACCESS_KEY_ID": "k", "AWS_SECRET_ACCESS_KEY": "s"}, True),
    ({}, {"AWS_ACCESS_KEY_ID": "k", "AWS_SECRET_ACCESS_KEY": "s", "AWS_DEFAULT_REGION": "us-west-2"}, True),
    ({"key": "k", "secret": "s", "client_kwargs": {"region_name": "us-gov-west-1"}}, {}, True),
    ({"key": "k", "secret": "s", "endpoint_url": "http://h:1",
      "config_kwargs": {"connect_timeout": 2, "read_timeout": 30, "max_pool_connections": 4}}, {}, True),
    ({"key": "k", "secret": "s", "client_kwargs": {"region_name": "cn-north-1"}}, {}, False),  # amazonaws.com.cn
    ({"key": "k", "secret": "s"}, {}, False),  # AWS without a region: botocore finds it
    ({"key": "k", "secret": "s"}, {"AWS_REGION": "us-west-2"}, False),  # botocore does not read AWS_REGION
    ({}, {"AWS_DEFAULT_REGION": "us-west-2"}, False),  # no static credentials: botocore's chain
    ({"endpoint_url": "http://h:1"}, {"AWS_ACCESS_KEY_ID": "k", "AWS_SECRET_ACCESS_KEY": "s", "AWS_PROFILE": "p"},
     False),
    ({"profile": "p", "endpoint_url": "http://h:1"}, {}, False),
    ({"key": "k", "secret": "s", "endpoint_url": "http://h:1", "client_kwargs": {"verify": False}}, {}, False),
    ({"key": "k", "secret": "s", "endpoint_url": "http://h:1", "config_kwargs": {"s3": {"addressing_style": "x"}}},
     {}, False),
    ({"key": "k", "secret": "s", "endpoint_url": "http://h:1"}, {"HTTPS_PROXY": "http://proxy:3128"}, False),
    ({"key": "k", "secret": "s", "client_kwargs": {"region_name": "us-east-1"}}, {"AWS_USE_FIPS_ENDPOINT": "true"},
     False),
    ({"key": "k", "secret": "s", "client_kwargs": {"region_name": "us-east-1"}},
     {"AWS_USE_DUALSTACK_ENDPOINT": "true"}, False),
    ({"key": "k", "secret": "s", "endpoint_url": "http://[::1]:9000"}, {}, False),
    ({"key": "k", "secret": "s", "endpoint_url": "http://h:1", "direct_reads": False}, {}, False),
    ({"key": "k", "endpoint_url": "http://h:1"}, {}, False),  # half the credentials: s3fs says what is wrong
    ({"key": "k", "secret": "s", "endpoint_url": "http://h:1", "retries": 0}, {}, False),
    ({"key": "k", "secret": "s", "endpoint_url": "http://h:1", "config_kwargs": {"retries": {"mode": "adaptive",
                                                                                              "max_attempts": 3}}},
     {}, False),
    ({"key": "k", "secret": "s", "endpoint_url": "http://h:1", "config_kwargs": {"retries": {"mode": "standard"}}},
     {}, False),  # botocore takes the number from the environment or the config file
], ids=["endpoint", "aws-region", "anon", "env-credentials", "env-region", "gov-cloud", "timeouts",
        "china", "aws-no-region", "aws-region-variable", "credential-chain", "profile-env", "profile-option",
        "client-verify", "addressing-style", "proxy", "fips", "dual-stack", "ipv6", "switched-off",
        "half-credentials", "bad-retries", "adaptive-retries", "retry-mode-alone"])
def test_the_direct_client_serves_only_options_it_understands(options, environ, direct, tmp_path):
    environ = {"AWS_CONFIG_FILE": str(tmp_path / "no-such-config"), **environ}
    assert (DirectS3.from_options(options, environ) is not None) == direct


def test_the_shared_config_file_is_read_as_botocore_reads_it(tmp_path):
    """Its default profile's region is the signing region where nothing else names one; any
    setting that changes what botocore sends (an endpoint, addressing, CA bundle, retries)
    sends reads through s3fs."""
    config = tmp_path / "config"
    environ = {"AWS_CONFIG_FILE": str(config)}
    options = {"key": "k", "secret": "s"}
    config.write_text("[default]\nregion = eu-north-1\noutput = json\ncli_pager =\n")
    assert DirectS3.from_options(options, environ).region == "eu-north-1"
    assert DirectS3.from_options({**options, "endpoint_url": "http://h:1"}, environ).region == "eu-north-1"
    assert DirectS3.from_options(options, {**environ, "AWS_DEFAULT_REGION": "us-west-2"}).region == "us-west-2"
    for setting in ("endpoint_url = http://h:2", "ca_bundle = /x.pem", "max_attempts = 9", "use_fips_endpoint = true",
                    "s3 =\n  addressing_style = virtual"):
        config.write_text(f"[default]\nregion = eu-north-1\n{setting}\n")
        assert DirectS3.from_options(options, environ) is None, setting
    with pytest.raises(ConfigError, match="storage.direct_reads: must be true or false"):
        DirectS3.from_options({**options, "direct_reads": "false"}, environ)


def test_the_config_files_profile_default_section_counts_and_its_path_expands(tmp_path, monkeypatch):
    """botocore reads `[profile default]` as the default profile too (the later section
    winning), and expands variables in AWS_CONFIG_FILE."""
    config = tmp_path / "config"
    environ = {"AWS_CONFIG_FILE": str(config)}
    options = {"key": "k", "secret": "s"}
    config.write_text("[default]\nregion = eu-north-1\n[profile default]\nregion = us-west-2\n")
    assert DirectS3.from_options(options, environ).region == "us-west-2"
    config.write_text("[profile default]\nregion = us-west-2\n[default]\noutput = json\n[ default ]\nregion = x\n")
    assert DirectS3.from_options(options, environ) is None  # the last section replaces: no region, no AWS host
    for setting in ("endpoint_url = http://127.0.0.1:1", "use_fips_endpoint = true", "s3 =\n  addressing_style = path"):
        for section in ("profile default", 'profile "default"'):
            config.write_text(f"[default]\nregion = eu-north-1\n[{section}]\n{setting}\n")
            assert DirectS3.from_options(options, environ) is None, (section, setting)
    monkeypatch.setenv("DISTMERGE_TEST_CONFIG_DIR", str(tmp_path))
    assert DirectS3.from_options(options, {"AWS_CONFIG_FILE": "$DISTMERGE_TEST_CONFIG_DIR/config"}) is None


def test_attempts_follow_botocore_and_s3fs(tmp_path):
    """botocore's attempts for error answers (`max_attempts` counts retries after the first,
    `total_max_attempts`, what botocore rewrites it into in place, counts them all), times
    s3fs's tries for dropped connections and SlowDown."""
    environ = {"AWS_CONFIG_FILE": str(tmp_path / "none")}
    base = {"key": "k", "secret": "s", "endpoint_url": "http://h:1"}
    assert DirectS3.from_options(base, environ).budget == RetryBudget(6, 3)
    retries = {"mode": "standard", "max_attempts": 2}
    budget = DirectS3.from_options({**base, "retries": 2, "config_kwargs": {"retries": retries}}, environ).budget
    assert (budget.attempts, budget.most) == (3, 6)
    retries = {"mode": "legacy", "total_max_attempts": 3}
    assert DirectS3.from_options({**base, "retries": 2, "config_kwargs": {"retries": retries}}, environ).attempts == 6


def test_retries_wait_as_botocore_and_s3fs_wait():
    """Within one botocore call (`attempts` attempts), botocore's standard backoff: uniform
    up to 1 s, 2 s, 4 s ... at most 20 s; between s3fs's tries of it, s3fs's own pause
    (0.1 s, then 1.7 times longer each time)."""
    budget = RetryBudget(attempts=3, tries=3)
    samples = [[budget.pause(made) for made in range(1, 9)] for _ in range(400)]
    firsts, seconds = [s[0] for s in samples], [s[1] for s in samples]
    assert 0 <= min(firsts) and max(firsts) <= 1 < max(seconds) <= 2
    assert all(s[2] == pytest.approx(0.1) and s[5] == pytest.approx(0.17) for s in samples)
    assert max(s[3] for s in samples) <= 1 and max(s[7] for s in samples) <= 2
    late = [backoff(9) for _ in range(400)]
    assert max(late) <= 20 < 2**9 and max(late) > 10


def test_addressing_is_virtual_hosted_on_aws_and_path_style_elsewhere(tmp_path):
    environ = {"AWS_CONFIG_FILE": str(tmp_path / "none"), "AWS_DEFAULT_REGION": "eu-central-1"}
    aws = DirectS3.from_options({"key": "k", "secret": "s"}, environ)
    assert aws._address("my-bucket", "a/b c") == ("my-bucket.s3.eu-central-1.amazonaws.com", "/a/b c", "eu-central-1")
    assert aws._address("dotted.bucket", "k") == ("s3.eu-central-1.amazonaws.com", "/dotted.bucket/k", "eu-central-1")
    other = DirectS3.from_options({"key": "k", "secret": "s", "endpoint_url": "http://127.0.0.1:9000"}, environ)
    assert other._address("my-bucket", "k") == ("127.0.0.1:9000", "/my-bucket/k", "eu-central-1")
    https = DirectS3.from_options({"key": "k", "secret": "s", "endpoint_url": "https://minio.lan"}, environ)
    assert https._address("b", "") == ("minio.lan", "/b", "eu-central-1")


def test_a_redirect_names_the_buckets_region_and_is_followed_there(tmp_path):
    """S3 answers a request sent to the wrong region with a 301 (or a 400) naming the
    bucket's region, in a header or in the body; the client asks there from then on.
    (Only the answer's reading and the addressing are checked: no AWS host is reachable here.)"""
    moved = _error("s3://b/k", 301, b"", {"x-amz-bucket-region": "ap-south-1"})
    assert moved.region == "ap-south-1" and "the bucket is in ap-south-1" in str(moved)
    body = error_xml("AuthorizationHeaderMalformed", "the region 'us-east-1' is wrong; expecting 'eu-west-3'")
    body = body.replace(b"</Error>", b"<Region>eu-west-3</Region></Error>")
    assert _error("s3://b/k", 400, body, {}).region == "eu-west-3"
    aws = DirectS3.from_options({"key": "k", "secret": "s"}, {"AWS_CONFIG_FILE": str(tmp_path / "none"),
                                                             "AWS_DEFAULT_REGION": "us-east-1"})
    aws._bucket_regions["b-elsewhere"] = "ap-south-1"
    assert aws._address("b-elsewhere", "k") == ("b-elsewhere.s3.ap-south-1.amazonaws.com", "/k", "ap-south-1")


def test_reads_of_odd_keys_match_the_objects(s3, bucket_with_objects):
    """Keys with spaces, reserved and non-ASCII characters are signed and addressed as S3
    expects (the server checks each signature): whole objects, ranges, and reads into a buffer."""
    bucket, objects = bucket_with_objects
    client = DirectS3.from_options(s3.options, {})
    for key, data in objects.items():
        assert client.get(bucket, key) == data
        assert client.get(bucket, key, 10, 500) == data[10:500]
        assert client.get(bucket, key, 990) == data[990:]
        view = memoryview(bytearray(300))
        client.read_into(bucket, key, 100, view, etag=client.head(bucket, key)["ETag"].strip('"'))
        assert bytes(view) == data[100:400]


def test_metadata_answers_match_s3fs(s3, bucket_with_objects):
    """What model planning asks (info, exists, ls, cat_file), answered as s3fs answers it."""
    bucket, objects = bucket_with_objects
    ours = DirectS3Files(DirectS3.from_options(s3.options, {}))
    theirs = s3.filesystem(direct=False)
    for key in objects:
        url = f"s3://{bucket}/{key}"
        mine, reference = ours.info(url), theirs.info(url)
        assert (mine["size"], mine["ETag"]) == (reference["size"], reference["ETag"])
        assert ours.cat_file(url, 3, 77) == theirs.cat_file(url, start=3, end=77)
    for path in ("dir", "dir/", "dir/unicodé", "many", "many/obj-3", "dir/nothing", "nowhere", ""):
        url = f"s3://{bucket}/{path}"
        assert ours.exists(url) == theirs.exists(url), path
    for path in ("dir", "many", "dir/unicodé"):
        url = f"s3://{bucket}/{path}"
        assert ours.ls(url) == sorted(theirs.ls(url, detail=False, refresh=True)), path
    assert not ours.exists(f"s3://no-such-bucket-{uuid.uuid4().hex[:8]}/x")
    with pytest.raises(FileNotFoundError):
        ours.ls(f"s3://{bucket}/nowhere")


def test_listings_follow_pagination(s3, bucket_with_objects):
    bucket, _ = bucket_with_objects
    client = DirectS3.from_options(s3.options, {})
    objects, prefixes = client.list(bucket, "many/", page_size=2)
    assert [o["Key"] for o in objects] == [f"many/obj-{i}" for i in range(5)] and not prefixes
    objects, prefixes = client.list(bucket, "", page_size=1)
    assert not objects and prefixes == ["dir/", "many/"]


def test_errors_carry_the_s3_code_and_name_the_object(s3, bucket_with_objects):
    bucket, objects = bucket_with_objects
    client = DirectS3.from_options(s3.options, {})
    key = next(iter(objects))
    with pytest.raises(S3NotFound, match="dir/missing"):
        client.get(bucket, "dir/missing")
    with pytest.raises(S3NotFound, match="does not exist"):
        client.list(f"no-such-bucket-{uuid.uuid4().hex[:8]}", "")
    with pytest.raises(OSError) as info:
        client.read_into(bucket, key, 0, memoryview(bytearray(10)), etag="0123456789abcdef0123456789abcdef")
    assert s3_error_code(info.value) == "PreconditionFailed"
    wrong = DirectS3.from_options({**s3.options, "secret": "not-the-secret"}, {})
    with pytest.raises(S3AccessDenied) as info:
        wrong.get(bucket, key)
    assert "not-the-secret" not in str(info.value)


def test_throttling_is_retried_and_an_exhausted_budget_names_the_last_error(s3, bucket_with_objects):
    from distmerge.io.remote import read_remote_many

    bucket, objects = bucket_with_objects
    key, data = next(iter(objects.items()))
    answered = []

    def slow_down(method, path, headers):
        answered.append(path)
        return (503, error_xml("SlowDown", "Please reduce your request rate.")) if len(answered) <= 2 else None

    s3.proxy.fault = slow_down
    try:
        got = read_remote_many(Storage(s3.options), [(f"s3://{bucket}/{key}", 5, 600, "")])
        assert bytes(got[0]) == data[5:600] and len(answered) == 3
        s3.proxy.fault = lambda method, path, headers: (503, error_xml("SlowDown", "Slow down."))
        options = {**s3.options, "retries": 1, "config_kwargs": {"retries": {"max_attempts": 1}}}
        with pytest.raises(InputError, match=r"plain.bin: reading bytes 5-600 failed: .*GET failed 2 time\(s\), "
                                             r"last: S3ResponseError: .*SlowDown"):
            read_remote_many(Storage(options), [(f"s3://{bucket}/{key}", 5, 600, "")])
    finally:
        s3.proxy.fault = None


def test_pooled_connections_the_server_closed_are_not_tried(s3, bucket_with_objects):
    """Idle keep-alive connections whose other end has gone (their socket reads EOF), or
    that sat idle too long, are dropped before use: with a budget of one attempt, reads
    after them still succeed."""
    import socket

    from distmerge.io import s3_direct

    bucket, objects = bucket_with_objects
    client = DirectS3.from_options({**s3.options, "retries": 1, "config_kwargs": {"retries": {"max_attempts": 0}}}, {})
    assert client.attempts == 1
    keys = list(objects)
    for key in keys:
        client.get(bucket, key, 0, 10)
    pooled = [conn for idle in client._idle.values() for conn, _ in idle]
    assert pooled
    for conn in pooled:  # as if the server had closed them: what the client reads next is EOF
        conn.sock.shutdown(socket.SHUT_RD)
    for key in keys:
        assert client.get(bucket, key, 0, 10) == objects[key][:10]
    saved = s3_direct.IDLE_SECONDS
    s3_direct.IDLE_SECONDS = 0.0  # every pooled connection is now too old to trust
    try:
        s3.proxy.fault = lambda method, path, headers: (400, error_xml("Used", "a stale connection was used"))
        reused = [conn for idle in client._idle.values() for conn, _ in idle]
        assert reused
        with pytest.raises(OSError, match="Used"):  # the fault answers: a new connection got through
            client.get(bucket, keys[0], 0, 10)
        assert all(conn.sock is None for conn in reused)
    finally:
        s3_direct.IDLE_SECONDS = saved
        s3.proxy.fault = None


def test_listings_in_another_namespace_with_encoded_keys(s3, bucket_with_objects):
    """Google Cloud Storage's XML API answers listings in its own namespace; keys come
    URL-encoded when asked (`encoding-type=url`, as botocore asks)."""
    bucket, _ = bucket_with_objects
    listing = (b'<?xml version="1.0" encoding="UTF-8"?><ListBucketResult xmlns="http://doc.s3.amazonaws.com/2006-03-01">'
               b"<Name>b</Name><Prefix>m/</Prefix><EncodingType>url</EncodingType><IsTruncated>false</IsTruncated>"
               b"<Contents><Key>m/config.json</Key><Size>3</Size><ETag>&quot;x&quot;</ETag></Contents>"
               b"<Contents><Key>m/with%20space%2Bplus.bin</Key><Size>3</Size><ETag>&quot;y&quot;</ETag></Contents>"
               b"<CommonPrefixes><Prefix>m/sub%20dir/</Prefix></CommonPrefixes></ListBucketResult>")
    seen = []

    def gcs_listing(method, path, headers):
        if method == "GET" and "list-type=2" in path:
            seen.append(path)
            return 200, listing
        return None

    s3.proxy.fault = gcs_listing
    try:
        names = DirectS3Files(DirectS3.from_options(s3.options, {})).ls(f"s3://{bucket}/m")
    finally:
        s3.proxy.fault = None
    assert names == [f"{bucket}/m/config.json", f"{bucket}/m/sub dir", f"{bucket}/m/with space+plus.bin"]
    assert "encoding-type=url" in seen[0]


def test_the_first_failure_of_a_read_stops_the_others(s3, bucket_with_objects):
    """A read of many chunks where one object changed (412; its chunks are fetched first,
    in URL order) and another is answered 500 every time: the 412 is what the caller
    hears at once, and the other chunks stop instead of spending their retries."""
    from distmerge.io import remote

    bucket, objects = bucket_with_objects
    (changed, data), (throttled, other) = list(objects.items())[:2]
    hits = []

    def fault(method, path, headers):
        if method == "GET" and quote_key(throttled) in path:
            hits.append(path)
            return 503, error_xml("InternalError", "We encountered an internal error.")
        return None

    s3.proxy.fault = fault
    saved = remote.CHUNK_BYTES
    remote.CHUNK_BYTES = 64  # many chunks of the throttled object
    try:
        with pytest.raises(InputError, match="changed since the merge was planned"):
            remote.read_remote_many(Storage(s3.options), [
                (f"s3://{bucket}/{throttled}", 0, len(other), ""),
                (f"s3://{bucket}/{changed}", 0, len(data), "0123456789abcdef0123456789abcdef")])
        settled = len(hits)
    finally:
        remote.CHUNK_BYTES = saved
        s3.proxy.fault = None
    assert changed < throttled
    assert settled < -(-len(other) // 64), settled  # fewer than one attempt per chunk


def test_metadata_answers_for_objects_and_unreadable_buckets(s3, bucket_with_objects):
    """`ls` of an object is the object's name, as s3fs; `exists` of a bucket that may not
    be looked at is False, as s3fs."""
    bucket, objects = bucket_with_objects
    files = DirectS3Files(DirectS3.from_options(s3.options, {}))
    key = next(iter(objects))
    assert files.ls(f"s3://{bucket}/{key}") == [f"{bucket}/{key}"]
    s3.proxy.fault = lambda method, path, headers: (403, b"") if method == "HEAD" else None
    try:
        assert files.exists(f"s3://{bucket}") is False
    finally:
        s3.proxy.fault = None


def quote_key(key: str) -> str:
    from urllib.parse import quote

    return quote(key, safe="/~")


def _scope_region(headers) -> str:
    import re

    return re.search(r"Credential=[^/]+/\d+/([^/]+)/", headers.get("Authorization", "")).group(1)


def test_a_wrong_region_answer_is_followed_on_any_endpoint(s3, bucket_with_objects, tmp_path):
    """A server configured for a region answers requests signed for another with 400
    AuthorizationHeaderMalformed naming it (a HEAD: with x-amz-bucket-region); as botocore,
    the client signs for that region from then on, at the same endpoint, without spending
    an attempt. A region that is no region name is not followed."""
    bucket, objects = bucket_with_objects
    key, data = next(iter(objects.items()))
    seen = []

    def wants_eu_west_3(method, path, headers):
        region = _scope_region(headers)
        seen.append((method, region))
        if region == "eu-west-3":
            return None
        if method == "HEAD":
            return 400, b"", {"x-amz-bucket-region": "eu-west-3"}
        body = error_xml("AuthorizationHeaderMalformed", f"the region '{region}' is wrong; expecting 'eu-west-3'")
        return 400, body.replace(b"</Error>", b"<Region>eu-west-3</Region></Error>")

    options = {**s3.options, "retries": 1, "config_kwargs": {"retries": {"max_attempts": 0}}}
    environ = {"AWS_CONFIG_FILE": str(tmp_path / "none")}
    s3.proxy.fault = wants_eu_west_3
    try:
        client = DirectS3.from_options(options, environ)
        assert client.attempts == 1 and client.region == "us-east-1"
        assert client.get(bucket, key, 0, 10) == data[:10]
        assert client.head(bucket, key)["size"] == len(data)
        assert seen == [("GET", "us-east-1"), ("GET", "eu-west-3"), ("HEAD", "eu-west-3")]
        seen.clear()
        assert DirectS3.from_options(options, environ).head(bucket, key)["size"] == len(data)
        assert seen == [("HEAD", "us-east-1"), ("HEAD", "eu-west-3")]
        s3.proxy.fault = lambda method, path, headers: (400, error_xml("InvalidArgument", "no")
                                                        .replace(b"</Error>", b"<Region>eu-west-3</Region></Error>"))
        with pytest.raises(OSError, match="InvalidArgument"):  # not a redirect: botocore does not follow it
            DirectS3.from_options(options, environ).get(bucket, key, 0, 10)
        s3.proxy.fault = lambda method, path, headers: (400, error_xml("AuthorizationHeaderMalformed", "wrong")
                                                        .replace(b"</Error>", b"<Region>evil.host/x</Region></Error>"))
        with pytest.raises(OSError, match="AuthorizationHeaderMalformed"):
            DirectS3.from_options(options, environ).get(bucket, key, 0, 10)
    finally:
        s3.proxy.fault = None


def test_a_connection_closed_as_the_request_goes_is_sent_again_uncounted(s3, bucket_with_objects, tmp_path):
    """A connection the server closes just as a request is sent on it (a keep-alive one
    past the server's idle timeout, a balancer's drop) costs no attempt: the request goes
    again at once on a new one, once per attempt, as aiohttp does under s3fs."""
    bucket, objects = bucket_with_objects
    key, data = next(iter(objects.items()))
    options = {**s3.options, "retries": 1, "config_kwargs": {"retries": {"max_attempts": 0}}}
    environ = {"AWS_CONFIG_FILE": str(tmp_path / "none")}
    client = DirectS3.from_options(options, environ)
    assert client.get(bucket, key, 0, 10) == data[:10]  # leaves its connection in the pool
    dropped = []

    def drop_once(method, path, headers):
        if not dropped:
            dropped.append(path)
            return DROP
        return None

    s3.proxy.fault = drop_once
    try:
        assert client.get(bucket, key, 10, 20) == data[10:20]
        assert len(dropped) == 1
        s3.proxy.fault = lambda method, path, headers: DROP
        s3.proxy.reset()
        with pytest.raises(ConnectionError, match=r"GET failed 1 time\(s\), last: RemoteDisconnected"):
            DirectS3.from_options(options, environ).get(bucket, key, 0, 10)
        assert len(s3.proxy.requests) == 2
    finally:
        s3.proxy.fault = None


def test_chunked_answers_are_read_whole_and_a_short_one_fails_at_once(s3, bucket_with_objects, tmp_path):
    bucket, objects = bucket_with_objects
    key, data = next(iter(objects.items()))
    client = DirectS3.from_options(s3.options, {"AWS_CONFIG_FILE": str(tmp_path / "none")})
    view = memoryview(bytearray(600))
    s3.proxy.fault = lambda method, path, headers: CHUNKED
    try:
        client.read_into(bucket, key, 5, view)
        assert bytes(view) == data[5:605]
        s3.proxy.fault = lambda method, path, headers: CHUNKED_SHORT
        s3.proxy.reset()
        with pytest.raises(InputError, match=r"short read at bytes 5-605 \(300 of 600\)"):
            client.read_into(bucket, key, 5, view)
        assert len(s3.proxy.requests) == 1  # not retried: the answer was whole, and wrong
    finally:
        s3.proxy.fault = None


def test_idle_connections_are_capped_and_the_oldest_reaped(s3, bucket_with_objects, tmp_path, monkeypatch):
    """Keep-alive connections left idle after a burst: at most `max_pool_connections` are
    kept, and once the oldest have sat idle too long they are closed, even while newer
    ones are in use."""
    from concurrent.futures import ThreadPoolExecutor

    from distmerge.io import s3_direct

    bucket, objects = bucket_with_objects
    keys = list(objects) * 4
    environ = {"AWS_CONFIG_FILE": str(tmp_path / "none")}
    capped = DirectS3.from_options({**s3.options, "config_kwargs": {"max_pool_connections": 2}}, environ)
    with ThreadPoolExecutor(8) as pool:
        assert list(pool.map(lambda k: capped.get(bucket, k, 0, 10), keys)) == [objects[k][:10] for k in keys]
    assert sum(map(len, capped._idle.values())) <= 2
    client = DirectS3.from_options(s3.options, environ)
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda k: client.get(bucket, k, 0, 10), keys))
    idle = [conn for conns in client._idle.values() for conn, _ in conns]
    assert len(idle) > 1
    monkeypatch.setattr(s3_direct, "IDLE_SECONDS", 0.2)
    import time

    time.sleep(0.3)
    assert client.get(bucket, keys[0], 0, 10) == objects[keys[0]][:10]
    assert sum(map(len, client._idle.values())) == 1
    assert all(conn.sock is None for conn in idle[:-1])


def test_directory_buckets_and_arns_are_read_through_s3fs(s3, bucket_with_objects):
    """S3 Express directory buckets, Object Lambda and access point aliases and ARNs need
    botocore's endpoints and sessions: their reads go through s3fs, others' still direct,
    also within one fetch."""
    from distmerge.io.remote import read_remote_many

    assert DirectS3.serves("models") and DirectS3.serves("my--bucket")
    for name in ("models--usw2-az1--x-s3", "ap--use1-az4--xa-s3", "ap--ol-s3", "ap--op-s3",
                 "arn:aws:s3:us-west-2:123456789012:accesspoint/a"):
        assert not DirectS3.serves(name), name
    storage = Storage(s3.options)
    assert not isinstance(storage.read_filesystem("s3://models--usw2-az1--x-s3/k"), DirectS3Files)
    bucket, objects = bucket_with_objects
    assert isinstance(storage.read_filesystem(f"s3://{bucket}/k"), DirectS3Files)
    special = f"{bucket}--ol-s3"  # not --x-s3: botocore would ask SeaweedFS for a session
    s3.client().create_bucket(Bucket=special)
    key, data = next(iter(objects.items()))
    s3.client().put_object(Bucket=special, Key=key, Body=data)
    agents = []
    s3.proxy.fault = lambda method, path, headers: agents.append((path.split("/")[1], headers.get("User-Agent", "")))
    try:
        got = read_remote_many(storage, [(f"s3://{special}/{key}", 0, 100, ""), (f"s3://{bucket}/{key}", 0, 100, "")])
    finally:
        s3.proxy.fault = None
    assert [bytes(g) for g in got] == [data[:100], data[:100]]
    assert {name for name, agent in agents if "Botocore" in agent} == {special}
    assert {name for name, agent in agents if "Botocore" not in agent} == {bucket}
