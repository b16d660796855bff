"""Typed error family of the worker-side library and the process-level error handler.

Every error the trainer raises on purpose derives from :class:`TrainerError`; the subclasses
of :class:`FatalTrainerError` mean that relaunching the worker group cannot help (a changed
configuration, bad arguments, a different world size), which the supervisor learns through the
``fatal`` field of the error file written by :func:`write_error_file`. Storage failures
(``CorruptSnapshot``, ``DiskFull``, ...) keep their own types from ``storage.errors`` so that
their names reach the error file and the logs unchanged.
"""

from __future__ import annotations

import os
import time
import traceback
from collections.abc import Mapping
from typing import Any

from contract.codes import EXIT_FAILED
from contract.documents import ErrorRecord, write_document
from contract.paths import RunPaths

#: Exit status of a worker that failed in a way a relaunch may fix (the contract's EXIT_FAILED).
EXIT_FAILURE = EXIT_FAILED


class TrainerError(Exception):
    """Base class of every error raised on purpose by the ``trainer`` package."""

    fatal: bool = False


class Preempted(TrainerError):
    """Raised on every rank at the agreed stop step once the emergency snapshot is committed.

    :func:`trainer.run` turns it into exit status :data:`EXIT_PREEMPTED` without an error file.
    """

    def __init__(self, step: int) -> None:
        super().__init__(f"preempted after step {step}; emergency snapshot committed")
        self.step = step


class FatalTrainerError(TrainerError):
    """An error that a relaunch of the worker group cannot fix."""

    fatal = True


class UsageError(FatalTrainerError):
    """Bad arguments or settings given to the training script or the library."""


class ConfigMismatch(FatalTrainerError):
    """The hyperparameters of the run differ from those recorded in the snapshot to resume."""

    def __init__(self, step: int, differences: Mapping[str, tuple[Any, Any]]) -> None:
        self.step = step
        self.differences = dict(differences)
        keys = ", ".join(sorted(self.differences))
        details = "; ".join(
            f"{k}: snapshot={self.differences[k][0]!r} now={self.differences[k][1]!r}"
            for k in sorted(self.differences)
        )
        super().__init__(
            f"hyperparameters differ from snapshot step {step} in keys [{keys}] ({details}); "
            "launch with --allow-config-change (ORCH_ALLOW_CONFIG_CHANGE=1, or "
            "Checkpointer(resume_policy=ResumePolicy(allow_config_change=True)) in code) "
            "to resume anyway"
        )


class WorldSizeMismatch(FatalTrainerError):
    """The snapshot was written by a worker group of a different size."""

    def __init__(self, step: int, saved: int, current: int) -> None:
        self.step = step
        self.saved = saved
        self.current = current
        super().__init__(
            f"snapshot step {step} was written with world size {saved} but this group has "
            f"world size {current}; relaunch with {saved} ranks, or with "
            f"--allow-world-size-change (ORCH_ALLOW_WORLD_SIZE_CHANGE=1) to re-partition it "
            f"(the README's 'World-size changes' says what stays bit-exact)"
        )


class StateMismatch(FatalTrainerError):
    """The snapshot's components (scheduler, EMA, extras, loader) differ from the registered ones."""


class CodecError(TrainerError):
    """A state object cannot be encoded, or a stored tree/arena pair cannot be decoded."""


class ResumeError(TrainerError):
    """A snapshot could not be selected or loaded consistently on every rank."""


class SnapshotError(TrainerError):
    """A snapshot could not be taken (inconsistent ranks, bad state)."""


class PeerFailure(TrainerError):
    """Another rank failed during a collective step (resume); carries that rank's fatality."""

    def __init__(self, message: str, *, fatal: bool) -> None:
        super().__init__(message)
        self.fatal = fatal


class GroupTornDown(BaseException):
    """torchrun is stopping this rank because another rank of its node already exited.

    Raised from the SIGTERM handler (see :mod:`trainer.preemption`). A ``BaseException``, like
    ``KeyboardInterrupt``, so that a training loop's ``except Exception`` does not swallow it.
    """


def error_record(exc: BaseException, *, rank: int, attempt: int) -> ErrorRecord:
    """The error file of ``exc`` (``run/errors/attempt-<A>/rank-<R>.json``)."""
    return ErrorRecord(
        rank=rank,
        attempt=attempt,
        time=time.time(),
        type=type(exc).__name__,
        message=str(exc),
        traceback="".join(traceback.format_exception(exc)),
        fatal=is_fatal(exc),
    )


def is_fatal(exc: BaseException) -> bool:
    """Tell whether relaunching cannot fix ``exc`` (see :class:`FatalTrainerError`)."""
    return bool(getattr(exc, "fatal", False))


def write_error_file(
    checkpoint_dir: str, exc: BaseException, *, rank: int, attempt: int
) -> str:
    """Write the error file of this rank and attempt atomically and return its path."""
    paths = RunPaths.of(checkpoint_dir)
    os.makedirs(paths.errors_dir(attempt), exist_ok=True)
    path = paths.error_file(attempt, rank)
    write_document(path, error_record(exc, rank=rank, attempt=attempt), durable=True)
    return path
