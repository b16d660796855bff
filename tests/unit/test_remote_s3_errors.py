"""S3ObjectStore without a server: client configuration and error mapping (botocore Stubber)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from botocore.exceptions import (
    ConnectTimeoutError,
    EndpointConnectionError,
    NoCredentialsError,
    ReadTimeoutError,
)
from botocore.stub import Stubber

from storage import (
    ObjectNotFound,
    PermanentStorageError,
    StorageError,
    StorageSettings,
    TransientStorageError,
)
from storage.objectstore import S3ObjectStore, open_object_store

pytestmark = pytest.mark.timeout(30)

ACCESS = "AKIAEXAMPLEACCESS123"
SECRET = "very-secret-value-0123456789"


@pytest.fixture
def env(monkeypatch: pytest.MonkeyPatch) -> None:
    for k in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", ACCESS)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")


@pytest.fixture
def store(env: None) -> Iterator[S3ObjectStore]:
    s = open_object_store("s3://bkt/some/prefix/", settings=StorageSettings())
    assert isinstance(s, S3ObjectStore)
    yield s
    s.close()


def test_client_config(store: S3ObjectStore) -> None:
    cfg = store._client.meta.config
    assert cfg.connect_timeout == 5.0 and cfg.read_timeout == 30.0
    assert cfg.retries["total_max_attempts"] == 1
    assert cfg.s3["addressing_style"] == "path"
    assert cfg.max_pool_connections >= 10
    assert store.endpoint_url == "http://127.0.0.1:9"
    assert store.bucket == "bkt" and store._key("a/b") == "some/prefix/a/b"


def test_aws_endpoint_uses_auto_addressing(monkeypatch: pytest.MonkeyPatch, env: None) -> None:
    monkeypatch.delenv("AWS_ENDPOINT_URL")
    s = S3ObjectStore("s3://bkt")
    assert s._client.meta.config.s3["addressing_style"] == "auto"
    assert "amazonaws.com" in s.endpoint_url
    s.close()


def test_rejects_credentials_in_url(env: None) -> None:
    with pytest.raises(ValueError, match="credentials"):
        S3ObjectStore("s3://user:pw@bkt/x")


def _client_error(stub: Stubber, method: str, code: str, status: int) -> None:
    stub.add_client_error(method, service_error_code=code, http_status_code=status)


@pytest.mark.parametrize(
    ("code", "status", "kind"),
    [
        ("AccessDenied", 403, PermanentStorageError),
        ("InvalidAccessKeyId", 403, PermanentStorageError),
        ("SignatureDoesNotMatch", 403, PermanentStorageError),
        ("NoSuchBucket", 404, PermanentStorageError),
        ("SlowDown", 503, TransientStorageError),
        ("InternalError", 500, TransientStorageError),
        ("RequestTimeout", 400, TransientStorageError),
        ("BadDigest", 400, TransientStorageError),
        ("Weird", 502, TransientStorageError),
        ("NoSuchKey", 404, ObjectNotFound),
        ("InvalidArgument", 400, PermanentStorageError),
    ],
)
def test_client_error_mapping(
    store: S3ObjectStore, code: str, status: int, kind: type[StorageError]
) -> None:
    with Stubber(store._client) as stub:
        _client_error(stub, "get_object", code, status)
        with pytest.raises(kind) as ei:
            store.get_bytes("k")
    text = str(ei.value)
    assert "s3://bkt/some/prefix/k" in text
    assert ACCESS not in text and SECRET not in text


@pytest.mark.parametrize(
    ("exc", "kind"),
    [
        (EndpointConnectionError(endpoint_url="http://127.0.0.1:9"), TransientStorageError),
        (ConnectTimeoutError(endpoint_url="http://127.0.0.1:9"), TransientStorageError),
        (ReadTimeoutError(endpoint_url="http://127.0.0.1:9"), TransientStorageError),
        (ConnectionResetError(104, "reset"), TransientStorageError),
        (NoCredentialsError(), PermanentStorageError),
    ],
)
def test_transport_error_mapping(
    store: S3ObjectStore, monkeypatch: pytest.MonkeyPatch, exc: Exception, kind: type[Exception]
) -> None:
    def boom(**_: Any) -> Any:
        raise exc

    monkeypatch.setattr(store._client, "head_object", boom)
    with pytest.raises(kind):
        store.head("k")


def test_head_missing_is_none(store: S3ObjectStore) -> None:
    with Stubber(store._client) as stub:
        _client_error(stub, "head_object", "404", 404)
        assert store.head("k") is None


@pytest.mark.parametrize(("code", "status"), [("NotImplemented", 501), ("InvalidArgument", 400)])
def test_if_none_match_fallback(store: S3ObjectStore, code: str, status: int) -> None:
    with Stubber(store._client) as stub:
        _client_error(stub, "put_object", code, status)
        _client_error(stub, "head_object", "404", 404)
        stub.add_response("put_object", {"ETag": '"x"'})
        assert store.put_bytes("m", b"1", if_none_match=True)
        # Remembered: no conditional attempt the second time; HEAD says it exists.
        stub.add_response("head_object", {"ContentLength": 1})
        assert not store.put_bytes("m", b"2", if_none_match=True)
        stub.assert_no_pending_responses()
    assert store._inm_supported is False


def test_if_none_match_precondition_failed(store: S3ObjectStore) -> None:
    with Stubber(store._client) as stub:
        _client_error(stub, "put_object", "PreconditionFailed", 412)
        assert not store.put_bytes("m", b"1", if_none_match=True)


def test_preflight_missing_bucket(store: S3ObjectStore) -> None:
    with Stubber(store._client) as stub:
        _client_error(stub, "head_bucket", "404", 404)
        with pytest.raises(PermanentStorageError, match="'bkt' does not exist"):
            store.preflight()


def test_abort_failure_does_not_mask_original(store: S3ObjectStore, tmp_path: Any) -> None:
    p = tmp_path / "f"
    p.write_bytes(b"x" * 100)
    small = S3ObjectStore(
        "s3://bkt/p",
        settings=StorageSettings(
            remote_part_size=40, remote_multipart_threshold=40, remote_concurrency=1
        ),
    )
    with Stubber(small._client) as stub:
        stub.add_response("create_multipart_upload", {"UploadId": "u1"})
        _client_error(stub, "upload_part", "InternalError", 500)
        _client_error(stub, "abort_multipart_upload", "InternalError", 500)
        with pytest.raises(TransientStorageError, match="InternalError"):
            small.put_file("k", str(p), size=100)
