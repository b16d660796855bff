"""The fsspec backend of the object-store protocol: every URL that is not S3.

`file://`, `memory://`, gcs and the rest: objects are files under the URL's path. Put-if-absent
is emulated (an exclusive link on local disks, exists-then-write elsewhere) and the weaker
guarantee is logged; errors are mapped by :mod:`storage.objectstore.errors`.
"""

from __future__ import annotations

import builtins
import contextlib
import os
import secrets
import threading
from collections.abc import Iterator
from typing import Any

import structlog

from storage.errors import CorruptSnapshot, ObjectNotFound, StorageError
from storage.manifest import FileEntry
from storage.objectstore.common import (
    PACE_CHUNK,
    Pacing,
    Progress,
    Writable,
    check_key,
    copy_bounded,
)
from storage.objectstore.errors import fsspec_error
from storage.settings import StorageSettings

# The logger name predates the split into one module per backend; kept so log queries still match.
log = structlog.get_logger("storage.objectstore")


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
        check_key(key)
        return f"{self._root.rstrip('/')}/{key}"

    def _map(self, exc: OSError, op: str, key: str | None) -> StorageError:
        return fsspec_error(exc, op, f"{self.url}/{key}" if key else self.url)

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
        expected: FileEntry | None = None,
        progress: Progress | None = None,
        pacing: Pacing | None = None,
    ) -> None:
        chunk = self._settings.read_chunk_bytes

        def chunks() -> Iterator[bytes]:
            h = expected.hasher() if expected is not None else None
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
                        if h is not None:
                            h.update(data)
                        if pacing is not None:
                            for at in range(0, len(data), PACE_CHUNK):
                                pacing.take(min(PACE_CHUNK, len(data) - at))
                        yield data
                        if progress is not None:
                            progress(len(data))
            except FileNotFoundError as exc:
                raise CorruptSnapshot(f"{local_path}: missing") from exc
            except OSError as exc:
                raise StorageError(f"reading {local_path}: {exc.strerror}") from exc
            if total != size:
                raise CorruptSnapshot(f"{local_path}: {total} bytes on disk, expected {size}")
            if h is not None and expected is not None and h.hexdigest() != expected.checksum:
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
            got = copy_bounded(f.read, chunk, writable, key, expected_size, progress)
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
        # No multipart uploads here: a failed write leaves nothing (its temporary is unlinked).
        return 0

    def preflight(self) -> None:
        probe = f".preflight-{secrets.token_hex(6)}"
        self.put_bytes(probe, b"preflight\n")
        self.delete([probe])
