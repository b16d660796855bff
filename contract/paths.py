"""Where the supervisor and the workers find each other's files under ``<checkpoint-dir>/run``.

Both processes compute every run-file path from this one class, so a rename can never leave
them looking in different places. The snapshot layout itself (``snapshots/step-<N>``) belongs
to :mod:`storage.layout`; the documents stored at these paths are in :mod:`contract.documents`.
Layout: docs/INTERNALS.md.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

RUN_DIR = "run"


@dataclass(frozen=True)
class RunPaths:
    """Absolute paths of the run files of one checkpoint dir."""

    checkpoint_dir: str

    @classmethod
    def of(cls, checkpoint_dir: str) -> RunPaths:
        return cls(os.path.abspath(checkpoint_dir))

    @property
    def run_dir(self) -> str:
        return os.path.join(self.checkpoint_dir, RUN_DIR)

    @property
    def state(self) -> str:
        """Supervisor -> operators: ``state.json`` (the ``status --json`` document)."""
        return os.path.join(self.run_dir, "state.json")

    @property
    def events(self) -> str:
        """Supervisor -> operators: ``events.jsonl``, one structured event per line."""
        return os.path.join(self.run_dir, "events.jsonl")

    @property
    def lock(self) -> str:
        return os.path.join(self.run_dir, "supervisor.lock")

    @property
    def logs_dir(self) -> str:
        return os.path.join(self.run_dir, "logs")

    def attempt_log(self, attempt: int) -> str:
        """torchrun's combined output of one attempt."""
        return os.path.join(self.logs_dir, f"attempt-{attempt}.log")

    def hang_dir(self, attempt: int) -> str:
        """Every rank's stack when the watchdog found ``attempt`` hung (orchestrator.forensics)."""
        return os.path.join(self.logs_dir, f"hang-attempt-{attempt}")

    @property
    def progress_dir(self) -> str:
        return os.path.join(self.run_dir, "progress")

    def heartbeat(self, rank: int) -> str:
        """Rank -> supervisor: the rank's :class:`~contract.documents.Heartbeat`."""
        return os.path.join(self.progress_dir, f"rank-{rank}.json")

    @property
    def control_dir(self) -> str:
        return os.path.join(self.run_dir, "control")

    @property
    def preempt_request(self) -> str:
        """Supervisor -> workers: take an emergency snapshot and stop (a PreemptRequest)."""
        return os.path.join(self.control_dir, "preempt.json")

    @property
    def preempt_ack(self) -> str:
        """Rank 0 -> supervisor: the emergency snapshot at ``step`` is committed (a PreemptAck)."""
        return os.path.join(self.control_dir, "preempted.json")

    def errors_dir(self, attempt: int) -> str:
        return os.path.join(self.run_dir, "errors", f"attempt-{attempt}")

    def error_file(self, attempt: int, rank: int) -> str:
        """Rank -> supervisor: why this rank of ``attempt`` failed (an ErrorRecord)."""
        return os.path.join(self.errors_dir(attempt), f"rank-{rank}.json")

    @property
    def spare_dir(self) -> str:
        return os.path.join(self.run_dir, "spare")

    def spare_gate(self, attempt: int) -> str:
        """Supervisor -> a warm spare group: you are promoted, resume from (a SpareGate)."""
        return os.path.join(self.spare_dir, f"attempt-{attempt}.json")

    @property
    def journal_dir(self) -> str:
        return os.path.join(self.run_dir, "journal")

    def journal(self, rank: int) -> str:
        """Rank -> itself on a later attempt: the step fingerprints it completed (JSON lines of
        :class:`~contract.documents.JournalEntry`); bounded by rotation into :meth:`journal_old`."""
        return os.path.join(self.journal_dir, f"rank-{rank}.jsonl")

    def journal_old(self, rank: int) -> str:
        """The previous generation of :meth:`journal` (read before it; replaced on rotation)."""
        return os.path.join(self.journal_dir, f"rank-{rank}.jsonl.1")

    @property
    def determinism_dir(self) -> str:
        return os.path.join(self.run_dir, "determinism")

    def determinism(self, rank: int) -> str:
        """Rank -> supervisor and ``status``: the rank's resume audit (a DeterminismReport)."""
        return os.path.join(self.determinism_dir, f"rank-{rank}.json")
