"""The worker environment: what ``orchestrator launch`` tells every rank through ``ORCH_*``.

The supervisor builds a :class:`WorkerEnv` and hands ``to_env()`` to torchrun, which passes it
on to the ranks; the trainer reads it back with ``from_env()``. One class on both sides of the
process boundary, so the names, encodings and defaults cannot drift apart (a round-trip test
holds them together). The variables are rows of :data:`contract.settings.REGISTRY` with
``set_by="supervisor"`` (plus the two tunables forwarded to the workers,
``ORCH_PG_TIMEOUT_S`` and ``ORCH_LOG_FORMAT``).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any, Literal, TypeVar

from contract.interval import Interval, parse_interval
from contract.settings import BY_NAME, env_var, load, setting

ResumeMode = Literal["auto", "fresh", "step"]
LOG_FORMATS = ("json", "console")
DivergenceAction = Literal["warn", "fail"]
#: What a resumed rank does when a re-executed step differs from the journal (--on-divergence).
DIVERGENCE_ACTIONS: tuple[DivergenceAction, ...] = ("warn", "fail")
E = TypeVar("E", bound="WorkerEnv")


@dataclass(frozen=True, kw_only=True)
class WorkerEnv:
    """The supervisor -> worker contract.

    ``resume_mode`` is ``"step"`` with ``resume_step`` set when the supervisor chose a snapshot,
    ``"fresh"`` when it asked for a fresh start (``ORCH_RESUME_STEP=none``) and ``"auto"`` when
    the variable is unset (a script run by hand, or a warm spare before its promotion: the
    worker selects the snapshot itself).
    """

    checkpoint_dir: str | None = setting("ORCH_CHECKPOINT_DIR")
    run_id: str | None = setting("ORCH_RUN_ID")
    attempt: int = setting("ORCH_ATTEMPT")
    node_rank: int = setting("ORCH_NODE_RANK")
    resume_mode: ResumeMode = "auto"
    resume_step: int | None = None
    allow_config_change: bool = setting("ORCH_ALLOW_CONFIG_CHANGE")
    #: ``--allow-world-size-change`` (or ``--nodes MIN:MAX``): a snapshot written by another
    #: number of ranks may be resumed (re-partitioned; see :mod:`trainer.reshape`).
    allow_world_size_change: bool = setting("ORCH_ALLOW_WORLD_SIZE_CHANGE")
    #: DDP on several nodes: each node's local rank 0 writes its own copy of every snapshot
    #: (the state is replicated in memory already); False: global rank 0 only.
    node_copies: bool = setting("ORCH_NODE_COPIES")
    #: ``--checkpoint-every`` (steps, a duration or auto; see :mod:`contract.interval`); None:
    #: the flag was not given, so the script's ``Checkpointer(every=...)`` if any, else auto.
    #: Text or an int given here is parsed by :func:`~contract.interval.parse_interval`.
    checkpoint_every: Interval | None = setting("ORCH_CHECKPOINT_EVERY")
    pg_timeout_s: float = setting("ORCH_PG_TIMEOUT_S")
    log_format: str | None = setting("ORCH_LOG_FORMAT")
    #: A warm spare group waits in ``resume()`` until this file appears (its promotion).
    spare_gate: str | None = setting("ORCH_SPARE_GATE")
    #: Unique per attempt; lets the supervisor find every process of an attempt.
    launch_token: str | None = setting("ORCH_LAUNCH_TOKEN")
    #: ``--on-divergence``: ``warn`` logs ``resume.diverged`` and trains on; ``fail`` raises a
    #: fatal error (exit 78) at the first re-executed step that differs from the journal.
    on_divergence: DivergenceAction = setting("ORCH_ON_DIVERGENCE")

    def __post_init__(self) -> None:
        if self.attempt < 0:
            raise ValueError(f"ORCH_ATTEMPT must be >= 0, got {self.attempt}")
        if self.node_rank < 0:
            raise ValueError(f"ORCH_NODE_RANK must be >= 0, got {self.node_rank}")
        every: object = self.checkpoint_every
        if every is not None and not isinstance(every, Interval):
            if not isinstance(every, (str, int)):
                raise ValueError(f"ORCH_CHECKPOINT_EVERY must be an Interval, got {every!r}")
            object.__setattr__(
                self, "checkpoint_every", parse_interval(every, name="ORCH_CHECKPOINT_EVERY")
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
        if self.on_divergence not in DIVERGENCE_ACTIONS:
            raise ValueError(
                f"ORCH_ON_DIVERGENCE must be one of {DIVERGENCE_ACTIONS}, got {self.on_divergence!r}"
            )
        if self.checkpoint_dir is not None and not self.checkpoint_dir:
            raise ValueError("ORCH_CHECKPOINT_DIR must not be empty when set")

    @classmethod
    def from_env(cls: type[E], env: Mapping[str, str] | None = None, **overrides: Any) -> E:
        """Read the contract from ``env`` (default: ``os.environ``); ValueError names a bad one.

        ``overrides`` fill fields of a subclass that are not ``ORCH_*`` variables.
        """
        source = os.environ if env is None else env
        raw = source.get("ORCH_RESUME_STEP", "").strip()
        mode: ResumeMode
        step: int | None = None
        if not raw:
            mode = "auto"
        elif raw.lower() == "none":
            mode = "fresh"
        else:
            try:
                step = int(raw)
            except ValueError:
                raise ValueError(
                    f"ORCH_RESUME_STEP must be an integer or 'none', got {raw!r}"
                ) from None
            mode = "step"
        return load(cls, source, resume_mode=mode, resume_step=step, **overrides)

    def to_env(self) -> dict[str, str]:
        """The variables to set; a variable of :data:`VARIABLES` absent here must be unset."""
        out: dict[str, str] = {}
        for f in fields(self):
            name = f.metadata.get("env")
            value = getattr(self, f.name)
            if name is None or value is None:
                continue
            out[name] = BY_NAME[name].format(value)
        if self.resume_mode == "fresh":
            out["ORCH_RESUME_STEP"] = "none"
        elif self.resume_mode == "step":
            out["ORCH_RESUME_STEP"] = str(self.resume_step)
        return out

    def apply(self, base: Mapping[str, str]) -> dict[str, str]:
        """``base`` (the inherited environment) with this contract in place of any inherited one.

        A contract variable inherited from the caller's shell (``ORCH_CHECKPOINT_EVERY``, a
        stale ``ORCH_RESUME_STEP``) would otherwise silently override what the supervisor meant.
        """
        env = {k: v for k, v in base.items() if k not in VARIABLES}
        env.update(self.to_env())
        return env


#: Every variable of the contract (set, or removed, by :meth:`WorkerEnv.apply`).
VARIABLES: frozenset[str] = frozenset(
    {str(f.metadata["env"]) for f in fields(WorkerEnv) if "env" in f.metadata} | {"ORCH_RESUME_STEP"}
)
#: Names the supervisor looks processes up by (``/proc/<pid>/environ``).
LAUNCH_TOKEN_VAR: str = env_var(WorkerEnv, "launch_token")
CHECKPOINT_DIR_VAR: str = env_var(WorkerEnv, "checkpoint_dir")
ATTEMPT_VAR: str = env_var(WorkerEnv, "attempt")
