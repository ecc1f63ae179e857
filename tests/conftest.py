"""Fixtures: one real local Ray for the session (loopback only), and synthetic models."""

from __future__ import annotations

import os

import pytest
import torch

from distmerge.synthetic import LlamaShape, make_models

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")


@pytest.fixture(scope="session")
def ray_local():
    """A real Ray instance bound to 127.0.0.1, shared by the whole test session."""
    import ray

    ray.init(num_cpus=2, object_store_memory=300 * 2**20, include_dashboard=False,
             _node_ip_address="127.0.0.1", logging_level="WARNING", configure_logging=True)
    try:
        yield ray
    finally:
        ray.shutdown()


@pytest.fixture(scope="session")
def model_factory(tmp_path_factory):
    """make(dtype=..., **kwargs) -> [base, ft1, ft2, ft3] directories, cached per arguments."""
    cache = {}

    def make(dtype: torch.dtype = torch.bfloat16, shape: LlamaShape = LlamaShape(), **kwargs):
        key = (dtype, shape, repr(sorted(kwargs.items(), key=str)))
        if key not in cache:
            root = tmp_path_factory.mktemp(f"models-{str(dtype).split('.')[-1]}")
            cache[key] = make_models(str(root), shape=shape, dtype=dtype, **kwargs)
        return cache[key]

    return make
