"""The direct S3 read client (io/s3_direct.py) against the real S3 server (SeaweedFS, which
checks every SigV4 signature) and against s3fs's answers to the same questions."""

from __future__ import annotations

import uuid

import numpy as np
import pytest

from distmerge.errors import InputError
from distmerge.io.s3_direct import DirectS3, DirectS3Files, S3AccessDenied, S3NotFound
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
    ({}, {"AWS_ACCESS_KEY_ID": "k", "AWS_SECRET_ACCESS_KEY": "s", "AWS_REGION": "us-west-2"}, True),
    ({"key": "k", "secret": "s", "retries": 2, "config_kwargs": {"max_pool_connections": 4}}, {"AWS_REGION": "x-1"},
     False),  # not a region of the aws partition: left to botocore
    ({"key": "k", "secret": "s"}, {}, False),  # AWS without a region: botocore finds it
    ({}, {"AWS_REGION": "us-west-2"}, False),  # no static credentials: botocore's chain
    ({"endpoint_url": "http://h:1"}, {"AWS_ACCESS_KEY_ID": "k", "AWS_SECRET_ACCESS_KEY": "s", "AWS_PROFILE": "p"},
     False),
    ({"profile": "p", "endpoint_url": "http://h:1"}, {}, False),
    ({"key": "k", "secret": "s", "endpoint_url": "http://h:1", "client_kwargs": {"verify": False}}, {}, False),
    ({"key": "k", "secret": "s", "endpoint_url": "http://h:1", "config_kwargs": {"s3": {"addressing_style": "x"}}},
     {}, False),
    ({"key": "k", "secret": "s", "endpoint_url": "http://h:1"}, {"HTTPS_PROXY": "http://proxy:3128"}, False),
    ({"key": "k", "secret": "s", "endpoint_url": "http://h:1", "direct_reads": False}, {}, False),
    ({"key": "k", "endpoint_url": "http://h:1"}, {}, False),  # half the credentials: s3fs says what is wrong
    ({"key": "k", "secret": "s", "endpoint_url": "http://h:1", "retries": 0}, {}, False),
], ids=["endpoint", "aws-region", "anon", "env-credentials", "env-region", "other-partition", "aws-no-region",
        "credential-chain", "profile-env", "profile-option", "client-verify", "addressing-style", "proxy",
        "switched-off", "half-credentials", "bad-retries"])
def test_the_direct_client_serves_only_options_it_understands(options, environ, direct):
    assert (DirectS3.from_options(options, environ) is not None) == direct


def test_attempts_follow_botocore_and_s3fs():
    """s3fs's tries x botocore's attempts: `max_attempts` counts retries after the first,
    `total_max_attempts` (what botocore rewrites it into, in place) counts them all."""
    base = {"key": "k", "secret": "s", "endpoint_url": "http://h:1"}
    assert DirectS3.from_options(base, {}).attempts == 3 * 6
    retries = {"mode": "standard", "max_attempts": 2}
    assert DirectS3.from_options({**base, "retries": 2, "config_kwargs": {"retries": retries}}, {}).attempts == 6
    retries = {"mode": "standard", "total_max_attempts": 3}
    assert DirectS3.from_options({**base, "retries": 2, "config_kwargs": {"retries": retries}}, {}).attempts == 6


def test_addressing_is_virtual_hosted_on_aws_and_path_style_elsewhere():
    aws = DirectS3.from_options({"key": "k", "secret": "s"}, {"AWS_REGION": "eu-central-1"})
    assert aws._address("my-bucket", "a/b c") == ("my-bucket.s3.eu-central-1.amazonaws.com", "/a/b c")
    assert aws._address("dotted.bucket", "k") == ("s3.eu-central-1.amazonaws.com", "/dotted.bucket/k")
    other = DirectS3.from_options({"key": "k", "secret": "s", "endpoint_url": "http://127.0.0.1:9000"}, {})
    assert other._address("my-bucket", "k") == ("127.0.0.1:9000", "/my-bucket/k")
    assert other.region == "us-east-1"


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
