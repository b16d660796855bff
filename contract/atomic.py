"""Atomic small-file replacement, shared by the supervisor's run state and the workers' files.

Readers of `state.json`, heartbeats, error files and export sidecars must see the old or the new
content, never a torn mix: write to a temporary name in the same directory, optionally fsync,
rename over the target, and fsync the directory when the result must survive a power loss.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Mapping
from typing import Any


def fsync_dir(path: str) -> None:
    """Make a rename or create inside `path` durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: str, data: bytes, *, durable: bool = True) -> None:
    """Replace `path` with `data` atomically; `durable` adds fsync of the file and its directory.

    Heartbeats written every step pass `durable=False`: losing one to a power cut is harmless and
    an fsync per step is not.
    """
    directory = os.path.dirname(path) or "."
    prefix = "." + os.path.basename(path) + "."
    try:
        fd, tmp = tempfile.mkstemp(prefix=prefix, suffix=".tmp", dir=directory)
    except FileNotFoundError:
        # The directory was removed under a live run (an operator's cleanup of run/): recreate
        # it rather than fail a heartbeat or the supervisor's state write over it.
        os.makedirs(directory, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=prefix, suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    if durable:
        fsync_dir(directory)


def atomic_write_json(path: str, doc: Mapping[str, Any], *, durable: bool = True) -> None:
    """`atomic_write_bytes` of `doc` as indented, key-sorted JSON with a trailing newline."""
    data = (json.dumps(doc, indent=1, sort_keys=True, allow_nan=False) + "\n").encode()
    atomic_write_bytes(path, data, durable=durable)
