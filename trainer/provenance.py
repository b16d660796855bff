"""What every snapshot's manifest records about the run besides the training state itself.

:class:`Provenance` holds the run's canonical hyperparameters and their hash, the script's git
commit (looked up once, at the first snapshot), user metadata and the :class:`BestPolicy`, and
builds the ``metadata`` object of each manifest: those plus the torch version, learning rates,
the step's metrics, the best value so far and the attempt. A resume compares the recorded
hyperparameters with the current ones (:mod:`trainer.resume`); the supervisor's ``--keep-best``
ranks snapshots by the metric the recorded policy names (:mod:`storage.retention`).
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from collections.abc import Mapping
from typing import Any

import torch

from trainer.errors import UsageError
from trainer.exports import MANIFEST_KEY, BestPolicy, json_metric
from trainer.state import TrainingState


def normalize_hparams(hparams: Mapping[str, Any]) -> dict[str, Any]:
    """Hyperparameters as canonical JSON values (tuples become lists); UsageError if not JSON-able."""
    try:
        text = json.dumps(dict(hparams), sort_keys=True, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise UsageError(f"hparams must be JSON-serialisable with finite floats: {exc}") from exc
    value: dict[str, Any] = json.loads(text)
    return value


def config_hash(hparams: Mapping[str, Any]) -> str:
    """sha256 of the canonical JSON of ``hparams``."""
    text = json.dumps(normalize_hparams(hparams), sort_keys=True, separators=(",", ":"))
    return "sha256:" + hashlib.sha256(text.encode()).hexdigest()


def git_commit(directory: str) -> str | None:
    """``git rev-parse HEAD`` in ``directory``; None when not a repository or git is missing."""
    try:
        proc = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=directory,
            capture_output=True,
            text=True,
            timeout=5,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    commit = proc.stdout.strip()
    return commit if proc.returncode == 0 and commit else None


class Provenance:
    """The run's description recorded in each manifest (see the module docstring)."""

    def __init__(
        self, hparams: Mapping[str, Any], *, metadata: Mapping[str, Any] | None, best: BestPolicy | None
    ) -> None:
        self.hparams = normalize_hparams(hparams)
        self.config_hash = config_hash(self.hparams)
        self.metadata: dict[str, Any] = dict(metadata or {})
        self.best = best
        self._git_commit: str | None = None
        self._git_checked = False

    def _commit(self) -> str | None:
        # Looked up lazily: a subprocess per run, not per snapshot, and none for runs that never save.
        if not self._git_checked:
            script = sys.argv[0] if sys.argv and sys.argv[0] else ""
            self._git_commit = git_commit(os.path.dirname(os.path.abspath(script)) or os.getcwd())
            self._git_checked = True
        return self._git_commit

    def manifest_metadata(
        self, state: TrainingState, metrics: Mapping[str, Any], *, attempt: int
    ) -> dict[str, Any]:
        """The ``metadata`` object of a manifest for ``state`` now, with the step's ``metrics``."""
        lrs = state.lr()
        return {
            "hparams": self.hparams,
            "config_hash": self.config_hash,
            "git_commit": self._commit(),
            "dataset_version": self.metadata.get(
                "dataset_version", state.metadata.get("dataset_version")
            ),
            "torch_version": torch.__version__,
            "lr": json_metric(lrs[0]) if lrs else None,
            "lrs": [json_metric(x) for x in lrs],
            "metrics": dict(metrics),
            "best_metric": json_metric(state.best_metric),
            # The run's one declaration of its best metric: the supervisor's --keep-best reads it.
            MANIFEST_KEY: None if self.best is None else self.best.manifest_record(),
            "user": json.loads(json.dumps({**state.metadata, **self.metadata}, default=str)),
            "attempt": attempt,
        }
