"""The direct S3 read client (io/s3_direct.py) against the real S3 server (SeaweedFS, which
checks every SigV4 signature) and against s3fs's answers to the same questions."""

from __future__ import annotations

import uuid

import numpy as np
import pytest

from distmerge.errors import ConfigError, InputError
from distmerge.io.s3_direct import DirectS3, DirectS3Files, RetryBudget, S3AccessDenied, S3NotFound, _error
from distmerge.io.storage import Storage, s3_error_code
from s3util import error_xml

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
