"""The determinism audit: a per-rank journal of step fingerprints, checked on every recovery.

Every completed step leaves a cheap fingerprint in ``run/journal/rank-<R>.jsonl``: the exact
bits (``float.hex()``) of the ``loss`` metric passed to ``step_done`` when there is one, else of
every finite float metric, and at snapshot steps the per-component digests the checkpointer
holds (``Checkpointer.last_components``) if any. A step without metrics leaves nothing.

**Cost.** ``record()`` formats one short line and writes it with one ``write()`` on an
``O_APPEND`` file at once: 2.2 µs on its own, 10-15 µs inside a training loop, where the system
call runs with cold caches (``python -m bench --legs audit``: within noise for 30 ms steps, about
5% of a 0.3 ms step). Written at every step because a SIGKILLed rank's written lines survive in
the page cache while anything buffered in the process does not: fast steps would otherwise
leave the failed attempt's last steps unjournalled and the audit with nothing to compare. A torn
last line (a machine lost mid-write) is skipped when read.

**Bound.** When the file reaches :data:`JOURNAL_LIMIT` lines it is renamed to
``rank-<R>.jsonl.1`` (replacing the previous generation) and a new file is started with a copy
of the session's start line: at most about ``2 * JOURNAL_LIMIT`` lines (well under 1 MB) per
rank, whatever the run's length; a recovery window (steps since the last snapshot) is far
shorter.

**Comparison.** ``begin(S)`` (from ``Checkpointer.resume()``, ``S`` = the snapshot step, 0 for a
fresh start) reads both generations and keeps, for each step after ``S``, the latest entry of a
session with the same run id, config hash and world size; the highest such step is the *frontier* of the
failed attempt(s). Every re-executed step up to the frontier is compared exactly with it (each
fingerprint name both sides have, and component digests when both sides have them). The first
mismatch logs ``resume.diverged`` as a warning and writes a ``diverged`` report
(``run/determinism/rank-<R>.json``, :class:`~contract.documents.DeterminismReport`); with
``--on-divergence fail`` (``ORCH_ON_DIVERGENCE=fail``) the rank then raises
:class:`ResumeDiverged`, a fatal error (exit 78) naming the step and the fingerprint. Reaching
the frontier without a mismatch writes ``verified`` with ``checked_through_step`` = the
frontier. ``diverged`` is sticky for the run: a later verified recovery does not clear it.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Mapping
from dataclasses import replace
from typing import Any

import structlog

from contract.documents import (
    DeterminismReport,
    JournalEntry,
    JournalStart,
    parse_journal_line,
    read_document,
    write_document,
)
from contract.paths import RunPaths
from storage.content import FORMAT as DIGEST_FORMAT
from storage.content import FORMAT_V1
from trainer.errors import FatalTrainerError

log = structlog.get_logger("trainer.journal")

#: Lines in the current journal file before it is rotated to ``rank-<R>.jsonl.1``.
JOURNAL_LIMIT = 4096

_DUMPS = json.JSONEncoder(separators=(",", ":")).encode
#: Metric names as JSON strings (the fingerprint values, ``float.hex()`` text, need no escaping).
_NAMES: dict[str, str] = {}


def _fp_json(fp: dict[str, str]) -> str:
    """``fp`` as compact JSON, the same text as ``_DUMPS(fp)``, a few times faster."""
    parts = []
    for name, bits in fp.items():
        quoted = _NAMES.get(name)
        if quoted is None:
            quoted = _DUMPS(name)
            if len(_NAMES) < 1024:  # bounded: a script inventing names per step pays the encode
                _NAMES[name] = quoted
        parts.append(f'{quoted}:"{bits}"')
    return "{" + ",".join(parts) + "}"


class ResumeDiverged(FatalTrainerError):
    """A step re-executed after a resume differs from what the failed attempt journaled."""

    def __init__(self, *, step: int, resumed_from: int, name: str, expected: str, got: str,
                 rank: int) -> None:
        self.step = step
        self.name = name
        super().__init__(
            f"resume is not deterministic: rank {rank} re-executed step {step} after resuming "
            f"from step {resumed_from} and its {name} differs from the failed attempt's journal "
            f"(expected {expected}, got {got}); launch with --on-divergence warn to train on"
        )


def _float(value: Any) -> float | None:
    """``value`` as a Python float when it is a floating-point scalar, else None."""
    if type(value) is float:
        return value
    if isinstance(value, float):
        return float(value)
    item = getattr(value, "item", None)
    dtype = getattr(value, "dtype", None)
    if item is None or dtype is None or getattr(value, "shape", ()) not in ((), (1,)):
        return None
    is_float = getattr(dtype, "is_floating_point", None)
    if is_float is None:
        is_float = getattr(dtype, "kind", "") == "f"  # numpy
    if not is_float:
        return None
    out = item()
    return out if isinstance(out, float) else None


def fingerprint(metrics: Mapping[str, Any] | None) -> dict[str, str] | None:
    """The step's fingerprint: ``{"loss": bits}`` when ``loss`` is a float metric, else the bits
    of every finite float metric; None when there is nothing to record."""
    if not metrics:
        return None
    loss = _float(metrics.get("loss"))
    if loss is not None:
        return {"loss": loss.hex()}
    out: dict[str, str] = {}
    for name, raw in metrics.items():
        value = _float(raw)
        if value is not None and math.isfinite(value):
            out[str(name)] = value.hex()
    return out or None


class Journal:
    """One rank's journal and resume audit (see the module docstring)."""

    def __init__(
        self,
        paths: RunPaths,
        *,
        rank: int,
        run_id: str,
        attempt: int,
        config_hash: str | None,
        on_divergence: str = "warn",
        limit: int = JOURNAL_LIMIT,
        world_size: int | None = None,
    ) -> None:
        self.paths = paths
        self.world_size = world_size
        self.rank = rank
        self.run_id = run_id
        self.attempt = attempt
        self.config_hash = config_hash
        self.on_divergence = on_divergence
        self.limit = max(2, limit)
        self._fd: int | None = None
        #: Set when the journal file cannot be opened: the audit is off, training goes on.
        self.disabled = False
        self._lines = 0
        self._start_line = ""
        self._expected: dict[int, JournalEntry] = {}
        self.resumed_from: int | None = None
        #: The highest step the failed attempt(s) journaled after the resume point (None: none).
        self.frontier: int | None = None
        self._checking = False
        self.compared = 0
        self.report: DeterminismReport | None = None

    # -- session --------------------------------------------------------------------------

    def begin(self, resumed_from: int) -> None:
        """Start this attempt's session; load what earlier sessions journaled after the resume."""
        self._close_fd()
        self.resumed_from = resumed_from
        self._expected, self._lines = self._load(resumed_from)
        self.frontier = max(self._expected) if self._expected else None
        self._checking = self.frontier is not None
        self.compared = 0
        start = JournalStart(run_id=self.run_id, attempt=self.attempt, rank=self.rank,
                             resumed_from=resumed_from, config_hash=self.config_hash, time=time.time(),
                             world_size=self.world_size, digest_format=DIGEST_FORMAT)
        self._start_line = _DUMPS(start.to_json()) + "\n"
        self._open()
        self._write(self._start_line)
        self._lines += 1
        if self._checking:
            log.info("resume.audit", rank=self.rank, resumed_from=resumed_from,
                     frontier=self.frontier, journaled_steps=len(self._expected))

    def _load(self, resumed_from: int) -> tuple[dict[int, JournalEntry], int]:
        """(entries after ``resumed_from`` of matching sessions, lines in the current file)."""
        expected: dict[int, JournalEntry] = {}
        matching = same_digests = False
        lines = 0
        for path in (self.paths.journal_old(self.rank), self.paths.journal(self.rank)):
            try:
                with open(path, "rb") as f:
                    data = f.read()
            except FileNotFoundError:
                continue
            except OSError as exc:
                log.warning("journal.unreadable", path=path, error=str(exc))
                continue
            lines = 0
            for raw in data.splitlines():
                lines += 1
                record = parse_journal_line(raw)
                if isinstance(record, JournalStart):
                    matching = (record.run_id == self.run_id and record.rank == self.rank
                                and record.config_hash == self.config_hash
                                and record.world_size == self.world_size)
                    # A session of another release may define component digests differently
                    # (format 1 hashed raw bytes): its losses still compare, its digests not.
                    same_digests = (record.digest_format or FORMAT_V1) == DIGEST_FORMAT
                elif isinstance(record, JournalEntry) and matching and record.step > resumed_from:
                    if not same_digests and record.components is not None:
                        record = replace(record, components=None)
                    expected[record.step] = record
        return expected, lines

    def _reopen(self) -> None:
        """Open the file outside ``begin()``: after ``close()``, or for a script that never
        called ``resume()`` (its session starts without an audit)."""
        if not self._start_line:
            start = JournalStart(run_id=self.run_id, attempt=self.attempt, rank=self.rank,
                                 resumed_from=0, config_hash=self.config_hash, time=time.time(),
                                 digest_format=DIGEST_FORMAT)
            self._start_line = _DUMPS(start.to_json()) + "\n"
            self._open()
            self._write(self._start_line)
            self._lines += 1
        else:
            self._open()

    def _open(self) -> None:
        if self.disabled:
            return
        try:
            os.makedirs(self.paths.journal_dir, exist_ok=True)
            self._fd = os.open(self.paths.journal(self.rank), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        except OSError as exc:  # the audit never stops training
            self.disabled = True
            log.warning("journal.disabled", path=self.paths.journal(self.rank), error=str(exc))

    def _close_fd(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def close(self) -> None:
        """Close the file (a later record reopens it)."""
        self._close_fd()

    # -- per step -------------------------------------------------------------------------

    def record(self, step: int, metrics: Mapping[str, Any] | None,
               components: Any = None) -> None:
        """Journal ``step``'s fingerprint (and ``components``, a name -> digest dict) and, while
        the resume audit runs, compare it with the failed attempt's."""
        fp = fingerprint(metrics)
        comps = components if isinstance(components, dict) and components else None
        if fp is not None or comps is not None:
            self._append(step, fp, comps)
        if self._checking:
            self._check(step, fp, comps)

    def _append(self, step: int, fp: dict[str, str] | None, comps: dict[str, str] | None) -> None:
        if self._fd is None:
            self._reopen()
        if self._fd is None:  # disabled
            return
        if comps is None:
            line = f'{{"step":{step},"attempt":{self.attempt},"fp":{_fp_json(fp or {})}}}\n'
        else:
            line = _DUMPS(JournalEntry(step=step, attempt=self.attempt, fp=fp or {},
                                       components=comps).to_json()) + "\n"
        self._write(line)
        self._lines += 1
        if self._lines >= self.limit:
            self._rotate()

    def _write(self, text: str) -> None:
        if self._fd is None:
            return
        data = text.encode()
        try:
            while data:
                data = data[os.write(self._fd, data):]
        except OSError as exc:  # the audit never stops training
            log.warning("journal.write_failed", path=self.paths.journal(self.rank), error=str(exc))

    def _rotate(self) -> None:
        self._close_fd()
        try:
            os.replace(self.paths.journal(self.rank), self.paths.journal_old(self.rank))
        except OSError as exc:
            log.warning("journal.rotate_failed", path=self.paths.journal(self.rank), error=str(exc))
        self._open()
        self._write(self._start_line)
        self._lines = 1

    # -- the audit ------------------------------------------------------------------------

    def _check(self, step: int, fp: dict[str, str] | None, comps: dict[str, str] | None) -> None:
        expected = self._expected.get(step)
        if expected is not None:
            for name, want in expected.fp.items():
                got = None if fp is None else fp.get(name)
                if got is not None and got != want:
                    self._diverged(step, name, want, got)
                    return
            if expected.components and comps:
                for name, want in expected.components.items():
                    got = comps.get(name)
                    if got is not None and got != want:
                        self._diverged(step, f"component:{name}", want, got)
                        return
            self.compared += 1
        assert self.frontier is not None
        if step >= self.frontier:
            self._checking = False
            self._verified()

    def _previous(self) -> DeterminismReport | None:
        report = read_document(self.paths.determinism(self.rank), DeterminismReport)
        if report is None or report.run_id != self.run_id:
            return None
        return report

    def _write_report(self, report: DeterminismReport) -> None:
        self.report = report
        try:
            os.makedirs(self.paths.determinism_dir, exist_ok=True)
            write_document(self.paths.determinism(self.rank), report, durable=False)
        except OSError as exc:
            log.warning("journal.report_failed", error=str(exc))

    def _verified(self) -> None:
        frontier = self.frontier
        log.info("resume.verified", rank=self.rank, resumed_from=self.resumed_from,
                 checked_through_step=frontier, steps_compared=self.compared)
        previous = self._previous()
        if previous is not None and previous.state == "diverged":
            self.report = previous
            return
        through = frontier
        if previous is not None and previous.checked_through_step is not None:
            through = max(frontier or 0, previous.checked_through_step)
        self._write_report(DeterminismReport(
            rank=self.rank, state="verified", run_id=self.run_id, attempt=self.attempt,
            resumed_from=self.resumed_from, checked_through_step=through, time=time.time(),
        ))

    def _diverged(self, step: int, name: str, expected: str, got: str) -> None:
        self._checking = False
        resumed_from = self.resumed_from or 0
        log.warning("resume.diverged", rank=self.rank, step=step, fingerprint=name,
                    expected=expected, got=got, resumed_from=resumed_from,
                    frontier=self.frontier, action=self.on_divergence)
        previous = self._previous()
        if previous is not None and previous.state == "diverged":
            self.report = previous
        else:
            self._write_report(DeterminismReport(
                rank=self.rank, state="diverged", run_id=self.run_id, attempt=self.attempt,
                resumed_from=resumed_from, checked_through_step=step - 1 if step > 0 else None,
                first_divergence_step=step, fingerprint=name, expected=expected, got=got,
                time=time.time(),
            ))
        if self.on_divergence == "fail":
            raise ResumeDiverged(step=step, resumed_from=resumed_from, name=name,
                                 expected=expected, got=got, rank=self.rank)
