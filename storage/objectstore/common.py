"""What both object-store backends share: the progress and writable types, key validation and
the size-bounded streaming copy a download runs through."""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from storage.errors import CorruptSnapshot

Progress = Callable[[int], None]
"""Called with the number of bytes just transferred (a delta), from the calling thread."""


class Writable(Protocol):
    def write(self, data: bytes | bytearray | memoryview, /) -> int: ...


class Pacing(Protocol):
    """How an upload shares the machine, decided by its caller (the supervisor's mirror).

    ``thread_started()`` runs first in every thread an upload creates (part workers), so the
    caller can lower their CPU and I/O priority; ``take(n)`` is called with each small chunk of
    bytes just before it is sent and blocks while a bandwidth cap says wait (it may raise to
    cancel the upload, which then fails and aborts like any other failure).
    """

    def thread_started(self) -> None: ...

    def take(self, nbytes: int, /) -> None: ...


#: Bytes per ``Pacing.take`` call: small, so a cap is smooth and a cancel is prompt.
PACE_CHUNK = 64 * 1024


def check_key(key: str) -> None:
    if (
        not key
        or key.startswith("/")
        or "\x00" in key
        or any(p in ("", ".", "..") for p in key.split("/"))
    ):
        raise ValueError(f"invalid object key {key!r}")


def copy_bounded(
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
