"""Broken and hostile safetensors headers: only ever our clear InputError, never a crash or hang."""

from __future__ import annotations

import json
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from distmerge.errors import InputError
from distmerge.io.header import MAX_HEADER_BYTES, read_header


def parse(blob: bytes):
    return read_header(lambda a, b: blob[a:b], "x.safetensors", len(blob))


def file_with(header: dict, data: bytes = b"") -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data


GOOD = {"__metadata__": {"format": "pt"}, "w": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]}}


def test_good_header_parses():
    (info,) = parse(file_with(GOOD, bytes(16))).values()
    assert info.shape == (2, 2) and info.start == 8 + len(json.dumps(GOOD)) and info.nbytes == 16


@pytest.mark.parametrize("blob, problem", [
    (b"", "truncated"),
    (struct.pack("<Q", 10**6) + b"{}", "runs past the end"),
    (struct.pack("<Q", MAX_HEADER_BYTES + 1), "over the"),
    (struct.pack("<Q", 4) + b"nope", "not valid JSON"),
    (struct.pack("<Q", 2) + b"[]", "JSON object"),
    (file_with({"w": {"dtype": "F99", "shape": [1], "data_offsets": [0, 4]}}, bytes(4)), "unknown dtype"),
    (file_with({"w": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}, bytes(4)), "non-negative"),
    (file_with({"w": {"dtype": "F32", "shape": [2**62, 2**62], "data_offsets": [0, 4]}}, bytes(4)), "needs"),
    (file_with({"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 400]}}, bytes(4)), "outside the file"),
    (file_with({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}}, bytes(8)), "needs 8"),
    (file_with({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, bytes(12)), "overlap"),
    (file_with({"w": {"dtype": "F32", "shape": [1]}}, bytes(4)), "exactly dtype, shape and data_offsets"),
])
def test_broken_headers_are_named(blob, problem):
    with pytest.raises(InputError, match=problem) as info:
        parse(blob)
    assert "x.safetensors" in str(info.value)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12)


@settings(max_examples=300, deadline=None)
@given(header=st.dictionaries(st.text(max_size=10), json_values, max_size=5), data=st.binary(max_size=64))
def test_random_headers_only_raise_input_error(header, data):
    try:
        parse(file_with(header, data))
    except InputError:
        pass


@settings(max_examples=300, deadline=None)
@given(position=st.integers(0, 200), value=st.integers(0, 255), cut=st.integers(0, 300))
def test_mutated_bytes_only_raise_input_error(position, value, cut):
    blob = bytearray(file_with(GOOD, bytes(16)))
    if position < len(blob):
        blob[position] = value
    try:
        parse(bytes(blob[:cut]))
    except InputError:
        pass
