"""Worker settings: the only module of ``trainer`` that reads ``os.environ``.

It gathers the supervisor's ``ORCH_*`` variables (see docs/INTERNALS.md) and torchrun's
``RANK``/``WORLD_SIZE``/``LOCAL_RANK``/``MASTER_ADDR``/``MASTER_PORT`` into one frozen,
validated :class:`WorkerSettings`. A script run without the supervisor or without torchrun gets
sensible single-process defaults, so every other module receives its configuration as values.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

ResumeMode = Literal["auto", "fresh", "step"]
StagingMode = Literal["deferred", "sync"]
STAGING_MODES = ("deferred", "sync")

DEFAULT_PG_TIMEOUT_S = 60.0
LOG_FORMATS = ("json", "console")


@dataclass(frozen=True, kw_only=True)
class WorkerSettings:
    """Everything a worker learns from its environment.

    ``resume_mode`` is ``"step"`` with ``resume_step`` set when the supervisor chose a snapshot,
    ``"fresh"`` when it asked for a fresh start (``ORCH_RESUME_STEP=none``) and ``"auto"`` when
    the variable is unset (the worker selects the newest valid snapshot itself).
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    #: torchrun's ``GROUP_RANK``: which node (agent) this rank belongs to in this attempt.
    group_rank: int = 0
    master_addr: str | None = None
    master_port: int | None = None
    launched_by_torchrun: bool = False
    checkpoint_dir: str | None = None
    run_id: str | None = None
    attempt: int = 0
    node_rank: int = 0
    checkpoint_every: int | None = None
    resume_mode: ResumeMode = "auto"
    resume_step: int | None = None
    allow_config_change: bool = False
    faults: str = ""
    pg_timeout_s: float = DEFAULT_PG_TIMEOUT_S
    log_format: str | None = None
    #: Look for a preemption request every K steps (one all-reduce each time; 1 = every step).
    preempt_check_every: int = 1
    #: ``deferred``: parameters and optimizer state are copied off the training thread, and
    #: ``optimizer.step()`` waits for that copy; ``sync``: everything copied inside the snapshot.
    snapshot_staging: StagingMode = "deferred"
    #: At most one heartbeat file write per this many seconds (0: every step). The first
    #: completed step of an attempt, snapshot steps and the end always write one.
    heartbeat_interval_s: float = 1.0
    #: Set for a warm spare group: ``Checkpointer.resume()`` waits until the supervisor writes
    #: this file (promotion), then resumes from the step it names.
    spare_gate: str | None = None

    def __post_init__(self) -> None:
        if self.world_size < 1:
            raise ValueError(f"WORLD_SIZE must be >= 1, got {self.world_size}")
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"RANK must be in [0, {self.world_size}), got {self.rank}")
        if self.local_rank < 0:
            raise ValueError(f"LOCAL_RANK must be >= 0, got {self.local_rank}")
        if self.group_rank < 0:
            raise ValueError(f"GROUP_RANK must be >= 0, got {self.group_rank}")
        if self.master_port is not None and not 0 < self.master_port < 65536:
            raise ValueError(f"MASTER_PORT must be a TCP port, got {self.master_port}")
        if self.attempt < 0:
            raise ValueError(f"ORCH_ATTEMPT must be >= 0, got {self.attempt}")
        if self.node_rank < 0:
            raise ValueError(f"ORCH_NODE_RANK must be >= 0, got {self.node_rank}")
        if self.checkpoint_every is not None and self.checkpoint_every < 0:
            raise ValueError(
                f"ORCH_CHECKPOINT_EVERY must be >= 0 (0 = final snapshot only), "
                f"got {self.checkpoint_every}"
            )
        if self.resume_mode not in ("auto", "fresh", "step"):
            raise ValueError(f"resume_mode must be auto, fresh or step, got {self.resume_mode!r}")
        if (self.resume_mode == "step") != (self.resume_step is not None):
            raise ValueError("resume_step is set exactly when resume_mode is 'step'")
        if self.resume_step is not None and self.resume_step < 0:
            raise ValueError(f"ORCH_RESUME_STEP must be >= 0 or 'none', got {self.resume_step}")
        if not self.pg_timeout_s > 0:
            raise ValueError(f"ORCH_PG_TIMEOUT_S must be > 0, got {self.pg_timeout_s}")
        if self.log_format is not None and self.log_format not in LOG_FORMATS:
            raise ValueError(f"ORCH_LOG_FORMAT must be one of {LOG_FORMATS}, got {self.log_format!r}")
        if self.preempt_check_every < 1:
            raise ValueError(
                f"ORCH_PREEMPT_CHECK_EVERY must be >= 1, got {self.preempt_check_every}"
            )
        if not self.heartbeat_interval_s >= 0:
            raise ValueError(f"ORCH_HEARTBEAT_INTERVAL_S must be >= 0, got {self.heartbeat_interval_s}")
        if self.snapshot_staging not in STAGING_MODES:
            raise ValueError(
                f"ORCH_SNAPSHOT_STAGING must be one of {STAGING_MODES}, got {self.snapshot_staging!r}"
            )
        if self.checkpoint_dir is not None and not self.checkpoint_dir:
            raise ValueError("ORCH_CHECKPOINT_DIR must not be empty when set")

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> WorkerSettings:
        """Read the settings from ``env`` (default: ``os.environ``); ValueError names a bad one."""
        e = os.environ if env is None else env
        resume_raw = _str(e, "ORCH_RESUME_STEP")
        resume_mode: ResumeMode
        resume_step: int | None
        if resume_raw is None:
            resume_mode, resume_step = "auto", None
        elif resume_raw.lower() == "none":
            resume_mode, resume_step = "fresh", None
        else:
            resume_mode, resume_step = "step", _opt_int(e, "ORCH_RESUME_STEP")
        allow_raw = _str(e, "ORCH_ALLOW_CONFIG_CHANGE")
        if allow_raw not in (None, "0", "1", "true", "false"):
            raise ValueError(f"ORCH_ALLOW_CONFIG_CHANGE must be 0 or 1, got {allow_raw!r}")
        port = _opt_int(e, "MASTER_PORT")
        return cls(
            rank=_int(e, "RANK", 0),
            world_size=_int(e, "WORLD_SIZE", 1),
            local_rank=_int(e, "LOCAL_RANK", 0),
            group_rank=_int(e, "GROUP_RANK", 0),
            master_addr=_str(e, "MASTER_ADDR"),
            master_port=port,
            launched_by_torchrun="TORCHELASTIC_RUN_ID" in e or ("RANK" in e and "MASTER_ADDR" in e),
            checkpoint_dir=_str(e, "ORCH_CHECKPOINT_DIR"),
            run_id=_str(e, "ORCH_RUN_ID"),
            attempt=_int(e, "ORCH_ATTEMPT", 0),
            node_rank=_int(e, "ORCH_NODE_RANK", 0),
            checkpoint_every=_opt_int(e, "ORCH_CHECKPOINT_EVERY"),
            resume_mode=resume_mode,
            resume_step=resume_step,
            allow_config_change=allow_raw in ("1", "true"),
            faults=_str(e, "ORCH_FAULTS") or "",
            pg_timeout_s=_float(e, "ORCH_PG_TIMEOUT_S", DEFAULT_PG_TIMEOUT_S),
            log_format=(_str(e, "ORCH_LOG_FORMAT") or None),
            preempt_check_every=_int(e, "ORCH_PREEMPT_CHECK_EVERY", 1),
            snapshot_staging=(_str(e, "ORCH_SNAPSHOT_STAGING") or "deferred"),  # type: ignore[arg-type]
            heartbeat_interval_s=_float(e, "ORCH_HEARTBEAT_INTERVAL_S", 1.0),
            spare_gate=_str(e, "ORCH_SPARE_GATE"),
        )


def _str(env: Mapping[str, str], name: str) -> str | None:
    value = env.get(name)
    if value is None:
        return None
    value = value.strip()
    return value if value else None


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


def _float(env: Mapping[str, str], name: str, default: float) -> float:
    raw = _str(env, name)
    if raw is None:
        return default
    try:
        return float(raw)
    except ValueError:
        raise ValueError(f"{name} must be a number, got {raw!r}") from None
