"""Storage tunables, read once from the environment.

This is the only module in `storage` that reads `os.environ`; everything else receives these
values explicitly so tests can vary them without touching the process environment.
"""

from __future__ import annotations

import os
from dataclasses import dataclass


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError as exc:
        raise ValueError(f"{name} must be an integer, got {raw!r}") from exc


@dataclass(frozen=True, kw_only=True)
class StorageSettings:
    """I/O sizes used by the local tier."""

    # Large sequential chunks keep the kernel's write path efficient while bounding how much
    # one write call holds the (GIL-free) hashing/IO loop.
    write_chunk_bytes: int = 16 * 1024 * 1024
    read_chunk_bytes: int = 16 * 1024 * 1024
    log_format: str | None = None

    def __post_init__(self) -> None:
        if self.write_chunk_bytes <= 0:
            raise ValueError("write_chunk_bytes must be positive")
        if self.read_chunk_bytes <= 0:
            raise ValueError("read_chunk_bytes must be positive")
        if self.log_format not in (None, "json", "console"):
            raise ValueError(f"log format must be 'json' or 'console', got {self.log_format!r}")

    @classmethod
    def from_env(cls) -> StorageSettings:
        return cls(
            write_chunk_bytes=_env_int("ORCH_STORAGE_WRITE_CHUNK_BYTES", 16 * 1024 * 1024),
            read_chunk_bytes=_env_int("ORCH_STORAGE_READ_CHUNK_BYTES", 16 * 1024 * 1024),
            log_format=os.environ.get("ORCH_LOG_FORMAT") or None,
        )
