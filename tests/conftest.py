"""Fixtures: one real local Ray for the session (loopback only), and synthetic models."""

from __future__ import annotations

import pytest
import torch

from distmerge.synthetic import LlamaShape, make_models

from distmerge.engine.session import force_loopback

force_loopback()


@pytest.fixture(scope="session")
def ray_local():
    """A real Ray instance bound to 127.0.0.1, shared by the whole test session."""
    import ray

    force_loopback()
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


class S3Endpoint:
    """A real S3 server on 127.0.0.1 (SeaweedFS, tests/seaweed.py) with a counting,
    fault-injecting proxy in front (tests/s3util.py). `.url`/`.options` go through the
    proxy (what the code under test uses); `.direct`, `filesystem()` and `client()` go
    straight to the server (test set-up and checks, neither counted nor faulted)."""

    def __init__(self) -> None:
        from s3util import S3Proxy
        from seaweed import SeaweedS3

        self.server = SeaweedS3()
        try:
            self.proxy = S3Proxy(self.server.ports["s3.port"])
        except BaseException:
            self.server.stop()
            raise
        self.key, self.secret = self.server.key, self.server.secret
        self.url = f"http://127.0.0.1:{self.proxy.port}"
        self.options = self.server.storage_options(self.url)
        self.direct = self.server.storage_options()

    def filesystem(self, direct: bool = True):
        import s3fs

        return s3fs.S3FileSystem(skip_instance_cache=True, **(self.direct if direct else self.options))

    def client(self):
        return self.server.client()

    def close(self) -> None:
        try:
            self.proxy.close()
        finally:
            self.server.stop()


@pytest.fixture(scope="session")
def s3():
    endpoint = S3Endpoint()
    try:
        yield endpoint
    finally:
        endpoint.close()
