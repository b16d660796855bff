"""Object stores behind one small protocol: S3 through boto3, everything else through fsspec.

The remote snapshot tier (`storage.remote`) needs only a handful of operations on flat keys
relative to the mirror URL's prefix: upload a local file (verifying its bytes against an expected
checksum while reading it, so a file that rotted on disk is never shipped), put small objects
with an optional put-if-absent, stream an object into a writable file, head, list, delete, and
abort stale multipart uploads.

`S3ObjectStore` talks to S3 with boto3 directly because the tier needs control that higher-level
helpers hide: one thread-safe client with explicit connect/read timeouts and no hidden retries
(the mirror retries, in one layer), multipart uploads with SHA-256 per-part checksums that the
server validates, `abort_multipart_upload` on every failure, and `If-None-Match: *` on the
manifest so two writers cannot both commit the same step. Endpoint and credentials come from the
standard AWS chain (environment, profiles, `AWS_ENDPOINT_URL`), so AWS, MinIO, SeaweedFS and R2
all work. Errors are mapped onto `TransientStorageError` (worth retrying) and
`PermanentStorageError` (report at once); messages name the bucket, never the credentials.

`FsspecObjectStore` serves every other URL (`file://`, `memory://`, gcs, ...). Put-if-absent is
emulated there (an exclusive link on local disks, exists-then-write elsewhere) and the weaker
guarantee is logged.
"""

from __future__ import annotations

import base64
import builtins
import collections
import contextlib
import errno
import hashlib
import os
import secrets
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from typing import Any, BinaryIO, Protocol, runtime_checkable
from urllib.parse import urlparse

import structlog

from storage.errors import (
    CorruptSnapshot,
    ObjectNotFound,
    PermanentStorageError,
    StorageError,
    TransientStorageError,
)
from storage.settings import StorageSettings

log = structlog.get_logger("storage.objectstore")

Progress = Callable[[int], None]
"""Called with the number of bytes just transferred (a delta), from the calling thread."""

# S3 limits: at most 10,000 parts; every part but the last at least 5 MiB on AWS.
_MAX_PARTS = 10_000
_STREAM_CHUNK = 1024 * 1024



def _copy_bounded(
    read: Callable[[int], bytes],
    chunk: int,
    writable: Writable,
    key: str,
    expected_size: int,
    progress: Progress | None,
) -> int:
    """Stream `read` into `writable` until EOF; CorruptSnapshot as soon as it exceeds the size.

    Returns the byte count; a short count is the caller's to judge (transient or corrupt).
    """
    got = 0
    while True:
        data = read(chunk)
        if not data:
            return got
        got += len(data)
        if got > expected_size:
            raise CorruptSnapshot(f"{key}: larger than expected {expected_size} bytes")
        writable.write(data)
        if progress is not None:
            progress(len(data))

class Writable(Protocol):
    def write(self, data: bytes | bytearray | memoryview, /) -> int: ...


@runtime_checkable
class ObjectStore(Protocol):
    """Flat keys (``a/b/c``) relative to the store's URL prefix."""

    url: str

    def put_file(
        self,
        key: str,
        local_path: str,
        *,
        size: int,
        expected_sha256: str | None = None,
        progress: Progress | None = None,
    ) -> None:
        """Upload a local file of `size` bytes. With `expected_sha256` (hex), the bytes read are
        hashed and a mismatch raises `CorruptSnapshot` before the object becomes visible."""
        ...

    def put_bytes(self, key: str, data: bytes, *, if_none_match: bool = False) -> bool:
        """Write a small object. With `if_none_match`, False means it already existed."""
        ...

    def get_into(
        self, key: str, writable: Writable, *, expected_size: int, progress: Progress | None = None
    ) -> None:
        """Stream the object, in order, into `writable.write`; a size other than
        `expected_size` raises `CorruptSnapshot`, a missing object `ObjectNotFound`."""
        ...

    def get_bytes(self, key: str) -> bytes:
        """The whole object (small objects only); `ObjectNotFound` when missing."""
        ...

    def head(self, key: str) -> int | None:
        """The object's size, or None when it does not exist."""
        ...

    def list(self, prefix: str) -> builtins.list[tuple[str, int]]:
        """(key, size) of every object whose key starts with `prefix`, sorted by key."""
        ...

    def delete(self, keys: builtins.list[str]) -> None:
        """Delete the keys (missing keys are fine), in the given order."""
        ...

    def abort_incomplete_uploads(self, prefix: str = "", *, older_than_s: float = 0.0) -> int:
        """Abort multipart uploads under `prefix` started more than `older_than_s` ago."""
        ...

    def preflight(self) -> None:
        """Check the store is reachable and writable; `PermanentStorageError` if it never will be."""
        ...


def open_object_store(url: str, *, settings: StorageSettings | None = None) -> ObjectStore:
    """`S3ObjectStore` for ``s3://bucket/prefix``, `FsspecObjectStore` for any other URL."""
    settings = settings or StorageSettings.from_env()
    scheme = urlparse(url).scheme.lower()
    if scheme in ("s3", "s3a"):
        return S3ObjectStore(url, settings=settings)
    if not scheme:
        raise ValueError(f"mirror URL needs a scheme (s3://, file://, memory://, ...): {url!r}")
    return FsspecObjectStore(url, settings=settings)


def _sha256_b64(data: bytes | memoryview) -> str:
    return base64.b64encode(hashlib.sha256(data).digest()).decode()


def _check_key(key: str) -> None:
    if (
        not key
        or key.startswith("/")
        or "\x00" in key
        or any(p in ("", ".", "..") for p in key.split("/"))
    ):
        raise ValueError(f"invalid object key {key!r}")


# -- S3 ------------------------------------------------------------------------------------------

_PERMANENT_CODES = {
    "AccessDenied": "access denied",
    "AllAccessDisabled": "access to the bucket is disabled",
    "InvalidAccessKeyId": "the access key ID is not known to the server (bad credentials)",
    "SignatureDoesNotMatch": "the request signature does not match (bad secret key)",
    "InvalidToken": "the session token is invalid",
    "ExpiredToken": "the session token has expired",
    "TokenRefreshRequired": "the session token must be refreshed",
    "AccountProblem": "the account has a problem",
    "InvalidBucketName": "the bucket name is invalid",
    "NoSuchBucket": "the bucket does not exist",
    "PermanentRedirect": "the bucket is in another region or endpoint",
    "AuthorizationHeaderMalformed": "the authorization header is malformed (wrong region?)",
}
_TRANSIENT_CODES = {
    "SlowDown",
    "Throttling",
    "ThrottlingException",
    "TooManyRequests",
    "RequestTimeout",
    "RequestTimeTooSkewed",
    "InternalError",
    "ServiceUnavailable",
    "RequestLimitExceeded",
    "OperationAborted",
    # The server got bytes other than those we hashed: corruption in transit, resend.
    "BadDigest",
    "InvalidDigest",
    "XAmzContentSHA256Mismatch",
    # Our multipart upload vanished (aborted by a stale-upload sweep): upload the file again.
    "NoSuchUpload",
}
_UNSUPPORTED_CODES = {"NotImplemented", "InvalidArgument", "InvalidRequest"}


class S3ObjectStore:
    """An S3 bucket prefix through one shared boto3 client (thread-safe, pooled connections)."""

    def __init__(self, url: str, *, settings: StorageSettings | None = None) -> None:
        # boto3 is imported here so that the fsspec-only paths do not pay for it.
        import boto3
        from botocore.config import Config

        parsed = urlparse(url)
        if parsed.scheme.lower() not in ("s3", "s3a") or not parsed.netloc:
            raise ValueError(f"not an s3://bucket[/prefix] URL: {url!r}")
        if "@" in parsed.netloc:
            raise ValueError(
                "credentials do not belong in the mirror URL; use AWS variables or profiles"
            )
        self.url = url.rstrip("/")
        self.bucket = parsed.netloc
        prefix = parsed.path.strip("/")
        self._root = prefix + "/" if prefix else ""
        self._settings = settings or StorageSettings.from_env()
        s = self._settings
        session = boto3.session.Session()

        def make_client(style: str) -> Any:
            return session.client(
                "s3",
                config=Config(
                    connect_timeout=s.remote_connect_timeout_s,
                    read_timeout=s.remote_read_timeout_s,
                    # total_max_attempts=1: no botocore retries; the mirror retries, in one layer.
                    retries={"total_max_attempts": 1, "mode": "standard"},
                    max_pool_connections=max(
                        s.remote_max_pool_connections, s.remote_concurrency + 2
                    ),
                    # Every PUT and part carries its own x-amz-checksum-sha256, which the server
                    # verifies (BadDigest otherwise). Over plain http SigV4 would hash each body
                    # a second time for the signature: ~1 s of CPU per GB, for nothing.
                    s3={"addressing_style": style, "payload_signing_enabled": False},
                    tcp_keepalive=True,
                ),
            )

        # The endpoint may come from AWS_ENDPOINT_URL(_S3) or a profile's endpoint_url: path-style
        # addressing for custom endpoints (MinIO, SeaweedFS, R2), botocore's choice for AWS.
        self._client: Any = make_client(s.s3_addressing_style or "path")
        if s.s3_addressing_style is None:
            host = urlparse(self._client.meta.endpoint_url).hostname or ""
            if host.endswith("amazonaws.com"):
                self._client.close()
                self._client = make_client("auto")
        self.endpoint_url: str = self._client.meta.endpoint_url
        creds = session.get_credentials()
        # Kept only to scrub it from server-supplied messages; never logged.
        self._access_key = creds.access_key if creds is not None else None
        self._inm_supported: bool | None = None

    def close(self) -> None:
        self._client.close()

    # -- helpers -----------------------------------------------------------------------------

    def _key(self, key: str) -> str:
        _check_key(key)
        return self._root + key

    def _where(self, key: str | None) -> str:
        return f"s3://{self.bucket}/{self._root}{key}" if key else f"s3://{self.bucket}"

    def _scrub(self, text: str) -> str:
        if self._access_key:
            text = text.replace(self._access_key, "***")
        return text[:300]

    def _map(self, exc: Exception, op: str, key: str | None = None) -> StorageError:
        """Translate a botocore exception into the storage error family."""
        from botocore import exceptions as bx

        where = self._where(key)
        if isinstance(exc, bx.ClientError):
            err = exc.response.get("Error", {})
            code = str(err.get("Code", ""))
            status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
            if code in _PERMANENT_CODES:
                return PermanentStorageError(
                    f"{op} {where}: {_PERMANENT_CODES[code]} ({code}, HTTP {status}) at {self.endpoint_url}"
                )
            if code in _TRANSIENT_CODES or status >= 500 or status in (408, 429):
                return TransientStorageError(f"{op} {where}: {code or 'error'} (HTTP {status})")
            if status == 403:
                return PermanentStorageError(
                    f"{op} {where}: access denied (HTTP 403) at {self.endpoint_url}; check the "
                    "credentials and the bucket policy"
                )
            if code in ("NoSuchKey", "404") or status == 404:
                return ObjectNotFound(f"{op} {where}: not found")
            msg = self._scrub(str(err.get("Message", "")))
            return PermanentStorageError(f"{op} {where}: {code} (HTTP {status}): {msg}")
        if isinstance(exc, (bx.NoCredentialsError, bx.PartialCredentialsError)):
            return PermanentStorageError(
                f"{op} {where}: no usable AWS credentials found (environment, profile or "
                "instance role)"
            )
        transient = (
            bx.EndpointConnectionError,
            bx.ConnectTimeoutError,
            bx.ReadTimeoutError,
            bx.ConnectionClosedError,
            bx.ConnectionError,
            bx.ResponseStreamingError,
            bx.IncompleteReadError,
            bx.HTTPClientError,
        )
        if isinstance(exc, transient):
            return TransientStorageError(
                f"{op} {where}: {type(exc).__name__} talking to {self.endpoint_url}"
            )
        if isinstance(exc, OSError):
            # Raw socket errors while streaming a response body.
            return TransientStorageError(
                f"{op} {where}: {type(exc).__name__}: {exc.strerror or exc}"
            )
        return StorageError(f"{op} {where}: {type(exc).__name__}: {self._scrub(str(exc))}")

    @contextlib.contextmanager
    def _call(self, op: str, key: str | None = None) -> Iterator[None]:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            yield
        except (BotoCoreError, ClientError, ConnectionError, TimeoutError) as exc:
            raise self._map(exc, op, key) from exc

    # -- uploads -----------------------------------------------------------------------------

    def put_file(
        self,
        key: str,
        local_path: str,
        *,
        size: int,
        expected_sha256: str | None = None,
        progress: Progress | None = None,
    ) -> None:
        full = self._key(key)
        try:
            f = open(local_path, "rb", buffering=0)  # noqa: SIM115 - closed below
        except FileNotFoundError as exc:
            raise CorruptSnapshot(f"{local_path}: missing") from exc
        except OSError as exc:
            raise StorageError(f"opening {local_path}: {exc.strerror}") from exc
        with f:
            if size <= self._settings.remote_multipart_threshold:
                self._put_single(key, full, f, local_path, size, expected_sha256)
                if progress is not None:
                    progress(size)
            else:
                self._put_multipart(key, full, f, local_path, size, expected_sha256, progress)

    def _read_local(self, f: BinaryIO, n: int, path: str) -> bytes:
        try:
            data = f.read(n)
        except OSError as exc:
            raise StorageError(f"reading {path}: {exc.strerror}") from exc
        return data or b""

    def _put_single(
        self, key: str, full: str, f: BinaryIO, path: str, size: int, expected: str | None
    ) -> None:
        data = self._read_local(f, size + 1, path)
        if len(data) != size:
            raise CorruptSnapshot(f"{path}: {len(data)} bytes on disk, expected {size}")
        digest = hashlib.sha256(data).digest()
        if expected is not None and digest.hex() != expected:
            raise CorruptSnapshot(f"{path}: local bytes do not match the manifest checksum")
        with self._call("upload", key):
            self._client.put_object(
                Bucket=self.bucket,
                Key=full,
                Body=data,
                ChecksumSHA256=base64.b64encode(digest).decode(),
            )

    def _put_multipart(
        self,
        key: str,
        full: str,
        f: BinaryIO,
        path: str,
        size: int,
        expected: str | None,
        progress: Progress | None,
    ) -> None:
        part_size = max(self._settings.remote_part_size, -(-size // _MAX_PARTS))
        nparts = -(-size // part_size)
        conc = self._settings.remote_concurrency
        with self._call("start multipart upload", key):
            upload_id: str = self._client.create_multipart_upload(
                Bucket=self.bucket, Key=full, ChecksumAlgorithm="SHA256"
            )["UploadId"]
        completed = False
        try:
            whole = hashlib.sha256()
            parts: dict[int, dict[str, Any]] = {}
            pool = ThreadPoolExecutor(max_workers=conc, thread_name_prefix="s3-upload-part")
            pending: set[Future[tuple[int, dict[str, Any], int]]] = set()

            def collect(done: set[Future[tuple[int, dict[str, Any], int]]]) -> None:
                for fut in done:
                    number, part, nbytes = fut.result()
                    parts[number] = part
                    if progress is not None:
                        progress(nbytes)

            try:
                for number in range(1, nparts + 1):
                    want = min(part_size, size - (number - 1) * part_size)
                    data = self._read_local(f, want, path)
                    if len(data) != want:
                        raise CorruptSnapshot(f"{path}: shorter than the expected {size} bytes")
                    whole.update(data)
                    pending.add(pool.submit(self._upload_part, key, full, upload_id, number, data))
                    del data
                    while len(pending) >= conc:
                        done, pending = wait(pending, return_when=FIRST_COMPLETED)
                        collect(done)
                if self._read_local(f, 1, path):
                    raise CorruptSnapshot(f"{path}: larger than the expected {size} bytes")
                if expected is not None and whole.hexdigest() != expected:
                    raise CorruptSnapshot(f"{path}: local bytes do not match the manifest checksum")
                done, pending = wait(pending)
                collect(done)
            finally:
                # On failure: drop queued parts, wait for the running ones (bounded by the read
                # timeout) so that no part lands after the abort below.
                pool.shutdown(wait=True, cancel_futures=True)
            with self._call("complete multipart upload", key):
                self._client.complete_multipart_upload(
                    Bucket=self.bucket,
                    Key=full,
                    UploadId=upload_id,
                    MultipartUpload={"Parts": [parts[n] for n in sorted(parts)]},
                )
            completed = True
        finally:
            if not completed:
                self._abort_upload(key, full, upload_id)

    def _upload_part(
        self, key: str, full: str, upload_id: str, number: int, data: bytes
    ) -> tuple[int, dict[str, Any], int]:
        checksum = _sha256_b64(data)
        with self._call(f"upload part {number} of", key):
            resp = self._client.upload_part(
                Bucket=self.bucket,
                Key=full,
                UploadId=upload_id,
                PartNumber=number,
                Body=data,
                ChecksumSHA256=checksum,
            )
        return (
            number,
            {"PartNumber": number, "ETag": resp["ETag"], "ChecksumSHA256": checksum},
            len(data),
        )

    def _abort_upload(self, key: str, full: str, upload_id: str) -> None:
        try:
            with self._call("abort multipart upload", key):
                self._client.abort_multipart_upload(
                    Bucket=self.bucket, Key=full, UploadId=upload_id
                )
            log.info("remote.multipart_aborted", key=key)
        except StorageError as exc:
            # Never mask the original failure; the mirror's start-up sweep removes it later.
            log.warning("remote.multipart_abort_failed", key=key, error=str(exc))

    def put_bytes(self, key: str, data: bytes, *, if_none_match: bool = False) -> bool:
        full = self._key(key)
        kwargs: dict[str, Any] = {
            "Bucket": self.bucket,
            "Key": full,
            "Body": data,
            "ChecksumSHA256": _sha256_b64(data),
        }
        if not if_none_match:
            with self._call("put", key):
                self._client.put_object(**kwargs)
            return True
        if self._inm_supported is not False:
            from botocore.exceptions import ClientError

            try:
                with self._call("put (if-none-match)", key):
                    try:
                        self._client.put_object(IfNoneMatch="*", **kwargs)
                    except ClientError as exc:
                        code = exc.response.get("Error", {}).get("Code", "")
                        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
                        if code == "PreconditionFailed" or status == 412:
                            return False
                        if code == "ConditionalRequestConflict" or status == 409:
                            # A concurrent conditional write is in progress: someone commits.
                            return False
                        if code in _UNSUPPORTED_CODES or status == 501:
                            self._inm_supported = False
                            raise _Unsupported() from exc
                        raise
                self._inm_supported = True
                return True
            except _Unsupported:
                log.warning(
                    "remote.if_none_match_unsupported",
                    endpoint=self.endpoint_url,
                    detail="server rejects If-None-Match; falling back to HEAD-then-PUT, two "
                    "concurrent writers of the same step are no longer excluded",
                )
        if self.head(key) is not None:
            return False
        with self._call("put", key):
            self._client.put_object(**kwargs)
        return True

    # -- downloads ---------------------------------------------------------------------------

    def get_into(
        self, key: str, writable: Writable, *, expected_size: int, progress: Progress | None = None
    ) -> None:
        full = self._key(key)
        part = self._settings.remote_part_size
        if expected_size <= part:
            self._get_whole(key, full, writable, expected_size, progress)
            return
        ranges = [(a, min(a + part, expected_size) - 1) for a in range(0, expected_size, part)]
        conc = self._settings.remote_concurrency
        pool = ThreadPoolExecutor(max_workers=conc, thread_name_prefix="s3-download-part")
        window: collections.deque[Future[bytes]] = collections.deque()
        try:
            it = iter(ranges)
            for r in it:
                window.append(pool.submit(self._get_range, key, full, r, expected_size))
                if len(window) >= conc:
                    break
            while window:
                data = window.popleft().result()
                writable.write(data)
                if progress is not None:
                    progress(len(data))
                del data
                nxt = next(it, None)
                if nxt is not None:
                    window.append(pool.submit(self._get_range, key, full, nxt, expected_size))
        finally:
            pool.shutdown(wait=True, cancel_futures=True)

    def _get_range(self, key: str, full: str, r: tuple[int, int], expected_size: int) -> bytes:
        with self._call("download", key):
            resp = self._client.get_object(
                Bucket=self.bucket, Key=full, Range=f"bytes={r[0]}-{r[1]}"
            )
            total = _content_range_total(resp.get("ContentRange"))
            if total is not None and total != expected_size:
                resp["Body"].close()
                raise CorruptSnapshot(
                    f"{key}: remote object is {total} bytes, expected {expected_size}"
                )
            data: bytes = resp["Body"].read()
        if len(data) != r[1] - r[0] + 1:
            raise CorruptSnapshot(
                f"{key}: remote object shorter than expected {expected_size} bytes"
            )
        return data

    def _get_whole(
        self, key: str, full: str, writable: Writable, expected_size: int, progress: Progress | None
    ) -> None:
        with self._call("download", key):
            resp = self._client.get_object(Bucket=self.bucket, Key=full)
            body = resp["Body"]
            try:
                length = int(resp.get("ContentLength", -1))
                if length != expected_size:
                    raise CorruptSnapshot(
                        f"{key}: remote object is {length} bytes, expected {expected_size}"
                    )
                got = _copy_bounded(body.read, _STREAM_CHUNK, writable, key, expected_size, progress)
            finally:
                body.close()
        if got != expected_size:
            raise TransientStorageError(
                f"download {self._where(key)}: short read ({got} of {expected_size})"
            )

    def get_bytes(self, key: str) -> bytes:
        full = self._key(key)
        with self._call("download", key):
            resp = self._client.get_object(Bucket=self.bucket, Key=full)
            data: bytes = resp["Body"].read()
        return data

    def head(self, key: str) -> int | None:
        full = self._key(key)
        try:
            with self._call("head", key):
                resp = self._client.head_object(Bucket=self.bucket, Key=full)
        except ObjectNotFound:
            return None
        return int(resp["ContentLength"])

    def list(self, prefix: str) -> builtins.list[tuple[str, int]]:
        out: builtins.list[tuple[str, int]] = []
        with self._call("list", prefix or None):
            pages = self._client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=self._root + prefix
            )
            for page in pages:
                for obj in page.get("Contents", []):
                    out.append((obj["Key"][len(self._root) :], int(obj["Size"])))
        return sorted(out)

    def delete(self, keys: builtins.list[str]) -> None:
        # One request per key, in order: the caller relies on the order (manifest first), which
        # a batch DeleteObjects does not promise.
        for key in keys:
            full = self._key(key)
            with self._call("delete", key):
                self._client.delete_object(Bucket=self.bucket, Key=full)

    def abort_incomplete_uploads(self, prefix: str = "", *, older_than_s: float = 0.0) -> int:
        cutoff = time.time() - older_than_s
        aborted = 0
        with self._call("list multipart uploads", prefix or None):
            pages = self._client.get_paginator("list_multipart_uploads").paginate(
                Bucket=self.bucket, Prefix=self._root + prefix
            )
            uploads = [u for page in pages for u in page.get("Uploads", [])]
        for u in uploads:
            initiated = u.get("Initiated")
            if older_than_s > 0 and initiated is not None and initiated.timestamp() > cutoff:
                continue
            key = str(u["Key"])[len(self._root) :]
            from botocore.exceptions import ClientError

            with self._call("abort multipart upload", key):
                try:
                    self._client.abort_multipart_upload(
                        Bucket=self.bucket, Key=u["Key"], UploadId=u["UploadId"]
                    )
                except ClientError as exc:
                    status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
                    if exc.response.get("Error", {}).get("Code") == "NoSuchUpload" or status == 404:
                        continue  # finished or aborted meanwhile
                    raise
            aborted += 1
        if aborted:
            log.info("remote.stale_uploads_aborted", count=aborted, url=self.url)
        return aborted

    def preflight(self) -> None:
        """HEAD the bucket, then write and delete a probe object under the prefix."""
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            self._client.head_bucket(Bucket=self.bucket)
        except ClientError as exc:
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
            if status == 404:
                raise PermanentStorageError(
                    f"bucket {self.bucket!r} does not exist at {self.endpoint_url}"
                ) from exc
            raise self._map(exc, "check bucket") from exc
        except BotoCoreError as exc:
            raise self._map(exc, "check bucket") from exc
        probe = f".preflight-{secrets.token_hex(6)}"
        self.put_bytes(probe, b"preflight\n")
        self.delete([probe])


class _Unsupported(Exception):
    """Internal: the server rejected a conditional header as unsupported."""


def _content_range_total(value: str | None) -> int | None:
    if not value or "/" not in value:
        return None
    total = value.rsplit("/", 1)[1]
    return int(total) if total.isdigit() else None


# -- fsspec --------------------------------------------------------------------------------------


class FsspecObjectStore:
    """Any fsspec URL. Objects are files under the URL's path; keys use ``/`` separators."""

    _warned_put_if_absent = False

    def __init__(self, url: str, *, settings: StorageSettings | None = None) -> None:
        import fsspec
        from fsspec.implementations.local import LocalFileSystem

        self.url = url.rstrip("/")
        self._settings = settings or StorageSettings.from_env()
        fs, root = fsspec.core.url_to_fs(url)
        self._fs: Any = fs
        self._root = root.rstrip("/") or "/"
        self._local = isinstance(fs, LocalFileSystem)
        self._lock = threading.Lock()

    def _path(self, key: str) -> str:
        _check_key(key)
        return f"{self._root.rstrip('/')}/{key}"

    def _map(self, exc: OSError, op: str, key: str | None) -> StorageError:
        where = f"{self.url}/{key}" if key else self.url
        if isinstance(exc, PermissionError):
            return PermanentStorageError(f"{op} {where}: permission denied")
        if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS):
            return StorageError(f"{op} {where}: {exc.strerror}")
        return TransientStorageError(f"{op} {where}: {type(exc).__name__}: {exc.strerror or exc}")

    @contextlib.contextmanager
    def _call(self, op: str, key: str | None = None) -> Iterator[None]:
        try:
            yield
        except FileNotFoundError as exc:
            raise ObjectNotFound(f"{op} {self.url}/{key}: not found") from exc
        except OSError as exc:
            raise self._map(exc, op, key) from exc

    def _write_stream(self, key: str, chunks: Iterator[bytes]) -> None:
        path = self._path(key)
        with self._call("upload", key):
            parent = path.rsplit("/", 1)[0]
            self._fs.makedirs(parent, exist_ok=True)
            if self._local:
                tmp = f"{parent}/.tmp-{secrets.token_hex(6)}-{path.rsplit('/', 1)[1]}"
                try:
                    with open(tmp, "wb") as out:
                        for c in chunks:
                            out.write(c)
                        out.flush()
                        os.fsync(out.fileno())
                    os.replace(tmp, path)
                finally:
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(tmp)
            else:
                with self._fs.open(path, "wb") as out:
                    for c in chunks:
                        out.write(c)

    def put_file(
        self,
        key: str,
        local_path: str,
        *,
        size: int,
        expected_sha256: str | None = None,
        progress: Progress | None = None,
    ) -> None:
        chunk = self._settings.read_chunk_bytes

        def chunks() -> Iterator[bytes]:
            h = hashlib.sha256()
            total = 0
            try:
                with open(local_path, "rb", buffering=0) as f:
                    while True:
                        data = f.read(chunk)
                        if not data:
                            break
                        total += len(data)
                        if total > size:
                            raise CorruptSnapshot(
                                f"{local_path}: larger than the expected {size} bytes"
                            )
                        h.update(data)
                        yield data
                        if progress is not None:
                            progress(len(data))
            except FileNotFoundError as exc:
                raise CorruptSnapshot(f"{local_path}: missing") from exc
            except OSError as exc:
                raise StorageError(f"reading {local_path}: {exc.strerror}") from exc
            if total != size:
                raise CorruptSnapshot(f"{local_path}: {total} bytes on disk, expected {size}")
            if expected_sha256 is not None and h.hexdigest() != expected_sha256:
                raise CorruptSnapshot(
                    f"{local_path}: local bytes do not match the manifest checksum"
                )

        if self._local:
            self._write_stream(key, chunks())
        else:
            # Remote filesystems may make a partial write visible: buffer-verify first.
            # (Data objects are small in these test/backup paths; S3 has its own store.)
            data = b"".join(chunks())
            self._write_stream(key, iter([data]))

    def put_bytes(self, key: str, data: bytes, *, if_none_match: bool = False) -> bool:
        if not if_none_match:
            self._write_stream(key, iter([data]))
            return True
        path = self._path(key)
        if self._local:
            # Exclusive create: link() fails if the name exists, atomically.
            parent = path.rsplit("/", 1)[0]
            with self._call("upload", key):
                os.makedirs(parent, exist_ok=True)
                tmp = f"{parent}/.tmp-{secrets.token_hex(6)}"
                try:
                    with open(tmp, "wb") as out:
                        out.write(data)
                        out.flush()
                        os.fsync(out.fileno())
                    try:
                        os.link(tmp, path)
                    except FileExistsError:
                        return False
                finally:
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(tmp)
            return True
        if not FsspecObjectStore._warned_put_if_absent:
            FsspecObjectStore._warned_put_if_absent = True
            log.warning(
                "remote.put_if_absent_emulated",
                url=self.url,
                detail="this filesystem has no conditional write: exists-then-write, so two "
                "processes committing the same step at once are not excluded",
            )
        with self._lock:
            if self.head(key) is not None:
                return False
            self._write_stream(key, iter([data]))
        return True

    def get_into(
        self, key: str, writable: Writable, *, expected_size: int, progress: Progress | None = None
    ) -> None:
        path = self._path(key)
        chunk = self._settings.read_chunk_bytes
        with self._call("download", key), self._fs.open(path, "rb") as f:
            got = _copy_bounded(f.read, chunk, writable, key, expected_size, progress)
        if got != expected_size:
            raise CorruptSnapshot(f"{key}: remote object is {got} bytes, expected {expected_size}")

    def get_bytes(self, key: str) -> bytes:
        path = self._path(key)
        with self._call("download", key):
            data: bytes = self._fs.cat_file(path)
        return data

    def head(self, key: str) -> int | None:
        path = self._path(key)
        try:
            with self._call("head", key):
                info = self._fs.info(path)
        except ObjectNotFound:
            return None
        if info.get("type") != "file":
            return None
        return int(info["size"])

    def list(self, prefix: str) -> builtins.list[tuple[str, int]]:
        base = self._root.rstrip("/") + "/"
        # find() needs a directory; list its parent and filter by the full prefix.
        directory = (base + prefix).rsplit("/", 1)[0] if "/" in prefix else base.rstrip("/")
        try:
            with self._call("list", prefix or None):
                found = self._fs.find(directory or "/", detail=True)
        except ObjectNotFound:
            return []
        out = []
        for path, info in found.items():
            p = path if path.startswith("/") or not base.startswith("/") else "/" + path
            if not p.startswith(base) or info.get("type") != "file":
                continue
            key = p[len(base) :]
            if key.startswith(prefix) and not key.rsplit("/", 1)[-1].startswith(".tmp-"):
                out.append((key, int(info["size"])))
        return sorted(out)

    def delete(self, keys: builtins.list[str]) -> None:
        for key in keys:
            path = self._path(key)
            with contextlib.suppress(ObjectNotFound), self._call("delete", key):
                self._fs.rm_file(path)

    def abort_incomplete_uploads(self, prefix: str = "", *, older_than_s: float = 0.0) -> int:
        return 0

    def preflight(self) -> None:
        probe = f".preflight-{secrets.token_hex(6)}"
        self.put_bytes(probe, b"preflight\n")
        self.delete([probe])
