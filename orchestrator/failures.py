"""Root cause of a failed attempt, from the workers' error files or torchrun's failure summary.

A failing worker's top-level handler writes ``run/errors/attempt-<A>/rank-<R>.json``; the root
cause is the record with the smallest ``time`` (later ranks usually fail *because* the first one
died). A rank that was SIGKILLed or OOM-killed writes nothing, so the fallback is the "Root Cause
(first observed failure)" block torchrun prints when it gives up, which names the rank, its exit
code and, for a signal, the signal's name.

A script that cannot even start (an ``ImportError``, ``ModuleNotFoundError`` or ``SyntaxError``)
is named too: from its error file's ``type`` when it failed inside ``trainer.run``, else from
the traceback the rank printed into the attempt log before the trainer was imported. Whether
that is fatal depends on the attempt's progress, which only the policy knows
(:attr:`Failure.startup_error`, :func:`orchestrator.policy.decide`).
"""

from __future__ import annotations

import os
import re
import signal
from dataclasses import dataclass

from contract.codes import EXIT_FATAL
from contract.documents import DamagedDocument, ErrorRecord, parse_document, read_json
from contract.paths import RunPaths

_MESSAGE_LIMIT = 500
_LOG_TAIL_BYTES = 256 * 1024
_ERROR_FILE = re.compile(r"^rank-(\d+)\.json$")
_ROOT_CAUSE = "Root Cause (first observed failure):"
_OTHER_FAILURES = "Failures:"
#: torchrun stops the surviving ranks with SIGTERM: such deaths are consequences, never causes.
_TEARDOWN_SIGNALS = ("SIGTERM",)
#: torchrun's rendezvous errors, named in the traceback it prints before any worker started.
_RENDEZVOUS_ERROR = re.compile(r"\b(Rendezvous(?:Closed|Timeout|Connection|State)Error)\b:?\s*(.*)")
#: Errors that a relaunch cannot fix when they happen at start-up (the policy gives up at once
#: on them if the attempt made no progress); subclasses by name, as error files carry names.
STARTUP_ERROR_TYPES = frozenset(
    {"ImportError", "ModuleNotFoundError", "SyntaxError", "IndentationError", "TabError"}
)
_STARTUP_TYPE = "|".join(sorted(STARTUP_ERROR_TYPES))
#: The last line of such a traceback printed by a rank (torchrun may prefix "[rankN]:"). Two
#: ranks printing at once can double the name ("ImportErrorImportError: : message").
_STARTUP_ERROR_LINE = re.compile(
    r"^(?:\[[^\]]*\]:\s*)?(?P<type>" + _STARTUP_TYPE + r")(?:" + _STARTUP_TYPE + r")*"
    r"\b(?P<rest>.*)$",
    re.M,
)
#: The separators left in front of a message when two ranks' ": " interleaved.
_LEADING_COLONS = re.compile(r"^(?:\s*:)+\s*")
_FIELD = re.compile(r"^\s*(?P<key>rank|exitcode|traceback|error_file)\s*:\s*(?P<value>.*?)\s*$")


@dataclass(frozen=True, kw_only=True)
class Failure:
    """Why an attempt failed, in one line for operators plus what the restart policy needs."""

    summary: str
    fatal: bool
    rank: int | None = None
    exit_code: int | None = None
    source: str = "exit_code"
    #: The root cause's exception class name, where known (error file or printed traceback).
    error_type: str | None = None

    @property
    def startup_error(self) -> bool:
        """An import or syntax error: fatal when the attempt made no progress (policy)."""
        return self.error_type in STARTUP_ERROR_TYPES


@dataclass(frozen=True, kw_only=True)
class TorchrunRootCause:
    """The parsed "Root Cause (first observed failure)" block of torchrun's output."""

    rank: int | None
    exit_code: int | None
    signal_name: str | None
    traceback: str | None

    def describe(self) -> str:
        who = f"rank {self.rank}" if self.rank is not None else "a worker"
        if self.signal_name:
            return f"{who} killed by {self.signal_name}"
        if self.exit_code is not None:
            return f"{who} exited with code {self.exit_code}"
        return f"{who} failed"


def signal_name(code: int) -> str | None:
    """``SIGKILL`` for -9 (Popen's convention for death by signal); None otherwise."""
    if code >= 0:
        return None
    try:
        return signal.Signals(-code).name
    except ValueError:
        return f"signal {-code}"


def _parse_entry(values: dict[str, str]) -> TorchrunRootCause:
    rank: int | None = None
    if m_rank := re.match(r"^(-?\d+)", values.get("rank", "")):
        rank = int(m_rank.group(1))
    exit_code: int | None = None
    sig: str | None = None
    if m_exit := re.match(r"^(-?\d+)", values.get("exitcode", "")):
        exit_code = int(m_exit.group(1))
        sig = signal_name(exit_code)
    if m_sig := re.search(r"\((SIG[A-Z0-9]+)\)", values.get("exitcode", "")):
        sig = m_sig.group(1)
    tb = values.get("traceback")
    if tb and tb.startswith("To enable traceback"):
        tb = None
    return TorchrunRootCause(rank=rank, exit_code=exit_code, signal_name=sig, traceback=tb)


def _parse_entries(block: str) -> list[TorchrunRootCause]:
    """The ``[i]:`` entries of one block of torchrun's failure summary."""
    entries: list[dict[str, str]] = []
    for line in block.splitlines():
        if line.startswith("====="):
            break
        if re.match(r"^\[\d+\]:\s*$", line.strip()):
            entries.append({})
            continue
        m = _FIELD.match(line)
        if m and entries and m.group("key") not in entries[-1]:
            entries[-1][m.group("key")] = m.group("value")
    return [_parse_entry(e) for e in entries]


def parse_torchrun_root_cause(text: str) -> TorchrunRootCause | None:
    """Parse the last root-cause block in torchrun output; None when there is none."""
    start = text.rfind(_ROOT_CAUSE)
    if start < 0:
        return None
    entries = _parse_entries(text[start + len(_ROOT_CAUSE) :])
    return entries[0] if entries else None


def parse_torchrun_failures(text: str) -> list[TorchrunRootCause]:
    """Every failed rank torchrun reported in its last summary, root cause first."""
    start = text.rfind(_ROOT_CAUSE)
    if start < 0:
        return []
    root = _parse_entries(text[start + len(_ROOT_CAUSE) :])
    others_at = text.rfind(_OTHER_FAILURES, 0, start)
    others = _parse_entries(text[others_at + len(_OTHER_FAILURES) : start]) if others_at >= 0 else []
    return root + others


def _clip(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= _MESSAGE_LIMIT else text[: _MESSAGE_LIMIT - 3] + "..."


def _describe(record: ErrorRecord) -> str:
    kind = record.type
    if kind == "ConfigMismatch":
        # The worker names its environment variable; operators use the launch flag. Put
        # first so that clipping a long message never drops it.
        kind += " [relaunch with --allow-config-change to resume anyway]"
    return f"rank {record.rank}: {kind}: {record.message}" if record.message else (
        f"rank {record.rank}: {kind}"
    )


def reported_corrupt_snapshot(paths: RunPaths, attempt: int) -> bool:
    """Whether a rank of ``attempt`` failed on a snapshot that did not verify while loading.

    The rank that found the damage reports ``CorruptSnapshot``; its peers report a
    ``PeerFailure`` that names it.
    """
    return any(
        f.type == "CorruptSnapshot" or ": CorruptSnapshot:" in f.message
        for f in _read_error_files(paths.errors_dir(attempt))
    )


def _read_error_files(errors_dir: str) -> list[ErrorRecord]:
    """The attempt's error files, earliest first (junk skipped)."""
    try:
        names = sorted(os.listdir(errors_dir))
    except FileNotFoundError:
        return []
    records = []
    for name in names:
        m = _ERROR_FILE.match(name)
        if not m:
            continue
        doc = read_json(os.path.join(errors_dir, name))
        record = None if doc is None else ErrorRecord.from_json(doc, rank=int(m.group(1)))
        if record is not None:
            records.append(record)
    records.sort(key=lambda r: (r.time, r.rank))
    return records


def _read_tail(path: str) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - _LOG_TAIL_BYTES))
            return f.read().decode("utf-8", errors="replace")
    except FileNotFoundError:
        return ""


def logged_failures(text: str, attempt: int) -> list[ErrorRecord]:
    """The ``worker.failed`` records the ranks logged (JSON log lines in torchrun's output), in
    the order they appear: the error files' content, for when those could not be written."""
    records: list[ErrorRecord] = []
    for line in text.splitlines():
        at = line.find('{"')
        if at < 0 or '"worker.failed"' not in line:
            continue
        try:
            doc = parse_document(line[at:].encode())
        except DamagedDocument:
            continue
        if not isinstance(doc, dict) or doc.get("event") != "worker.failed":
            continue
        record = ErrorRecord.from_json({
            "rank": doc.get("rank"), "attempt": attempt, "time": float(len(records)),
            "type": doc.get("error_type"), "message": doc.get("error"), "fatal": doc.get("fatal"),
        })
        if record is not None:
            records.append(record)
    return records


def diagnose(paths: RunPaths, attempt: int, exit_code: int, *, output: str = "") -> Failure:
    """The root cause of attempt ``attempt`` whose torchrun exited with ``exit_code``.

    Order of evidence: a rank killed by a signal (other than torchrun's own SIGTERM teardown)
    that wrote no error file died first, since its peers' errors ("connection closed by peer")
    are consequences of its death; else the earliest error file; else torchrun's root cause;
    else torchrun's own exit status. Any error file with ``fatal: true`` makes the failure fatal.

    ``output``: the tail of the attempt's output as the supervisor saw it. On a full or
    read-only disk the error files and the attempt log lose writes; the ranks' ``worker.failed``
    log records in it then stand in for the error files, and it replaces a shorter log.
    """
    log_text = _read_tail(paths.attempt_log(attempt))
    if len(output) > len(log_text):
        log_text = output[-_LOG_TAIL_BYTES:]
    files = _read_error_files(paths.errors_dir(attempt)) or logged_failures(log_text, attempt)
    reported = parse_torchrun_failures(log_text)
    fatal_files = [f for f in files if f.fatal]
    wrote = {f.rank for f in files}
    killed = [
        r
        for r in reported
        if r.signal_name and r.signal_name not in _TEARDOWN_SIGNALS and r.rank not in wrote
    ]
    if killed:
        summary = killed[0].describe()
        if files:
            summary += f" (then {_describe(files[0])})"
        return Failure(
            summary=_clip(summary),
            fatal=bool(fatal_files),
            rank=killed[0].rank,
            exit_code=killed[0].exit_code,
            source="torchrun",
        )
    if files:
        first = files[0]
        summary = _describe(first)
        if fatal_files and not first.fatal:
            summary += f" (rank {fatal_files[0].rank} reported a fatal error)"
        return Failure(
            summary=_clip(summary),
            fatal=bool(fatal_files),
            rank=first.rank,
            source="error_file",
            error_type=first.type,
        )
    if reported:
        root = reported[0]
        summary = root.describe()
        error_type: str | None = None
        if root.exit_code == 1:  # an uncaught exception; before trainer.run, only the log has it
            printed = printed_startup_error(log_text)
            if printed is not None:
                error_type, text = printed
                summary += f": {text}"
        return Failure(
            summary=_clip(summary),
            fatal=root.exit_code == EXIT_FATAL,
            rank=root.rank,
            exit_code=root.exit_code,
            source="torchrun",
            error_type=error_type,
        )
    rendezvous = _rendezvous_error(log_text)
    if rendezvous is not None:
        return rendezvous
    sig = signal_name(exit_code)
    how = f"killed by {sig}" if sig else f"exited with code {exit_code}"
    return Failure(
        summary=f"torchrun {how} without a worker error report "
        f"(see {paths.attempt_log(attempt)})",
        fatal=False,
        exit_code=exit_code,
        source="exit_code",
    )


def printed_startup_error(log_text: str) -> tuple[str, str] | None:
    """The first import/syntax error a rank printed as the last line of its traceback:
    ``(type, "Type: message")``, or None.

    Ranks write to the same pipe, so two tracebacks may interleave mid-line
    (``ModuleNotFoundError: ModuleNotFoundErrorNo module named 'x'``); a line whose message
    names another such type is taken for its type only.
    """
    found: tuple[str, str] | None = None
    for m in _STARTUP_ERROR_LINE.finditer(log_text):
        kind, rest = m.group("type"), m.group("rest").strip()
        clean = rest.startswith(":") and _STARTUP_ERROR_LINE.search(rest) is None and not any(
            t in rest for t in STARTUP_ERROR_TYPES
        )
        if clean:
            return kind, f"{kind}: {_LEADING_COLONS.sub('', rest)}".rstrip(": ")
        doubled = f": {kind}"
        if rest.startswith(doubled) and rest[len(doubled) :].strip():
            # "T: TMessage": the other rank's "T" landed between this one's "T: " and message.
            return kind, f"{kind}: {rest[len(doubled) :].strip()}"
        if found is None and (not rest or rest.startswith(":") or rest[0].isupper()):
            found = (kind, kind)
    return found


def _rendezvous_error(log_tail: str) -> Failure | None:
    """torchrun failed in the c10d rendezvous (multi-node), before any worker ran.

    ``RendezvousClosedError`` is benign: another node's torchrun closed the rendezvous when its
    workers failed, and its store outlived it for a moment; the next try gets a fresh one.
    """
    matches = list(_RENDEZVOUS_ERROR.finditer(log_tail))
    if not matches:
        return None
    name, detail = matches[-1].group(1), matches[-1].group(2).strip()
    closed = name == "RendezvousClosedError"
    summary = (
        "the rendezvous was closed by another node's failed attempt; rejoining"
        if closed
        else f"torchrun rendezvous failed: {name}" + (f": {detail}" if detail else "")
    )
    return Failure(
        summary=_clip(summary),
        fatal=False,
        source="rendezvous_closed" if closed else "rendezvous",
    )
