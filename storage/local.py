"""The local snapshot tier: atomic commit, validation and newest-valid selection on one disk.

A snapshot is written into a temporary directory, every file hashed while it is written (no
second read pass) and fsynced, the manifest written last and fsynced, the directory renamed into
place and the parent directory fsynced. A crash at any point leaves either the previous state or
the complete new snapshot, never a half snapshot under a committed name. Reads verify sizes and
checksums against the manifest before a single byte is handed to the caller.
"""

from __future__ import annotations

import builtins
import contextlib
import errno
import fcntl
import hashlib
import mmap
import os
import shutil
import stat
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from types import TracebackType
from typing import Any

import numpy as np
import structlog

from storage import layout
from storage.atomic import fsync_dir
from storage.errors import CorruptSnapshot, DiskFull, SnapshotNotFound, StorageError
from storage.manifest import FileEntry, Manifest
from storage.settings import StorageSettings

log = structlog.get_logger("storage.local")

PhaseHook = Callable[[str], None]
_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)
# Errors that say the snapshot's own structure is wrong (a listed file is a directory, its name is
# impossible), as opposed to the environment failing (EIO, EMFILE, EACCES): the former make a
# snapshot invalid, the latter are raised so that a good snapshot is never deleted for them.
_BAD_PATH = (errno.ENOENT, errno.EISDIR, errno.ENOTDIR, errno.ENAMETOOLONG, errno.ELOOP)


@dataclass(frozen=True, kw_only=True)
class SnapshotInfo:
    """What is known about one committed snapshot on a tier.

    `valid` is None when only listed (not checked), True/False after validation; `reason`
    explains a False.
    """

    step: int
    path: str
    tier: str
    manifest: Manifest | None
    valid: bool | None
    reason: str | None = None

    @property
    def digest(self) -> str | None:
        return self.manifest.digest if self.manifest else None

    @property
    def bytes(self) -> int | None:
        return self.manifest.total_bytes if self.manifest else None

    @property
    def created_at(self) -> float | None:
        return self.manifest.created_at if self.manifest else None

    def to_json(self) -> dict[str, Any]:
        """The `snapshots --json` record (stable field names: tools rely on them)."""
        return {
            "step": self.step,
            "tier": self.tier,
            "valid": self.valid,
            "reason": self.reason,
            "digest": self.digest,
            "bytes": self.bytes,
            "created_at": self.created_at,
            "path": self.path,
            "epoch": self.manifest.epoch if self.manifest else None,
            "run_id": self.manifest.run_id if self.manifest else None,
            "metrics": dict(self.manifest.metadata.get("metrics") or {}) if self.manifest else {},
        }


def _is_real_dir(path: str) -> bool:
    """A directory, not a symlink to one."""
    try:
        return stat.S_ISDIR(os.lstat(path).st_mode)
    except OSError:
        return False


def _raise_storage(exc: OSError, what: str) -> StorageError:
    if exc.errno in _NO_SPACE:
        return DiskFull(f"no space left while {what}: {exc.strerror}")
    return StorageError(f"I/O error while {what}: {exc}")


#: O_DIRECT needs the buffer address, file offset and length aligned to the logical block size;
#: 4096 covers every block size in use.
DIRECT_ALIGN = 4096


@contextlib.contextmanager
def _file_errors(name: str, doing: str, fpath: str) -> Iterator[None]:
    """Translate OS errors on a snapshot's file ``name``: a missing file or an impossible path
    makes the snapshot invalid (:class:`CorruptSnapshot`); anything else is the environment
    failing (:class:`StorageError`), which must never get a good snapshot deleted."""
    try:
        yield
    except FileNotFoundError as exc:
        raise CorruptSnapshot(f"{name}: missing") from exc
    except OSError as exc:
        if exc.errno in _BAD_PATH:
            raise CorruptSnapshot(f"{name}: {exc.strerror}") from exc
        raise StorageError(f"{doing} {fpath}: {exc}") from exc


def _address(view: memoryview) -> int:
    return int(np.frombuffer(view, dtype=np.uint8).ctypes.data) if len(view) else 0


class HashingFile:
    """A write-only file that computes its size and sha256 as bytes pass through.

    Hashing a chunk runs on a helper thread while the chunk is written (hashlib and ``os.write``
    both release the GIL), so the file costs max(hash, write) rather than their sum, and a
    background writer never stalls the training thread. With ``direct`` the file is opened with
    ``O_DIRECT`` (bypassing the page cache) and aligned chunks go straight to the device; an
    unaligned tail, or a filesystem that refuses ``O_DIRECT`` (tmpfs), falls back to buffered
    writes, and ``close()`` fsyncs either way.
    """

    def __init__(
        self,
        path: str,
        chunk_bytes: int,
        *,
        on_error: Callable[[], None] | None = None,
        direct: bool = False,
    ) -> None:
        self.path = path
        self._chunk = chunk_bytes
        self._on_error = on_error
        self._hash = hashlib.sha256()
        self._size = 0
        self._entry: FileEntry | None = None
        self._hasher: ThreadPoolExecutor | None = None
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL
        self.direct = direct and hasattr(os, "O_DIRECT")
        try:
            self._fd: int | None = os.open(path, flags | (os.O_DIRECT if self.direct else 0), 0o644)
        except OSError as exc:
            if not (self.direct and exc.errno == errno.EINVAL):
                raise _raise_storage(exc, f"creating {path}") from exc
            self.direct = False  # this filesystem has no O_DIRECT
            try:
                self._fd = os.open(path, flags, 0o644)
            except OSError as exc2:
                raise _raise_storage(exc2, f"creating {path}") from exc2

    def _buffered(self) -> None:
        """Turn O_DIRECT off for the rest of the file (an unaligned piece must be written)."""
        if self.direct and self._fd is not None:
            fcntl.fcntl(self._fd, fcntl.F_SETFL, fcntl.fcntl(self._fd, fcntl.F_GETFL) & ~os.O_DIRECT)
            self.direct = False

    def _write_all(self, chunk: memoryview) -> None:
        fd = self._fd
        if fd is None:
            raise StorageError(f"write to closed snapshot file {self.path}")
        if self.direct and (
            len(chunk) % DIRECT_ALIGN or self._size % DIRECT_ALIGN or _address(chunk) % DIRECT_ALIGN
        ):
            self._buffered()
        pos = 0
        while pos < len(chunk):
            try:
                pos += os.write(fd, chunk[pos:])
            except OSError as exc:
                if not (self.direct and exc.errno == errno.EINVAL):
                    raise
                self._buffered()  # the device wants a larger alignment than DIRECT_ALIGN
        self._size += len(chunk)

    def write(self, data: bytes | bytearray | memoryview) -> int:
        if self._fd is None:
            raise StorageError(f"write to closed snapshot file {self.path}")
        view = memoryview(data).cast("B")
        total = len(view)
        if total > self._chunk and self._hasher is None:
            self._hasher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="storage-hash")
        pending: Future[None] | None = None
        try:
            for pos in range(0, total, self._chunk):
                chunk = view[pos : pos + self._chunk]
                if self._hasher is None:
                    self._hash.update(chunk)
                else:
                    # One hashing thread takes the chunks in order and runs at its own pace
                    # beside the writes; the caller's buffer is only read until write() returns.
                    pending = self._hasher.submit(self._hash.update, chunk)
                self._write_all(chunk)
        except OSError as exc:
            self._failed()
            raise _raise_storage(exc, f"writing {self.path}") from exc
        finally:
            if pending is not None:
                pending.result()
        return total

    def close(self) -> FileEntry:
        """Fsync and close; returns the entry for the manifest. Idempotent."""
        if self._entry is not None:
            return self._entry
        fd, self._fd = self._fd, None
        if fd is None:
            raise StorageError(f"{self.path} was abandoned")
        try:
            os.fsync(fd)
        except OSError as exc:
            os.close(fd)
            self._failed()
            raise _raise_storage(exc, f"fsyncing {self.path}") from exc
        os.close(fd)
        self._stop_hasher()
        self._entry = FileEntry(size=self._size, checksum=self._hash.hexdigest())
        return self._entry

    def _stop_hasher(self) -> None:
        if self._hasher is not None:
            self._hasher.shutdown(wait=True)
            self._hasher = None

    def _failed(self) -> None:
        """A write or fsync failed: the file is unusable; let the owner free the space now."""
        self.discard()
        if self._on_error is not None:
            self._on_error()

    def discard(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        self._stop_hasher()

    def __enter__(self) -> HashingFile:
        return self

    def __exit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        if et is None:
            self.close()
        else:
            self.discard()


class SnapshotWriter:
    """Writes one snapshot into a temporary directory and commits it atomically."""

    def __init__(
        self,
        *,
        root: str,
        step: int,
        settings: StorageSettings,
        on_phase: PhaseHook | None,
    ) -> None:
        self.step = step
        self._root = root
        self._settings = settings
        self._on_phase = on_phase
        self.tmp_path = os.path.join(root, layout.temp_dirname(step))
        self._files: dict[str, HashingFile] = {}
        self._done = False
        try:
            os.mkdir(self.tmp_path)
        except OSError as exc:
            raise _raise_storage(exc, f"creating {self.tmp_path}") from exc

    def open(self, name: str, *, direct: bool = False) -> HashingFile:
        """A new file in the snapshot; hash computed while writing, fsynced on close.

        ``direct``: write with O_DIRECT when the settings allow it (for large, aligned buffers).
        """
        if self._done:
            raise StorageError("snapshot writer already committed or aborted")
        if not layout.is_safe_filename(name):
            raise ValueError(f"invalid snapshot file name {name!r}")
        if name in self._files:
            raise ValueError(f"snapshot file {name!r} written twice")
        # A failed write (disk full, I/O error) aborts the whole snapshot at once, so the space
        # of the partial snapshot is freed even if the caller forgets to call abort().
        f = HashingFile(
            os.path.join(self.tmp_path, name),
            self._settings.write_chunk_bytes,
            on_error=self.abort,
            direct=direct and self._settings.direct_io,
        )
        self._files[name] = f
        return f

    def write_bytes(self, name: str, data: bytes | bytearray | memoryview) -> FileEntry:
        with self.open(name) as f:
            f.write(data)
        return f.close()

    def _phase(self, name: str) -> None:
        if self._on_phase is not None:
            self._on_phase(name)

    def commit(
        self,
        *,
        run_id: str,
        epoch: int,
        world_size: int,
        digest: str,
        metadata: Mapping[str, Any] | None = None,
    ) -> Manifest:
        """Write the manifest last, rename into place, fsync the parent. Returns the manifest."""
        if self._done:
            raise StorageError("snapshot writer already committed or aborted")
        try:
            entries = {name: f.close() for name, f in self._files.items()}
            self._phase("after_files")
            manifest = Manifest(
                run_id=run_id,
                step=self.step,
                epoch=epoch,
                world_size=world_size,
                files=entries,
                digest=digest,
                created_at=time.time(),
                metadata=dict(metadata or {}),
            )
            self._write_manifest_and_install(manifest.to_json())
        except OSError as exc:
            self.abort()
            raise _raise_storage(exc, f"committing step {self.step}") from exc
        except BaseException:
            self.abort()
            raise
        self._committed(manifest)
        return manifest

    def commit_manifest(self, manifest: Manifest, *, raw: bytes | None = None) -> Manifest:
        """Commit with a manifest made elsewhere (a downloaded snapshot), after checking it.

        Every written file's size and checksum (computed while it was written) must equal the
        manifest's entry, and the manifest must list exactly the written files; otherwise the
        snapshot is aborted and `CorruptSnapshot` raised, so a torn or corrupt download never
        becomes a valid local snapshot. `raw`, when given, is written byte for byte (it must
        parse to `manifest`), keeping manifest.json identical on both tiers.
        """
        if self._done:
            raise StorageError("snapshot writer already committed or aborted")
        try:
            if manifest.step != self.step:
                raise CorruptSnapshot(f"manifest is for step {manifest.step}, not {self.step}")
            if raw is not None and Manifest.from_json(raw) != manifest:
                raise ValueError("raw manifest bytes do not parse to the given manifest")
            entries = {name: f.close() for name, f in self._files.items()}
            missing = sorted(set(manifest.files) - set(entries))
            extra = sorted(set(entries) - set(manifest.files))
            if missing or extra:
                raise CorruptSnapshot(f"files differ from the manifest: missing {missing}, extra {extra}")
            for name, entry in sorted(entries.items()):
                want = manifest.files[name]
                if entry.size != want.size:
                    raise CorruptSnapshot(f"{name}: size {entry.size} != manifest {want.size}")
                if entry.checksum != want.checksum:
                    raise CorruptSnapshot(f"{name}: checksum mismatch")
            self._phase("after_files")
            self._write_manifest_and_install(raw if raw is not None else manifest.to_json())
        except OSError as exc:
            self.abort()
            raise _raise_storage(exc, f"committing step {self.step}") from exc
        except BaseException:
            self.abort()
            raise
        self._committed(manifest)
        return manifest

    def _write_manifest_and_install(self, data: bytes) -> None:
        with HashingFile(
            os.path.join(self.tmp_path, layout.MANIFEST_NAME), self._settings.write_chunk_bytes
        ) as mf:
            mf.write(data)
        fsync_dir(self.tmp_path)
        self._phase("before_rename")
        self._install()

    def _committed(self, manifest: Manifest) -> None:
        self._done = True
        log.info(
            "snapshot.committed_local",
            step=self.step,
            bytes=manifest.total_bytes,
            path=os.path.join(self._root, layout.snapshot_dirname(self.step)),
        )

    def _install(self) -> None:
        final = os.path.join(self._root, layout.snapshot_dirname(self.step))
        displaced: str | None = None
        if os.path.lexists(final):
            # A committed dir at this step can only be one we failed to validate (or an identical
            # re-save after resuming from an older snapshot): move it aside under a temp name so a
            # crash between the two renames leaves only garbage that cleanup removes.
            displaced = os.path.join(self._root, layout.temp_dirname(self.step) + "-displaced")
            os.rename(final, displaced)
            log.warning("snapshot.replacing_existing", step=self.step)
        os.rename(self.tmp_path, final)
        fsync_dir(self._root)
        if displaced is not None:
            if _is_real_dir(displaced):
                shutil.rmtree(displaced, ignore_errors=True)
            else:
                # A file or symlink squatting on the committed name (never a snapshot).
                os.unlink(displaced)

    def abort(self) -> None:
        """Remove the temporary directory; older snapshots are never touched."""
        if self._done:
            return
        self._done = True
        for f in self._files.values():
            f.discard()
        shutil.rmtree(self.tmp_path, ignore_errors=True)


class MappedFile:
    """A committed snapshot file mapped into memory, its checksum verified on a thread meanwhile.

    Loading a snapshot used to read it into a fresh buffer (a copy, and a page fault per 4 KiB of
    never-touched memory) and hash it in the same loop, then decode it (a second copy). Mapped,
    the page cache is the buffer: the caller decodes straight from :attr:`array` while the hash
    runs beside it, and calls :meth:`verified` before using a single decoded value. The mapping
    is copy-on-write (``ACCESS_COPY``), so views of it are writable for torch yet never write to
    the file. Snapshots are immutable once committed; a file truncated under the mapping would
    raise SIGBUS in the reader, which ends that process (an attempt failure, never bad data).
    """

    def __init__(self, fpath: str, name: str, entry: FileEntry, chunk_bytes: int) -> None:
        self._name, self._entry, self._chunk = name, entry, chunk_bytes
        self._error: BaseException | None = None
        self._digest: str | None = None
        self._map: mmap.mmap | None = None
        with _file_errors(name, "mapping", fpath), open(fpath, "rb", buffering=0) as f:
            size = os.fstat(f.fileno()).st_size
            if size != entry.size:
                raise CorruptSnapshot(f"{name}: size {size} != manifest {entry.size}")
            if size:
                self._map = mmap.mmap(f.fileno(), size, access=mmap.ACCESS_COPY)
        if self._map is not None:
            # Start reading the whole file ahead: the decoder and the hash both walk it in order.
            self._map.madvise(mmap.MADV_WILLNEED)
            self.array: np.ndarray[Any, Any] = np.frombuffer(self._map, dtype=np.uint8)
        else:
            self.array = np.zeros(0, dtype=np.uint8)
        self._thread = threading.Thread(target=self._hash, name=f"verify-{name}", daemon=True)
        self._thread.start()

    def _hash(self) -> None:
        try:
            h = hashlib.sha256()
            view = memoryview(self.array.data)
            for start in range(0, len(view), self._chunk):
                h.update(view[start : start + self._chunk])
            self._digest = h.hexdigest()
        except BaseException as exc:  # re-raised by verified()
            self._error = exc

    def verified(self) -> None:
        """Wait for the hash; raise :class:`CorruptSnapshot` unless it matches the manifest."""
        self._thread.join()
        if self._error is not None:
            raise StorageError(f"verifying {self._name}: {self._error}") from self._error
        if self._digest != self._entry.checksum:
            raise CorruptSnapshot(f"{self._name}: checksum mismatch")

    def close(self) -> None:
        """Wait for the hash thread (it reads the mapping), then drop this object's references.

        The mapping itself is unmapped when the last view of :attr:`array` is gone (decoded
        tensors that are copies hold none).
        """
        self._thread.join()
        self.array = np.zeros(0, dtype=np.uint8)
        self._map = None

    def __enter__(self) -> MappedFile:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


class LocalSnapshotStore:
    """Snapshots under `<checkpoint_dir>/snapshots` on a local (node-attached) disk."""

    tier = "local"

    def __init__(self, checkpoint_dir: str, *, settings: StorageSettings | None = None) -> None:
        self.checkpoint_dir = os.path.abspath(checkpoint_dir)
        self.root = layout.snapshots_root(self.checkpoint_dir)
        self._settings = settings or StorageSettings()
        try:
            os.makedirs(self.root, exist_ok=True)
        except OSError as exc:
            raise _raise_storage(exc, f"creating {self.root}") from exc

    # -- writing ---------------------------------------------------------------------------

    def begin(self, step: int, *, on_phase: PhaseHook | None = None) -> SnapshotWriter:
        """Start writing the snapshot at `step`; commit or abort the returned writer."""
        if step < 0:
            raise ValueError(f"step must be non-negative, got {step}")
        return SnapshotWriter(root=self.root, step=step, settings=self._settings, on_phase=on_phase)

    # -- listing and validation ------------------------------------------------------------

    def path(self, step: int) -> str:
        return os.path.join(self.root, layout.snapshot_dirname(step))

    def _committed_steps(self) -> Iterator[tuple[int, str]]:
        try:
            entries = list(os.scandir(self.root))
        except FileNotFoundError:
            return
        for e in entries:
            step = layout.parse_committed(e.name)
            if step is not None and e.is_dir(follow_symlinks=False):
                yield step, e.path

    def list(self) -> list[SnapshotInfo]:
        """Committed snapshots, oldest first by step. Junk names are ignored.

        Manifests are parsed (cheap) but files are not checked: `valid` is None, or False when
        the manifest is missing or unreadable.
        """
        out = []
        for step, path in sorted(self._committed_steps()):
            try:
                manifest = self._load_manifest(step, path)
                out.append(
                    SnapshotInfo(step=step, path=path, tier=self.tier, manifest=manifest, valid=None)
                )
            except CorruptSnapshot as exc:
                out.append(
                    SnapshotInfo(
                        step=step, path=path, tier=self.tier, manifest=None, valid=False,
                        reason=str(exc),
                    )
                )
        return out

    def _load_manifest(self, step: int, path: str) -> Manifest:
        try:
            with open(os.path.join(path, layout.MANIFEST_NAME), "rb") as f:
                data = f.read()
        except FileNotFoundError as exc:
            raise CorruptSnapshot("manifest missing") from exc
        except OSError as exc:
            raise CorruptSnapshot(f"manifest unreadable: {exc.strerror}") from exc
        manifest = Manifest.from_json(data)
        if manifest.step != step:
            raise CorruptSnapshot(f"manifest says step {manifest.step}, directory says {step}")
        return manifest

    def read_manifest(self, step: int) -> Manifest:
        path = self.path(step)
        if not _is_real_dir(path):  # what list() would show: symlinks and files are junk
            raise SnapshotNotFound(f"no committed snapshot at step {step} in {self.root}")
        return self._load_manifest(step, path)

    def validate(self, step: int, *, verify_checksums: bool = True) -> SnapshotInfo:
        """Check the snapshot at `step`: manifest, then each file's size (and checksum)."""
        path = self.path(step)
        info = SnapshotInfo(step=step, path=path, tier=self.tier, manifest=None, valid=False)
        try:
            manifest = self.read_manifest(step)
        except (CorruptSnapshot, SnapshotNotFound) as exc:
            return replace(info, reason=str(exc))
        info = replace(info, manifest=manifest)
        try:
            for name, entry in manifest.files.items():
                self._check_file(path, name, entry, verify_checksums)
        except CorruptSnapshot as exc:
            return replace(info, reason=str(exc))
        return replace(info, valid=True)

    def _check_file(self, path: str, name: str, entry: FileEntry, verify: bool) -> None:
        fpath = os.path.join(path, name)
        with _file_errors(name, "checking", fpath):
            st = os.stat(fpath)
        if not stat.S_ISREG(st.st_mode):
            raise CorruptSnapshot(f"{name}: not a regular file")
        size = st.st_size
        if size != entry.size:
            raise CorruptSnapshot(f"{name}: size {size} != manifest {entry.size}")
        if verify:
            self._hash_file(fpath, name, entry, None)

    def _hash_file(
        self, fpath: str, name: str, entry: FileEntry, into: memoryview | None
    ) -> None:
        """Hash the file while reading it, into `into` (verifying loads) or a scratch buffer."""
        h = hashlib.sha256()
        chunk = self._settings.read_chunk_bytes
        scratch = memoryview(bytearray(min(chunk, max(entry.size, 1)))) if into is None else None
        total = 0
        with _file_errors(name, "reading", fpath), open(fpath, "rb", buffering=0) as f:
            while True:
                view = scratch if scratch is not None else into[total : total + chunk]  # type: ignore[index]
                if len(view) == 0:
                    # The caller's buffer is full: one more byte means the file grew.
                    if f.read(1):
                        raise CorruptSnapshot(f"{name}: larger than manifest size")
                    break
                n = f.readinto(view)
                if not n:
                    break
                h.update(view[:n])
                total += n
        if total != entry.size:
            raise CorruptSnapshot(f"{name}: read {total} bytes, manifest says {entry.size}")
        if h.hexdigest() != entry.checksum:
            raise CorruptSnapshot(f"{name}: checksum mismatch")

    def newest_valid(
        self,
        *,
        verify_checksums: bool = True,
        cleanup: bool = False,
        max_step: int | None = None,
    ) -> SnapshotInfo | None:
        """The highest-step valid snapshot, skipping (and optionally deleting) invalid ones."""
        for info in reversed(self.list()):
            if max_step is not None and info.step > max_step:
                continue
            checked = self.validate(info.step, verify_checksums=verify_checksums)
            if checked.valid:
                return checked
            log.warning("snapshot.invalid", step=info.step, reason=checked.reason, tier=self.tier)
            if cleanup:
                self.delete(info.step)
                log.info("snapshot.removed_invalid", step=info.step, reason=checked.reason)
        return None

    # -- reading ---------------------------------------------------------------------------

    def read_into(self, step: int, name: str, buffer: memoryview | bytearray) -> Manifest:
        """Stream file `name` of the snapshot into `buffer` (exactly its size), verifying it."""
        manifest = self.read_manifest(step)
        entry = manifest.files.get(name)
        if entry is None:
            raise CorruptSnapshot(f"step {step}: manifest lists no file {name!r}")
        view = memoryview(buffer).cast("B")
        if len(view) != entry.size:
            raise ValueError(f"buffer is {len(view)} bytes, {name} is {entry.size}")
        self._hash_file(os.path.join(self.path(step), name), name, entry, view)
        return manifest

    def map_verifying(self, step: int, name: str, manifest: Manifest | None = None) -> MappedFile:
        """Map file `name` of the snapshot and start verifying it (see :class:`MappedFile`).

        Its size is checked at once; its checksum by :meth:`MappedFile.verified`, which the
        caller must pass before trusting anything decoded from the mapping.
        """
        manifest = manifest if manifest is not None else self.read_manifest(step)
        entry = manifest.files.get(name)
        if entry is None:
            raise CorruptSnapshot(f"step {step}: manifest lists no file {name!r}")
        return MappedFile(
            os.path.join(self.path(step), name), name, entry, self._settings.read_chunk_bytes
        )

    def open_verified(self, step: int, name: str, manifest: Manifest | None = None) -> bytes:
        """The whole content of file `name`, checksum-verified (against `manifest` if given)."""
        manifest = manifest if manifest is not None else self.read_manifest(step)
        entry = manifest.files.get(name)
        if entry is None:
            raise CorruptSnapshot(f"step {step}: manifest lists no file {name!r}")
        buf = bytearray(entry.size)
        self._hash_file(os.path.join(self.path(step), name), name, entry, memoryview(buf))
        return bytes(buf)

    # -- deletion --------------------------------------------------------------------------

    def delete(self, step: int) -> None:
        """Remove a committed snapshot; it disappears atomically (rename first), then is freed."""
        path = self.path(step)
        if not _is_real_dir(path):
            # Nothing committed there. A file or symlink under the name is junk: never deleted.
            return
        doomed = os.path.join(self.root, layout.temp_dirname(step) + "-deleted")
        try:
            os.rename(path, doomed)
        except FileNotFoundError:
            return
        fsync_dir(self.root)
        shutil.rmtree(doomed, ignore_errors=True)

    def cleanup_abandoned(self) -> builtins.list[str]:
        """Remove temporary snapshot dirs left by dead writers. Call only when no writer runs."""
        removed: builtins.list[str] = []
        try:
            entries = list(os.scandir(self.root))
        except FileNotFoundError:
            return []
        for e in entries:
            # Only directories: a file or symlink under a temporary name is not ours.
            if layout.parse_temp(e.name) is not None and e.is_dir(follow_symlinks=False):
                shutil.rmtree(e.path, ignore_errors=True)
                removed.append(e.path)
                log.info("snapshot.removed_abandoned", path=e.path)
        return removed
