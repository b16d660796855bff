"""Worker-side library of the orchestrator: everything a training script needs to be resumable.

A script builds its model as usual, registers what makes up its training state in a
:class:`TrainingState`, hands it to a :class:`Checkpointer`, calls ``resume()`` before the loop,
``step_done(step)`` after each step and ``finish()`` at the end, and runs under :func:`run`
so that failures reach the supervisor as error files and exit codes. Killed at any moment and
relaunched, it finishes with weights and state bit-identical to an uninterrupted run.
"""

from contract.codes import EXIT_FATAL, EXIT_PREEMPTED
from contract.faults import FaultInjector, FaultRule, parse_faults
from trainer.checkpoint import Checkpointer, PeerFailure, config_hash, write_weights_export
from trainer.codec import StagingArena, decode, encode, encode_to_bytes, state_digest
from trainer.data import (
    ResumableDistributedSampler,
    ResumableLoader,
    SampleKey,
    sample_generator,
    sample_seed,
)
from trainer.distributed import DistContext, init_distributed, shutdown
from trainer.errors import (
    EXIT_FAILURE,
    CodecError,
    ConfigMismatch,
    FatalTrainerError,
    Preempted,
    ResumeError,
    SnapshotError,
    StateMismatch,
    TrainerError,
    UsageError,
    WorldSizeMismatch,
)
from trainer.runtime import configure_worker_logging, entrypoint, run
from trainer.settings import WorkerSettings
from trainer.state import Stateful, TrainingState, capture_rng, restore_rng, unwrap_model
from trainer.writer import BackgroundWriter

__all__ = [
    "EXIT_FAILURE",
    "EXIT_FATAL",
    "EXIT_PREEMPTED",
    "BackgroundWriter",
    "Checkpointer",
    "CodecError",
    "ConfigMismatch",
    "DistContext",
    "FatalTrainerError",
    "FaultInjector",
    "FaultRule",
    "PeerFailure",
    "Preempted",
    "ResumableDistributedSampler",
    "ResumableLoader",
    "ResumeError",
    "SampleKey",
    "SnapshotError",
    "StagingArena",
    "StateMismatch",
    "Stateful",
    "TrainerError",
    "TrainingState",
    "UsageError",
    "WorkerSettings",
    "WorldSizeMismatch",
    "capture_rng",
    "config_hash",
    "configure_worker_logging",
    "decode",
    "encode",
    "encode_to_bytes",
    "entrypoint",
    "init_distributed",
    "parse_faults",
    "restore_rng",
    "run",
    "sample_generator",
    "sample_seed",
    "shutdown",
    "state_digest",
    "unwrap_model",
    "write_weights_export",
]
