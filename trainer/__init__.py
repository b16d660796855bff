"""Worker-side library of the orchestrator: everything a training script needs to be resumable.

A script builds its model as usual, registers what makes up its training state in a
:class:`TrainingState`, hands it to a :class:`Checkpointer`, calls ``resume()`` before the loop,
``step_done(step)`` after each step and ``finish()`` at the end, and runs under :func:`run`
so that failures reach the supervisor as error files and exit codes (:func:`run_script`, or
``python -m trainer.script``, for a module-level script without a ``main``); it seeds every RNG
per rank with :func:`seed_everything`. Killed at any moment and relaunched, it finishes with
weights and state bit-identical to an uninterrupted run.

Only what a training script uses is exported here; everything else is imported from the module
that defines it (``trainer.codec``, ``trainer.errors``, ``trainer.settings``, ``trainer.resume``,
``trainer.exports``, ``contract.codes`` for exit codes, ...).
"""

from trainer.checkpoint import Checkpointer
from trainer.data import ResumableDistributedSampler, ResumableLoader, SampleKey, sample_generator
from trainer.distributed import DistContext, init_distributed
from trainer.errors import Preempted, TrainerError, UsageError
from trainer.exports import BestPolicy
from trainer.runtime import entrypoint, run, run_script
from trainer.seeding import seed_everything
from trainer.state import Stateful, TrainingState

__all__ = [
    "BestPolicy",
    "Checkpointer",
    "DistContext",
    "Preempted",
    "ResumableDistributedSampler",
    "ResumableLoader",
    "SampleKey",
    "Stateful",
    "TrainerError",
    "TrainingState",
    "UsageError",
    "entrypoint",
    "init_distributed",
    "run",
    "run_script",
    "sample_generator",
    "seed_everything",
]
