"""Worker settings: the only module of ``trainer`` that reads ``os.environ``.

:class:`WorkerSettings` is the supervisor's worker contract (:class:`contract.env.WorkerEnv`,
the ``ORCH_*`` variables ``orchestrator launch`` sets), torchrun's
``RANK``/``WORLD_SIZE``/``LOCAL_RANK``/``GROUP_RANK``/``MASTER_ADDR``/``MASTER_PORT``, and the
worker tunables of the registry (:mod:`contract.settings`), in one frozen, validated object. A
script run without the supervisor or without torchrun gets sensible single-process defaults, so
every other module receives its configuration as values.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from contract.env import LOG_FORMATS, ResumeMode, WorkerEnv
from contract.settings import BY_NAME, setting

__all__ = ["LOG_FORMATS", "STAGING_MODES", "ResumeMode", "StagingMode", "WorkerSettings"]

StagingMode = Literal["deferred", "sync"]
STAGING_MODES = ("deferred", "sync")
DEFAULT_PG_TIMEOUT_S: float = BY_NAME["ORCH_PG_TIMEOUT_S"].default


@dataclass(frozen=True, kw_only=True)
class WorkerSettings(WorkerEnv):
    """Everything a worker learns from its environment (see :class:`WorkerEnv` for the contract)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    #: torchrun's ``GROUP_RANK``: which node (agent) this rank belongs to in this attempt.
    group_rank: int = 0
    master_addr: str | None = None
    master_port: int | None = None
    launched_by_torchrun: bool = False
    #: torchrun's ``LOCAL_WORLD_SIZE``: ranks it started on this node.
    local_world_size: int = 1
    #: ``TORCHELASTIC_RUN_ID`` is set: a torchrun agent is this process's parent.
    under_torchelastic: bool = False
    faults: str = setting("ORCH_FAULTS")
    #: Look for a preemption request every K steps (one all-reduce each time; 1 = every step).
    preempt_check_every: int = setting("ORCH_PREEMPT_CHECK_EVERY")
    #: ``deferred``: parameters and optimizer state are copied off the training thread, and
    #: ``optimizer.step()`` waits for that copy; ``sync``: everything copied inside the snapshot.
    snapshot_staging: StagingMode = setting("ORCH_SNAPSHOT_STAGING")
    #: The snapshot writer thread (and the hashing threads it starts, which inherit it) at
    #: nice 19 and best-effort I/O level 7 (:mod:`contract.priority`).
    snapshot_nice: bool = setting("ORCH_SNAPSHOT_NICE")
    #: At most one heartbeat file write per this many seconds (0: every step). The first
    #: completed step of an attempt, snapshot steps and the end always write one.
    heartbeat_interval_s: float = setting("ORCH_HEARTBEAT_INTERVAL_S")
    #: ``check-resume``: commit a snapshot at this step and stop there (exit 0).
    stop_at_step: int | None = setting("ORCH_STOP_AT_STEP")
    #: ``--checkpoint-every auto``: the longest interval it may choose (see
    #: :func:`contract.interval.auto_interval_s`).
    max_snapshot_interval_s: float = setting("ORCH_MAX_SNAPSHOT_INTERVAL_S")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.world_size < 1:
            raise ValueError(f"WORLD_SIZE must be >= 1, got {self.world_size}")
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"RANK must be in [0, {self.world_size}), got {self.rank}")
        if self.local_world_size < 1:
            raise ValueError(f"LOCAL_WORLD_SIZE must be >= 1, got {self.local_world_size}")
        if self.local_rank < 0:
            raise ValueError(f"LOCAL_RANK must be >= 0, got {self.local_rank}")
        if self.group_rank < 0:
            raise ValueError(f"GROUP_RANK must be >= 0, got {self.group_rank}")
        if self.master_port is not None and not 0 < self.master_port < 65536:
            raise ValueError(f"MASTER_PORT must be a TCP port, got {self.master_port}")
        if self.preempt_check_every < 1:
            raise ValueError(
                f"ORCH_PREEMPT_CHECK_EVERY must be >= 1, got {self.preempt_check_every}"
            )
        if not self.heartbeat_interval_s >= 0:
            raise ValueError(f"ORCH_HEARTBEAT_INTERVAL_S must be >= 0, got {self.heartbeat_interval_s}")
        if not 0 < self.max_snapshot_interval_s < float("inf"):
            raise ValueError(
                f"ORCH_MAX_SNAPSHOT_INTERVAL_S must be > 0 seconds, got {self.max_snapshot_interval_s}"
            )
        if self.snapshot_staging not in STAGING_MODES:
            raise ValueError(
                f"ORCH_SNAPSHOT_STAGING must be one of {STAGING_MODES}, got {self.snapshot_staging!r}"
            )

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: Any) -> WorkerSettings:
        """Read the settings from ``env`` (default: ``os.environ``); ValueError names a bad one."""
        e = os.environ if env is None else env
        return super().from_env(
            e,
            rank=_int(e, "RANK", 0),
            world_size=_int(e, "WORLD_SIZE", 1),
            local_rank=_int(e, "LOCAL_RANK", 0),
            group_rank=_int(e, "GROUP_RANK", 0),
            master_addr=_str(e, "MASTER_ADDR"),
            master_port=_opt_int(e, "MASTER_PORT"),
            launched_by_torchrun="TORCHELASTIC_RUN_ID" in e or ("RANK" in e and "MASTER_ADDR" in e),
            local_world_size=_int(e, "LOCAL_WORLD_SIZE", 1),
            under_torchelastic="TORCHELASTIC_RUN_ID" in e,
            **overrides,
        )


# torchrun's variables are not ours: they are not in the registry, but parsed the same way.
def _str(env: Mapping[str, str], name: str) -> str | None:
    value = env.get(name, "").strip()
    return value or None


def _int(env: Mapping[str, str], name: str, default: int) -> int:
    value = _opt_int(env, name)
    return default if value is None else value


def _opt_int(env: Mapping[str, str], name: str) -> int | None:
    raw = _str(env, name)
    if raw is None:
        return None
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"{name} must be an integer, got {raw!r}") from None
