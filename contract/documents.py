"""The small JSON documents the supervisor and the workers exchange through the checkpoint dir.

Each document type has one dataclass with ``to_json()`` and a lenient ``from_json()``: files
written by processes that may be SIGKILLed at any instant can be missing, torn or foreign, and
such junk reads as ``None`` (absent), never as an exception. Writers replace files atomically
(:mod:`contract.atomic`), so a reader sees an old or a new document, never a mix. Paths:
:class:`contract.paths.RunPaths`.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from typing import Any, TypeVar

import structlog

from contract.atomic import atomic_write_json

log = structlog.get_logger("contract.documents")

D = TypeVar(
    "D", "PreemptRequest", "PreemptAck", "Heartbeat", "ErrorRecord", "SpareGate", "DeterminismReport"
)


#: Largest document read from the run dir. The biggest real one (``state.json`` of a long run) is
#: a few KB; anything near this is damage or hostility, and reading it whole would cost memory.
MAX_DOCUMENT_BYTES = 1 << 20
#: Deepest nesting accepted. Real documents nest 3 levels; Python's parser and everything that
#: walks a parsed document recurse, so a deep one must be refused before it is walked.
MAX_DEPTH = 32
#: Integers outside this range (an attempt number of 10**300) are junk: they end up in file
#: names and arithmetic, and no real step, rank, attempt or pid comes near.
MAX_INT = (1 << 63) - 1


class DamagedDocument(ValueError):
    """A run-dir document that is too large, too deep or not JSON."""


def parse_document(data: bytes) -> Any:
    """Parse run-dir JSON with limits (size, depth); :class:`DamagedDocument` otherwise.

    The depth is checked on the text, before parsing (brackets outside strings), so that a
    document nested a million levels never reaches the recursive parser. With no more brackets
    in all than the limit, no nesting can exceed it, so only such texts are scanned.
    """
    if len(data) > MAX_DOCUMENT_BYTES:
        raise DamagedDocument(f"{len(data)} bytes, over the {MAX_DOCUMENT_BYTES} limit")
    if data.count(b"[") + data.count(b"{") > MAX_DEPTH and not _text_depth_ok(data):
        raise DamagedDocument(f"nested deeper than {MAX_DEPTH} levels")
    try:
        return json.loads(data)
    except (ValueError, RecursionError) as exc:  # ValueError: also ints over 4300 digits
        raise DamagedDocument(f"not JSON: {exc}") from None


def _text_depth_ok(data: bytes) -> bool:
    depth = 0
    in_string = escaped = False
    for byte in data:
        if in_string:
            if escaped:
                escaped = False
            elif byte == 0x5C:  # backslash
                escaped = True
            elif byte == 0x22:  # quote
                in_string = False
        elif byte == 0x22:
            in_string = True
        elif byte in (0x5B, 0x7B):  # [ {
            depth += 1
            if depth > MAX_DEPTH:
                return False
        elif byte in (0x5D, 0x7D):
            depth -= 1
    return True


def read_json(path: str) -> dict[str, Any] | None:
    """A JSON object from ``path``; None when missing, unreadable, damaged or not an object.

    Damage (too large, too deep, not JSON) is logged as ``runstate.unreadable_file`` and then
    treated as absence: every reader of the run dir already copes with a missing document.
    """
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_DOCUMENT_BYTES + 1)
        doc = parse_document(data)
    except FileNotFoundError:
        return None
    except (OSError, DamagedDocument) as exc:
        log.warning("runstate.unreadable_file", path=path, error=str(exc))
        return None
    return doc if isinstance(doc, dict) else None


def _int(value: Any) -> int | None:
    if isinstance(value, int) and not isinstance(value, bool) and -MAX_INT <= value <= MAX_INT:
        return value
    return None


def _num(value: Any) -> float | None:
    if isinstance(value, float) or _int(value) is not None:
        out = float(value)
        return out if math.isfinite(out) else None
    return None


def _str(value: Any) -> str | None:
    return value if isinstance(value, str) else None


@dataclass(frozen=True, kw_only=True)
class PreemptRequest:
    """Supervisor -> workers: stop at the next step boundary after an emergency snapshot.

    Only ``attempt`` decides whether a rank obeys (a request of another attempt is stale).
    """

    attempt: int
    requested_at: float | None = None
    #: Wall-clock time by which the supervisor stops waiting (``--grace`` after the request).
    deadline: float | None = None
    #: The signal's name (``SIGTERM``), or None for a cloud notice.
    signal: str | None = None
    #: What started it: the signal's name or ``notice (...)``.
    source: str = ""

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> PreemptRequest | None:
        attempt = _int(doc.get("attempt"))
        if attempt is None:
            return None
        return cls(
            attempt=attempt,
            requested_at=_num(doc.get("requested_at")),
            deadline=_num(doc.get("deadline")),
            signal=_str(doc.get("signal")),
            source=_str(doc.get("source")) or "",
        )


@dataclass(frozen=True, kw_only=True)
class PreemptAck:
    """Rank 0 (and local rank 0 of every other node) -> supervisor: the emergency snapshot of
    ``step`` is committed."""

    step: int
    attempt: int
    time: float
    digest: str | None = None
    #: The rank whose node holds the committed snapshot: this node's own writer (node copies),
    #: or 0 on a node that keeps no copy (``--no-node-copies``). None in older acks.
    snapshot_rank: int | None = None

    def to_json(self) -> dict[str, Any]:
        doc = asdict(self)
        if self.snapshot_rank is None:
            del doc["snapshot_rank"]
        return doc

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> PreemptAck | None:
        step, attempt, when = _int(doc.get("step")), _int(doc.get("attempt")), _num(doc.get("time"))
        if step is None or attempt is None:
            return None
        return cls(
            step=step,
            attempt=attempt,
            time=0.0 if when is None else when,
            digest=_str(doc.get("digest")),
            snapshot_rank=_int(doc.get("snapshot_rank")),
        )


@dataclass(frozen=True, kw_only=True)
class Heartbeat:
    """Rank -> supervisor: the last completed step (``run/progress/rank-<R>.json``)."""

    rank: int
    step: int
    attempt: int
    time: float
    #: The snapshot step this rank's attempt resumed from (None: fresh or not yet known).
    resumed_from: int | None = None
    epoch: int | None = None
    pid: int | None = None
    #: Rank 0: the last snapshot's training stall and its write time (metrics, status).
    snapshot_stall_s: float | None = None
    snapshot_write_s: float | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, doc: dict[str, Any], *, rank: int | None = None) -> Heartbeat | None:
        """``rank``: the rank the file is named after (it wins over the document's own)."""
        step, attempt, when = _int(doc.get("step")), _int(doc.get("attempt")), _num(doc.get("time"))
        who = rank if rank is not None else _int(doc.get("rank"))
        if step is None or attempt is None or when is None or who is None:
            return None
        return cls(
            rank=who,
            step=step,
            attempt=attempt,
            time=when,
            resumed_from=_int(doc.get("resumed_from")),
            epoch=_int(doc.get("epoch")),
            pid=_int(doc.get("pid")),
            snapshot_stall_s=_num(doc.get("snapshot_stall_s")),
            snapshot_write_s=_num(doc.get("snapshot_write_s")),
        )


@dataclass(frozen=True, kw_only=True)
class ErrorRecord:
    """Rank -> supervisor: why a rank failed (``run/errors/attempt-<A>/rank-<R>.json``).

    ``fatal`` means a relaunch cannot help; the supervisor then gives up at once.
    """

    rank: int
    attempt: int
    time: float
    type: str
    message: str
    traceback: str = ""
    fatal: bool = False

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, doc: dict[str, Any], *, rank: int | None = None) -> ErrorRecord | None:
        """Lenient: a record with no time sorts last; ``rank`` from the file name wins."""
        who = rank if rank is not None else _int(doc.get("rank"))
        if who is None:
            return None
        when = _num(doc.get("time"))
        return cls(
            rank=who,
            attempt=_int(doc.get("attempt")) or 0,
            time=float("inf") if when is None else when,
            type=str(doc.get("type") or "Error"),
            message=str(doc.get("message") or ""),
            traceback=str(doc.get("traceback") or ""),
            fatal=doc.get("fatal") is True,
        )


@dataclass(frozen=True, kw_only=True)
class SpareGate:
    """Supervisor -> a waiting warm spare: you are promoted; resume from ``resume_step``."""

    attempt: int
    #: None: start fresh.
    resume_step: int | None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> SpareGate | None:
        attempt = _int(doc.get("attempt"))
        step = doc.get("resume_step")
        if attempt is None or (step is not None and _int(step) is None):
            return None
        return cls(attempt=attempt, resume_step=_int(step))


def _str_map(value: Any) -> dict[str, str] | None:
    if not isinstance(value, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in value.items()
    ):
        return None
    return dict(value)


@dataclass(frozen=True, kw_only=True)
class JournalStart:
    """First line a rank writes to its journal when an attempt starts (``run/journal/rank-<R>.jsonl``).

    The entries that follow belong to this session until the next start line. Entries of
    another ``run_id`` or ``config_hash`` are never compared with (a reused dir, a resume with
    ``--allow-config-change``).
    """

    run_id: str
    attempt: int
    rank: int
    #: The snapshot step this session resumed from; 0 for a fresh start.
    resumed_from: int
    config_hash: str | None = None
    time: float = 0.0
    #: The group's world size (None in journals written before world-size changes existed).
    #: Sessions of another world size are never compared with: the per-rank losses of 2 ranks
    #: are not those of 1 (see the README's "World-size changes").
    world_size: int | None = None
    #: The snapshot tree format whose digest definition the session's component digests follow
    #: (``storage.content.FORMAT``; None in journals written before format 2, i.e. format 1).
    #: Component digests of sessions of another format are never compared with.
    digest_format: str | None = None

    def to_json(self) -> dict[str, Any]:
        doc = {"start": True, **asdict(self)}
        for optional in ("world_size", "digest_format"):
            if doc[optional] is None:
                del doc[optional]
        return doc

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> JournalStart | None:
        attempt, rank, resumed = _int(doc.get("attempt")), _int(doc.get("rank")), _int(doc.get("resumed_from"))
        run_id = _str(doc.get("run_id"))
        if doc.get("start") is not True or attempt is None or rank is None or resumed is None:
            return None
        if run_id is None:
            return None
        return cls(
            run_id=run_id,
            attempt=attempt,
            rank=rank,
            resumed_from=resumed,
            config_hash=_str(doc.get("config_hash")),
            time=_num(doc.get("time")) or 0.0,
            world_size=_int(doc.get("world_size")),
            digest_format=_str(doc.get("digest_format")),
        )


@dataclass(frozen=True, kw_only=True)
class JournalEntry:
    """One completed step's fingerprint in a rank's journal.

    ``fp`` maps a metric name to the exact bits of its value as ``float.hex()`` (the ``loss``
    metric when the script reports one, else every finite float metric); ``components`` (at
    snapshot steps, when the checkpointer has them) maps a state component to its digest.
    """

    step: int
    attempt: int
    fp: dict[str, str]
    components: dict[str, str] | None = None

    def to_json(self) -> dict[str, Any]:
        doc: dict[str, Any] = {"step": self.step, "attempt": self.attempt, "fp": self.fp}
        if self.components is not None:
            doc["components"] = self.components
        return doc

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> JournalEntry | None:
        step, attempt, fp = _int(doc.get("step")), _int(doc.get("attempt")), _str_map(doc.get("fp"))
        if step is None or attempt is None or fp is None:
            return None
        return cls(step=step, attempt=attempt, fp=fp, components=_str_map(doc.get("components")))


def parse_journal_line(line: bytes | str) -> JournalStart | JournalEntry | None:
    """One journal line; None for a torn, foreign or unparseable one."""
    try:
        doc = parse_document(line.encode() if isinstance(line, str) else line)
    except DamagedDocument:
        return None
    if not isinstance(doc, dict):
        return None
    if "start" in doc:
        return JournalStart.from_json(doc)
    return JournalEntry.from_json(doc)


DETERMINISM_STATES = ("unchecked", "verified", "diverged")


@dataclass(frozen=True, kw_only=True)
class DeterminismReport:
    """Rank -> supervisor and ``status``: did the steps re-executed after a resume reproduce the
    journal bit for bit (``run/determinism/rank-<R>.json``).

    ``unchecked``: no recovery has re-executed a journaled step yet. ``verified``: every
    re-executed journaled step matched, through ``checked_through_step``. ``diverged`` (sticky for
    the run): ``first_divergence_step`` differed in ``fingerprint`` (a metric name, or
    ``component:<name>``), ``expected`` (journal) vs ``got`` (this attempt).
    """

    rank: int
    state: str
    run_id: str | None = None
    attempt: int | None = None
    resumed_from: int | None = None
    checked_through_step: int | None = None
    first_divergence_step: int | None = None
    fingerprint: str | None = None
    expected: str | None = None
    got: str | None = None
    time: float | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, doc: dict[str, Any], *, rank: int | None = None) -> DeterminismReport | None:
        who = rank if rank is not None else _int(doc.get("rank"))
        state = doc.get("state")
        if who is None or state not in DETERMINISM_STATES:
            return None
        return cls(
            rank=who,
            state=str(state),
            run_id=_str(doc.get("run_id")),
            attempt=_int(doc.get("attempt")),
            resumed_from=_int(doc.get("resumed_from")),
            checked_through_step=_int(doc.get("checked_through_step")),
            first_divergence_step=_int(doc.get("first_divergence_step")),
            fingerprint=_str(doc.get("fingerprint")),
            expected=_str(doc.get("expected")),
            got=_str(doc.get("got")),
            time=_num(doc.get("time")),
        )


def summarize_determinism(reports: list[DeterminismReport]) -> dict[str, Any]:
    """The run's audit from every rank's report (``status --json`` ``determinism``).

    ``diverged`` if any rank diverged (the earliest step wins, with its rank and fingerprint),
    else ``verified`` if any rank verified (``checked_through_step``: the least over verified
    ranks), else ``unchecked``.
    """
    diverged = [r for r in reports if r.state == "diverged" and r.first_divergence_step is not None]
    if diverged:
        first = min(diverged, key=lambda r: (r.first_divergence_step or 0, r.rank))
        return {
            "state": "diverged",
            "checked_through_step": first.checked_through_step,
            "first_divergence_step": first.first_divergence_step,
            "rank": first.rank,
            "fingerprint": first.fingerprint,
            "expected": first.expected,
            "got": first.got,
        }
    verified = [r.checked_through_step for r in reports if r.state == "verified"]
    steps = [s for s in verified if s is not None]
    if verified:
        return {
            "state": "verified",
            "checked_through_step": min(steps) if steps else None,
            "first_divergence_step": None,
        }
    return {"state": "unchecked", "checked_through_step": None, "first_divergence_step": None}


def read_document(path: str, kind: type[D]) -> D | None:
    """The document of type ``kind`` at ``path``; None when missing or junk."""
    doc = read_json(path)
    return None if doc is None else kind.from_json(doc)


def write_document(path: str, document: D, *, durable: bool) -> None:
    """Replace ``path`` with ``document`` atomically (``durable``: survive a power loss)."""
    atomic_write_json(path, document.to_json(), durable=durable)
