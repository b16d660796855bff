"""The S3 backend of the object-store protocol, through boto3 directly.

boto3 is used directly because the remote tier needs control that higher-level helpers hide: one
thread-safe client with explicit connect/read timeouts and no hidden retries (the mirror retries,
in one layer), multipart uploads with per-part checksums that the server validates,
`abort_multipart_upload` on every failure, and `If-None-Match: *` on the manifest so two writers
cannot both commit the same step. Endpoint and credentials come from the standard AWS chain
(environment, profiles, `AWS_ENDPOINT_URL`), so AWS, MinIO, SeaweedFS and R2 all work; errors are
mapped by :mod:`storage.objectstore.errors`.

Hashing: every byte of a file is hashed exactly once by the manifest entry's algorithm (the
plain SHA-256 of format-1 snapshots or the 64 KiB block SHA-256 of format 2), by the thread that
reads it (the caller's), in file order; that checksum must equal the manifest's before the object
is made visible (single PUT: before the PUT; multipart: before ``complete_multipart_upload``).
Every part, and a single PUT of a format-2 file, carries a CRC32 (server validated, BadDigest otherwise) computed from the very
buffer that was hashed: it guards the transfer, the SHA-256 proves the bytes are the manifest's.
(A SHA-256 per part as well would hash every byte twice: part SHA-256s cannot be combined into
the manifest's checksum. A single PUT of a format-1 file sends its SHA-256 instead.)
"""

from __future__ import annotations

import base64
import builtins
import collections
import contextlib
import hashlib
import io
import secrets
import threading
import time
import zlib
from collections.abc import Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from typing import Any, BinaryIO
from urllib.parse import urlparse

import structlog

from storage.blockhash import SHA256_BLOCKS, checksum_of
from storage.errors import (
    CorruptSnapshot,
    ObjectNotFound,
    PermanentStorageError,
    StorageError,
    TransientStorageError,
)
from storage.manifest import FileEntry
from storage.objectstore.common import (
    PACE_CHUNK,
    Pacing,
    Progress,
    Writable,
    check_key,
    copy_bounded,
)
from storage.objectstore.errors import UNSUPPORTED_CODES, s3_error, upload_gone
from storage.settings import StorageSettings

# The logger name predates the split into one module per backend; kept so log queries still match.
log = structlog.get_logger("storage.objectstore")

# S3 limits: at most 10,000 parts; every part but the last at least 5 MiB on AWS.
_MAX_PARTS = 10_000
_STREAM_CHUNK = 1024 * 1024


def _sha256_b64(data: bytes | memoryview) -> str:
    return base64.b64encode(hashlib.sha256(data).digest()).decode()


def _crc32_b64(data: bytes | memoryview) -> str:
    return base64.b64encode((zlib.crc32(data) & 0xFFFFFFFF).to_bytes(4, "big")).decode()


class _PacedBody(io.BytesIO):
    """A request body that asks ``pacing`` before handing each small chunk to the socket.

    ``io.BytesIO`` shares the bytes it is given (no copy); the HTTP layer reads it in blocks.
    """

    def __init__(self, data: bytes, pacing: Pacing) -> None:
        super().__init__(data)
        self._pacing = pacing
        self._size = len(data)

    def read(self, size: int | None = -1, /) -> bytes:
        left = self._size - self.tell()
        want = left if size is None or size < 0 else min(size, left)
        want = min(want, PACE_CHUNK)
        if want > 0:
            self._pacing.take(want)
        return super().read(want)


def _body(data: bytes, pacing: Pacing | None) -> Any:
    return data if pacing is None else _PacedBody(data, pacing)


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
        # Our multipart uploads whose abort failed (the endpoint was down when the upload
        # failed): upload id -> (key, full key). Nobody else can own them, so the next
        # `abort_incomplete_uploads` aborts them whatever their age, also where other writers
        # share the prefix; the caller's retry layer retries that.
        self._abandoned: dict[str, tuple[str, str]] = {}
        self._abandoned_lock = threading.Lock()

    def close(self) -> None:
        self._client.close()

    # -- helpers -----------------------------------------------------------------------------

    def _key(self, key: str) -> str:
        check_key(key)
        return self._root + key

    def _where(self, key: str | None) -> str:
        return f"s3://{self.bucket}/{self._root}{key}" if key else f"s3://{self.bucket}"

    def _scrub(self, text: str) -> str:
        if self._access_key:
            text = text.replace(self._access_key, "***")
        return text[:300]

    def _map(self, exc: Exception, op: str, key: str | None = None) -> StorageError:
        """Translate a botocore exception into the storage error family."""
        return s3_error(
            exc, op, self._where(key), endpoint_url=self.endpoint_url, scrub=self._scrub
        )

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
        expected: FileEntry | None = None,
        progress: Progress | None = None,
        pacing: Pacing | None = None,
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
                self._put_single(key, full, f, local_path, size, expected, pacing)
                if progress is not None:
                    progress(size)
            else:
                self._put_multipart(
                    key, full, f, local_path, size, expected, progress, pacing
                )

    def _read_local(self, f: BinaryIO, n: int, path: str) -> bytes:
        try:
            data = f.read(n)
        except OSError as exc:
            raise StorageError(f"reading {path}: {exc.strerror}") from exc
        return data or b""

    def _put_single(
        self,
        key: str,
        full: str,
        f: BinaryIO,
        path: str,
        size: int,
        expected: FileEntry | None,
        pacing: Pacing | None = None,
    ) -> None:
        data = self._read_local(f, size + 1, path)
        if len(data) != size:
            raise CorruptSnapshot(f"{path}: {len(data)} bytes on disk, expected {size}")
        server_check: dict[str, str]
        if expected is not None and expected.algorithm == SHA256_BLOCKS:
            if checksum_of(data, SHA256_BLOCKS) != expected.checksum:
                raise CorruptSnapshot(f"{path}: local bytes do not match the manifest checksum")
            server_check = {"ChecksumCRC32": _crc32_b64(data)}
        else:
            # A plain SHA-256 checksum doubles as the server-validated transfer check.
            digest = hashlib.sha256(data).digest()
            if expected is not None and digest.hex() != expected.checksum:
                raise CorruptSnapshot(f"{path}: local bytes do not match the manifest checksum")
            server_check = {"ChecksumSHA256": base64.b64encode(digest).decode()}
        with self._call("upload", key):
            self._client.put_object(
                Bucket=self.bucket, Key=full, Body=_body(data, pacing), **server_check
            )

    def _put_multipart(
        self,
        key: str,
        full: str,
        f: BinaryIO,
        path: str,
        size: int,
        expected: FileEntry | None,
        progress: Progress | None,
        pacing: Pacing | None = None,
    ) -> None:
        part_size = max(self._settings.remote_part_size, -(-size // _MAX_PARTS))
        nparts = -(-size // part_size)
        conc = self._settings.remote_concurrency
        with self._call("start multipart upload", key):
            upload_id: str = self._client.create_multipart_upload(
                Bucket=self.bucket, Key=full, ChecksumAlgorithm="CRC32"
            )["UploadId"]
        completed = False
        try:
            whole = expected.hasher() if expected is not None else None
            parts: dict[int, dict[str, Any]] = {}
            pool = ThreadPoolExecutor(
                max_workers=conc,
                thread_name_prefix="s3-upload-part",
                initializer=None if pacing is None else pacing.thread_started,
            )
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
                    if whole is not None:
                        whole.update(data)  # the file's one hashing pass (see the module doc)
                    pending.add(
                        pool.submit(self._upload_part, key, full, upload_id, number, data, pacing)
                    )
                    del data
                    while len(pending) >= conc:
                        done, pending = wait(pending, return_when=FIRST_COMPLETED)
                        collect(done)
                if self._read_local(f, 1, path):
                    raise CorruptSnapshot(f"{path}: larger than the expected {size} bytes")
                if whole is not None and expected is not None and (
                    whole.hexdigest() != expected.checksum
                ):
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
        self,
        key: str,
        full: str,
        upload_id: str,
        number: int,
        data: bytes,
        pacing: Pacing | None = None,
    ) -> tuple[int, dict[str, Any], int]:
        checksum = _crc32_b64(data)
        with self._call(f"upload part {number} of", key):
            resp = self._client.upload_part(
                Bucket=self.bucket,
                Key=full,
                UploadId=upload_id,
                PartNumber=number,
                Body=_body(data, pacing),
                ChecksumCRC32=checksum,
            )
        return (
            number,
            {"PartNumber": number, "ETag": resp["ETag"], "ChecksumCRC32": checksum},
            len(data),
        )

    def _abort_upload(self, key: str, full: str, upload_id: str) -> None:
        """One try to abort our failed upload; if it fails too, the upload is kept for the next
        `abort_incomplete_uploads` (no retry here: the caller's retry layer is the only one)."""
        try:
            self._abort_one(key, full, upload_id)
        except StorageError as exc:
            # Never mask the original failure (it is raised on from our caller's finally).
            with self._abandoned_lock:
                self._abandoned[upload_id] = (key, full)
                pending = len(self._abandoned)
            log.warning(
                "remote.multipart_abort_failed",
                key=key,
                upload_id=upload_id,
                error=str(exc),
                pending_aborts=pending,
            )
            return
        log.info("remote.multipart_aborted", key=key, upload_id=upload_id)

    def _abort_one(self, key: str, full: str, upload_id: str) -> bool:
        """Abort one upload: True if aborted, False if it was already gone; raises on failure."""
        from botocore.exceptions import ClientError

        with self._call("abort multipart upload", key):
            try:
                self._client.abort_multipart_upload(
                    Bucket=self.bucket, Key=full, UploadId=upload_id
                )
            except ClientError as exc:
                if upload_gone(exc):
                    return False
                raise
        return True

    def abandoned_uploads(self) -> builtins.list[tuple[str, str]]:
        """(key, upload id) of our uploads whose abort failed and is still to be retried."""
        with self._abandoned_lock:
            return sorted((key, uid) for uid, (key, _full) in self._abandoned.items())

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
                        if code in UNSUPPORTED_CODES or status == 501:
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
                got = copy_bounded(body.read, _STREAM_CHUNK, writable, key, expected_size, progress)
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
        """Abort, under `prefix`, our own uploads whose abort failed (by id, whatever their
        age), then every listed upload started more than `older_than_s` ago; how many.

        One try per request: the first failure is raised (the caller retries the whole pass,
        which resumes where it stopped: what was aborted is no longer listed or remembered).
        """
        cutoff = time.time() - older_than_s
        own = 0
        stale = 0
        try:
            with self._abandoned_lock:
                mine = [
                    (uid, key, full)
                    for uid, (key, full) in sorted(self._abandoned.items())
                    if key.startswith(prefix)
                ]
            for uid, key, full in mine:
                if self._abort_one(key, full, uid):
                    own += 1
                    log.info("remote.multipart_aborted", key=key, upload_id=uid, retried=True)
                with self._abandoned_lock:
                    self._abandoned.pop(uid, None)
            with self._call("list multipart uploads", prefix or None):
                pages = self._client.get_paginator("list_multipart_uploads").paginate(
                    Bucket=self.bucket, Prefix=self._root + prefix
                )
                uploads = [u for page in pages for u in page.get("Uploads", [])]
            for u in uploads:
                initiated = u.get("Initiated")
                if older_than_s > 0 and initiated is not None and initiated.timestamp() > cutoff:
                    continue  # maybe another writer's live upload
                if self._abort_one(str(u["Key"])[len(self._root) :], u["Key"], u["UploadId"]):
                    stale += 1
        finally:
            # Also after a failure part-way: what was aborted is logged once.
            if own or stale:
                log.info(
                    "remote.stale_uploads_aborted", count=own + stale, own=own, url=self.url
                )
        return own + stale

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
