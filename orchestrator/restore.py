"""Restore across tiers: the newest valid snapshot wins, wherever it is.

The supervisor first verifies its local snapshots (newest first, full checksums, invalid ones
removed). Then, with a mirror, it looks at the remote manifests: a remote snapshot newer than the
best local one is downloaded (``RemoteTier.download``: a temporary dir, every checksum verified,
then committed locally with the same manifest) and resumed from. A download that turns out
corrupt is skipped (``restore.download_failed``) and the next older remote snapshot is tried,
down to the local one. An unreachable endpoint makes the supervisor resume from the local
snapshot (or start fresh) rather than block: the bounded retries below are all it waits.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from typing import IO, Any

from orchestrator.mirror import EventSink, Progress, call_bounded, error_text
from orchestrator.settings import Settings
from storage import LocalSnapshotStore, RemoteTier
from storage.errors import CorruptSnapshot, StorageError, TransientStorageError

ProgressFactory = Callable[[int], Progress | None]


class TerminalProgress:
    """A one-line ``\\r`` progress bar for a download, for a terminal."""

    def __init__(self, step: int, stream: IO[str], *, min_interval_s: float = 0.2) -> None:
        self._step = step
        self._stream = stream
        self._min_interval_s = min_interval_s
        self._last = 0.0
        self._t0 = time.monotonic()

    def __call__(self, done: int, total: int) -> None:
        now = time.monotonic()
        final = total > 0 and done >= total
        if not final and now - self._last < self._min_interval_s:
            return
        self._last = now
        pct = 100.0 * done / total if total > 0 else 100.0
        rate = done / 1e6 / max(now - self._t0, 1e-6)
        width = 30
        filled = int(width * pct / 100)
        bar = "#" * filled + "-" * (width - filled)
        self._stream.write(
            f"\rrestoring step {self._step} [{bar}] {pct:5.1f}% "
            f"{done / 1e6:.1f}/{total / 1e6:.1f} MB {rate:.1f} MB/s"
        )
        if final:
            self._stream.write("\n")
        self._stream.flush()


def terminal_progress(stream: IO[str]) -> ProgressFactory:
    """A progress factory drawing on ``stream`` when it is a terminal, else none."""

    def factory(step: int) -> Progress | None:
        return TerminalProgress(step, stream) if stream.isatty() else None

    return factory


def restore_newer(
    *,
    remote: RemoteTier,
    local: LocalSnapshotStore,
    newer_than: int | None,
    events: EventSink,
    settings: Settings,
    attempt: int,
    progress: ProgressFactory | None = None,
) -> int | None:
    """Download the newest valid remote snapshot newer than ``newer_than``; its step or None.

    None means: resume from the local snapshot (``newer_than``) or start fresh. Only manifests
    are read to choose; the download verifies every byte.
    """
    try:
        infos = call_bounded(settings, remote.list)
    except StorageError as exc:
        events.emit(
            "restore.download_failed", attempt=attempt, step=None, error=error_text(exc),
            stage="list", transient=isinstance(exc, TransientStorageError),
        )
        return None
    for info in reversed(infos):
        if newer_than is not None and info.step <= newer_than:
            break
        if info.valid is False:
            events.emit(
                "restore.download_failed", attempt=attempt, step=info.step,
                error=info.reason or "invalid", stage="list", transient=False,
            )
            continue
        fields: dict[str, Any] = {"attempt": attempt, "step": info.step, "bytes": info.bytes}
        events.emit("restore.download_started", **fields)
        started = time.monotonic()
        bar = progress(info.step) if progress is not None else None
        try:
            got = call_bounded(settings, functools.partial(remote.download, info.step, local, bar))
        except CorruptSnapshot as exc:
            # Skipped: the next older remote snapshot (or the local one) is used instead.
            events.emit(
                "restore.download_failed", attempt=attempt, step=info.step,
                error=error_text(exc), stage="download", corrupt=True, transient=False,
            )
            continue
        except StorageError as exc:
            # Unreachable or refused: do not block the run on it; fall back to the local tier.
            events.emit(
                "restore.download_failed", attempt=attempt, step=info.step,
                error=error_text(exc), stage="download", corrupt=False,
                transient=isinstance(exc, TransientStorageError),
            )
            return None
        seconds = time.monotonic() - started
        events.emit(
            "restore.downloaded", attempt=attempt, step=got.step,
            bytes=got.bytes if got.bytes is not None else info.bytes, seconds=round(seconds, 3),
        )
        return got.step
    return None
