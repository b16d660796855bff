"""The local tier's commit protocol: one snapshot written into a temporary directory, committed.

:class:`SnapshotWriter` is the only code that makes a snapshot appear under a committed name;
its docstring states the call order and what is durable, and what a crash leaves, after each
step. Files are written with :class:`~storage.hashfile.HashingFile`.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import stat
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import structlog

from contract.atomic import fsync_dir
from storage import layout
from storage.errors import CorruptSnapshot, NewerSnapshotFormat, StorageError, os_error
from storage.hashfile import HashingFile
from storage.manifest import CHECKSUM_ALGORITHM, FileEntry, Manifest
from storage.settings import StorageSettings

# The logger name predates the split of storage.local; kept so log queries still match.
log = structlog.get_logger("storage.local")

PhaseHook = Callable[[str], None]
"""Called with a fault-injection phase name (``after_files``, ``before_rename``) during commit."""


class _Adopted:
    """A file another process wrote into the temporary directory (:meth:`SnapshotWriter.adopt`):
    closing it only returns its reported entry; discarding it leaves it to the abort's rmtree."""

    def __init__(self, entry: FileEntry) -> None:
        self._entry = entry

    def close(self) -> FileEntry:
        return self._entry

    def discard(self) -> None:
        pass


class SnapshotWriter:
    """Writes one snapshot into a temporary directory and commits it atomically.

    Made by :meth:`LocalSnapshotStore.begin <storage.local.LocalSnapshotStore.begin>` and used
    in this order (as PyTorch DCP's ``StorageWriter`` states its call order):

    1. ``begin(step)`` creates ``<root>/.tmp-step-<step>-<pid>-<random>`` (not fsynced).
       Durable: nothing. A crash leaves at most an empty temporary directory, which ``list()``
       never shows and :meth:`~storage.local.LocalSnapshotStore.cleanup_abandoned` removes.
    2. ``open(name)`` or ``write_bytes(name, data)``, once per file name, for any number of
       files: each file is created exclusively in the temporary directory, hashed while written
       (``direct``: O_DIRECT where the settings and the filesystem allow) and fsynced when
       closed (files still open are closed by the commit). Durable after a close: that file's
       bytes, not yet its directory entry. A write or fsync that fails aborts the whole writer
       at once (step 4: its space is freed) and raises :class:`DiskFull` or
       :class:`StorageError`. A crash leaves a temporary directory of whole and partial files,
       never anything under a committed name. ``adopt(name, entry)`` lists a file another
       process (a rank of a sharded snapshot) wrote into the temporary directory itself.
    3. ``commit(...)`` (the manifest is made here) or ``commit_manifest(manifest)`` (one made
       elsewhere, e.g. a download, first checked against every written file's size and checksum
       and against the set of names), exactly once:

       a. every file still open is closed (fsynced); fault phase ``after_files``;
       b. ``manifest.json`` is written into the temporary directory and fsynced, then the
          temporary directory itself: all its entries are durable; fault phase
          ``before_rename``;
       c. a directory already under the committed name ``step-<step>`` (only one that failed
          validation, or an identical re-save) is first renamed aside to a temporary name;
       d. the temporary directory is renamed to ``step-<step>`` and the snapshots root is
          fsynced: from here the snapshot is committed and durable;
       e. the directory renamed aside in c, if any, is removed.

       A crash before c leaves only a temporary directory (garbage for ``cleanup_abandoned``);
       between c and d, no directory at this step at all (both are temporary garbage); between
       d and the fsync of the root, after a power loss, either the new snapshot under its
       committed name or its complete temporary directory. Never a half snapshot under a
       committed name: every file and the manifest are fsynced before the rename, and only a
       directory with a manifest is valid. Snapshots of other steps are never touched. Any
       error in step 3 aborts (step 4) and is raised.
    4. ``abort()``, at any point (idempotent, and a no-op once committed): open files are
       discarded and the temporary directory removed; nothing committed is touched.

    After a commit or an abort, ``open`` and the commits raise :class:`StorageError`.
    """

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
        self._files: dict[str, HashingFile | _Adopted] = {}
        self._done = False
        try:
            os.mkdir(self.tmp_path)
        except OSError as exc:
            raise os_error(exc, f"creating {self.tmp_path}") from exc

    def open(
        self, name: str, *, direct: bool = False, algorithm: str = CHECKSUM_ALGORITHM
    ) -> HashingFile:
        """A new file in the snapshot; hash computed while writing, fsynced on close.

        ``direct``: write with O_DIRECT when the settings allow it (for large, aligned buffers).
        ``algorithm``: the checksum's; another than the current format's only for a copy of a
        snapshot an older version wrote (:meth:`commit_manifest`).
        """
        self._check_new(name)
        # A failed write (disk full, I/O error) aborts the whole snapshot at once, so the space
        # of the partial snapshot is freed even if the caller forgets to call abort().
        f = HashingFile(
            os.path.join(self.tmp_path, name),
            self._settings.write_chunk_bytes,
            on_error=self.abort,
            direct=direct and self._settings.direct_io,
            algorithm=algorithm,
            hash_threads=self._settings.hash_threads,
        )
        self._files[name] = f
        return f

    def _check_new(self, name: str) -> None:
        """A file may be added: the writer is open, the name safe and not used yet."""
        if self._done:
            raise StorageError("snapshot writer already committed or aborted")
        if not layout.is_safe_filename(name):
            raise ValueError(f"invalid snapshot file name {name!r}")
        if name in self._files:
            raise ValueError(f"snapshot file {name!r} written twice")

    def adopt(self, name: str, entry: FileEntry) -> None:
        """List file ``name``, written into :attr:`tmp_path` by another process, in the manifest.

        For sharded snapshots: every rank writes its own shard file (hashed while written,
        fsynced on close) into this directory and reports its size and sha256. The file must be
        a regular file (not a link) of exactly ``entry.size`` bytes; its checksum is *trusted*
        from the report rather than recomputed, since re-reading every rank's shards here would
        serialise the whole snapshot through one process (validation recomputes it from the
        committed files). Call before the commit; the commit fsyncs the directory entries.
        """
        self._check_new(name)
        fpath = os.path.join(self.tmp_path, name)
        try:
            st = os.lstat(fpath)
        except OSError as exc:
            raise CorruptSnapshot(f"{name}: reported by its writer but not found ({exc.strerror})") from exc
        if not stat.S_ISREG(st.st_mode) or st.st_size != entry.size:
            raise CorruptSnapshot(f"{name}: size {st.st_size} != reported {entry.size} (or not a file)")
        self._files[name] = _Adopted(entry)

    def write_bytes(
        self, name: str, data: bytes | bytearray | memoryview, *, algorithm: str = CHECKSUM_ALGORITHM
    ) -> FileEntry:
        with self.open(name, algorithm=algorithm) as f:
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
        components: Mapping[str, str] | None = None,
    ) -> Manifest:
        """Write the manifest last, rename into place, fsync the parent. Returns the manifest.

        ``components`` (name -> ``"sha256:<hex>"``) are the per-component content digests the
        manifest records beside the whole-state ``digest``.
        """
        if self._done:
            raise StorageError("snapshot writer already committed or aborted")
        with self._aborting_on_error():
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
                components=dict(components or {}),
            )
            self._write_manifest_and_install(manifest.to_json())
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
        with self._aborting_on_error():
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
                if (entry.algorithm, entry.checksum) != (want.algorithm, want.checksum):
                    raise CorruptSnapshot(f"{name}: checksum mismatch")
            self._phase("after_files")
            self._write_manifest_and_install(raw if raw is not None else manifest.to_json())
        self._committed(manifest)
        return manifest

    @contextlib.contextmanager
    def _aborting_on_error(self) -> Iterator[None]:
        """Any error inside aborts the snapshot (its temp dir goes); OS errors are translated."""
        try:
            yield
        except OSError as exc:
            self.abort()
            raise os_error(exc, f"committing step {self.step}") from exc
        except BaseException:
            self.abort()
            raise

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
        if _newer_format(final):
            # A newer release's snapshot (after a downgrade): never ours to delete. Kept under a
            # name that is neither committed nor temporary, which nothing lists or removes.
            kept = f"{final}.newer-format-{secrets.token_hex(4)}"
            os.rename(final, kept)
            log.warning("snapshot.kept_newer_format", step=self.step, path=kept)
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
            if layout.is_real_dir(displaced):
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


def _newer_format(path: str) -> bool:
    """True when ``path`` is a committed snapshot of a format newer than this version reads."""
    if not layout.is_real_dir(path):
        return False
    try:
        with open(os.path.join(path, layout.MANIFEST_NAME), "rb") as f:
            Manifest.from_json(f.read())
    except NewerSnapshotFormat:
        return True
    except (OSError, CorruptSnapshot):
        return False
    return False
