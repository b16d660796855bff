"""The supervisor side of the fault-tolerant training orchestrator.

``orchestrator launch`` runs a training script under torchrun, relaunches it from the newest
verified snapshot when it fails, and records the run's state for ``orchestrator status`` and
``orchestrator snapshots``. Nothing here imports torch or the ``trainer`` package: the supervisor
talks to workers only through environment variables, files in the checkpoint dir and exit codes.
"""
