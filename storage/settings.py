"""Storage tunables: the local tier's I/O sizes and the object-store tier's transfer knobs.

The only module of ``storage`` that reads the environment (through the registry in
:mod:`contract.settings`, which holds every variable's default and documentation); everything
else receives a :class:`StorageSettings` so tests can vary them without touching the process
environment. A store built without one reads the environment (:meth:`StorageSettings.from_env`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from contract.settings import MiB, load, setting

__all__ = ["MiB", "StorageSettings"]


@dataclass(frozen=True, kw_only=True)
class StorageSettings:
    """I/O sizes of the local tier and the remote (object store) tier's transfer tunables.

    Remote: files up to `remote_multipart_threshold` bytes go up in one PUT, larger ones as
    multipart uploads of `remote_part_size` parts, `remote_concurrency` parts in flight (so up to
    `(remote_concurrency + 1) * remote_part_size` bytes of memory per transfer); downloads of
    large objects use ranged GETs with the same sizes. Every network call has a connect and a
    read timeout; retries happen in one layer above (the mirror), never inside botocore.
    """

    # Large sequential chunks keep the kernel's write path efficient while bounding how much
    # one write call holds the (GIL-free) hashing/IO loop.
    write_chunk_bytes: int = setting("ORCH_STORAGE_WRITE_CHUNK_BYTES")
    read_chunk_bytes: int = setting("ORCH_STORAGE_READ_CHUNK_BYTES")
    # One SHA-256 thread (~1.5-1.9 GB/s per core here) is slower than an NVMe or a fast virtio
    # disk; block checksums are independent, so several threads hash a file's chunks at once.
    hash_threads: int = setting("ORCH_STORAGE_HASH_THREADS")
    # Snapshot tensor files are written with O_DIRECT where the filesystem allows it: no page
    # cache copy and no flush storm at fsync (measured ~1.6-2x buffered+fsync on a virtio disk).
    direct_io: bool = setting("ORCH_STORAGE_DIRECT_IO")
    remote_part_size: int = setting("ORCH_REMOTE_PART_SIZE")
    remote_multipart_threshold: int = setting("ORCH_REMOTE_MULTIPART_THRESHOLD")
    remote_concurrency: int = setting("ORCH_REMOTE_CONCURRENCY")
    remote_max_pool_connections: int = setting("ORCH_REMOTE_MAX_POOL_CONNECTIONS")
    remote_connect_timeout_s: float = setting("ORCH_REMOTE_CONNECT_TIMEOUT_S")
    remote_read_timeout_s: float = setting("ORCH_REMOTE_READ_TIMEOUT_S")
    # None: path-style when an endpoint URL is configured (MinIO, SeaweedFS, R2), else auto.
    s3_addressing_style: str | None = setting("ORCH_S3_ADDRESSING_STYLE")

    def __post_init__(self) -> None:
        if self.write_chunk_bytes <= 0:
            raise ValueError("ORCH_STORAGE_WRITE_CHUNK_BYTES must be positive")
        if self.read_chunk_bytes <= 0:
            raise ValueError("ORCH_STORAGE_READ_CHUNK_BYTES must be positive")
        if self.hash_threads < 1:
            raise ValueError("ORCH_STORAGE_HASH_THREADS must be at least 1")
        if self.remote_part_size < 1 or self.remote_multipart_threshold < 1:
            raise ValueError("remote part size and multipart threshold must be positive")
        if self.remote_concurrency < 1 or self.remote_max_pool_connections < 1:
            raise ValueError("remote concurrency and pool size must be at least 1")
        if not (self.remote_connect_timeout_s > 0 and self.remote_read_timeout_s > 0):
            raise ValueError("remote timeouts must be positive")
        if self.s3_addressing_style not in (None, "path", "virtual", "auto"):
            raise ValueError(
                f"S3 addressing style must be path, virtual or auto, got {self.s3_addressing_style!r}"
            )

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> StorageSettings:
        """Settings from ``env`` (default: the process environment); ValueError names a bad one."""
        return load(cls, env)
