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
    """moto's S3 server on 127.0.0.1 with a counting, fault-injecting proxy in front."""

    def __init__(self) -> None:
        import logging

        from moto.server import ThreadedMotoServer

        logging.getLogger("werkzeug").setLevel(logging.WARNING)

        from s3util import S3Proxy, free_port

        self.moto_port = free_port()
        self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.moto_port, verbose=False)
        self.server.start()
        self.proxy = S3Proxy(self.moto_port)
        self.url = f"http://127.0.0.1:{self.proxy.port}"
        self.options = {"endpoint_url": self.url, "key": "testing", "secret": "testing",
                        "client_kwargs": {"region_name": "us-east-1"}}
        self.direct = {**self.options, "endpoint_url": f"http://127.0.0.1:{self.moto_port}"}

    def filesystem(self, direct: bool = True):
        import s3fs

        return s3fs.S3FileSystem(skip_instance_cache=True, **(self.direct if direct else self.options))

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.direct["endpoint_url"], aws_access_key_id="testing",
                            aws_secret_access_key="testing", region_name="us-east-1")

    def close(self) -> None:
        self.proxy.close()
        self.server.stop()


@pytest.fixture(scope="session")
def s3():
    endpoint = S3Endpoint()
    try:
        yield endpoint
    finally:
        endpoint.close()
