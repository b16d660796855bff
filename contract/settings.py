"""The one registry of ``ORCH_*`` environment variables, and the one parser for all of them.

Rule: **command-line flags are the user's intent** (what to run, where to keep it, how many
restarts); **environment variables are tunables** (poll periods, timeouts, transfer sizes) that
a user rarely touches, plus the worker contract the supervisor sets for its ranks. Every
variable the product reads is one :class:`Var` row of :data:`REGISTRY` with its type, default,
owner and documentation. The settings classes (``orchestrator.settings.Settings``,
``storage.settings.StorageSettings``, ``trainer.settings.WorkerSettings`` and
:class:`contract.env.WorkerEnv`) declare their fields with :func:`setting`, which takes the
default from the row, and are filled by :func:`load`, so there is one place for a default and
one boolean rule. The README's tables are generated here (``python -m contract.settings``) and a
test checks that they match. Nothing outside the settings classes reads ``os.environ``.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final, Literal, TypeVar

Kind = Literal["int", "float", "bool", "str"]
#: Who sets a variable: ``user`` (a tunable), ``supervisor`` (the worker contract: set by
#: ``orchestrator launch`` for its ranks, from its flags), ``tests`` (fault injection).
SetBy = Literal["user", "supervisor", "tests"]

MiB: Final = 1024 * 1024
_TRUE: Final = frozenset({"1", "true", "yes", "on"})
_FALSE: Final = frozenset({"0", "false", "no", "off"})


@dataclass(frozen=True, kw_only=True)
class Var:
    """One environment variable: its name, type, default (None: unset), owner and meaning."""

    name: str
    kind: Kind
    default: Any
    #: The package whose settings class reads it.
    owner: Literal["orchestrator", "storage", "trainer", "contract"]
    doc: str
    set_by: SetBy = "user"

    def __post_init__(self) -> None:
        if not self.name.startswith("ORCH_"):
            raise ValueError(f"{self.name}: every variable of ours starts with ORCH_")
        if self.default is not None and not isinstance(self.default, _PYTHON[self.kind]):
            raise ValueError(f"{self.name}: default {self.default!r} is not a {self.kind}")

    def parse(self, raw: str) -> Any:
        """The value of ``raw`` (already stripped, non-empty); ValueError names the variable."""
        if self.kind == "str":
            return raw
        if self.kind == "bool":
            low = raw.lower()
            if low in _TRUE:
                return True
            if low in _FALSE:
                return False
            raise ValueError(f"{self.name} must be 0 or 1 (or true/false), got {raw!r}")
        try:
            return int(raw) if self.kind == "int" else float(raw)
        except ValueError:
            what = "an integer" if self.kind == "int" else "a number"
            raise ValueError(f"{self.name} must be {what}, got {raw!r}") from None

    def format(self, value: Any) -> str:
        """``value`` as this variable's text (the inverse of :meth:`parse`)."""
        if self.kind == "bool":
            return "1" if value else "0"
        if self.kind == "float":
            # Exact both ways: "45" for 45.0 (as an operator would write it), repr otherwise.
            number = float(value)
            return str(int(number)) if number.is_integer() else repr(number)
        return str(value)


_PYTHON: Final[dict[str, type | tuple[type, ...]]] = {
    "int": int,
    "float": (int, float),
    "bool": bool,
    "str": str,
}


def _v(name: str, kind: Kind, default: Any, owner: Any, doc: str, set_by: SetBy = "user") -> Var:
    return Var(name=name, kind=kind, default=default, owner=owner, doc=doc, set_by=set_by)


REGISTRY: Final[tuple[Var, ...]] = (
    # -- supervisor (orchestrator.settings.Settings) -------------------------------------------
    _v("ORCH_RESTART_BACKOFF_INITIAL_S", "float", 1.0, "orchestrator",
       "First restart delay after a failure without progress; doubles per consecutive one."),
    _v("ORCH_RESTART_BACKOFF_MAX_S", "float", 30.0, "orchestrator",
       "Upper bound of the restart delay."),
    _v("ORCH_RESTART_BACKOFF_JITTER_S", "float", 1.0, "orchestrator",
       "Uniform random jitter added to each restart delay (nodes do not relaunch in lockstep)."),
    _v("ORCH_POLL_INTERVAL_S", "float", 0.2, "orchestrator",
       "How often the supervisor polls the worker group and the heartbeats."),
    _v("ORCH_SCAN_INTERVAL_S", "float", 1.0, "orchestrator",
       "How often snapshots are listed (retention, newest_local_step) and state.json refreshed."),
    _v("ORCH_TORCHRUN_MONITOR_INTERVAL_S", "float", 0.1, "orchestrator",
       "torchrun's --monitor-interval: how fast it notices a dead rank."),
    _v("ORCH_PG_TIMEOUT_S", "float", 60.0, "orchestrator",
       "Process-group (collective) timeout given to the workers."),
    _v("ORCH_CRASH_LOOP_ATTEMPTS", "int", 3, "orchestrator",
       "Consecutive failed attempts without progress after which launch gives up early."),
    _v("ORCH_KILL_WAIT_S", "float", 10.0, "orchestrator",
       "Bound on waiting for SIGKILLed processes to disappear."),
    _v("ORCH_HANG_DUMP_TIMEOUT_S", "float", 10.0, "orchestrator",
       "Bound on py-spy's dump of every rank's stack when --hang-timeout fires (0: no dump)."),
    _v("ORCH_TEE_JOIN_S", "float", 5.0, "orchestrator",
       "Bound on draining torchrun's output after it exited."),
    _v("ORCH_WATCH_INTERVAL_S", "float", 2.0, "orchestrator",
       "status --watch refresh period."),
    _v("ORCH_WATCH_MAX_S", "float", 86400.0, "orchestrator",
       "status --watch overall bound."),
    _v("ORCH_MIRROR_RETRY_INITIAL_S", "float", 1.0, "orchestrator",
       "Mirror: first delay after a transient object-store error; doubles per retry."),
    _v("ORCH_MIRROR_RETRY_MAX_S", "float", 30.0, "orchestrator",
       "Mirror: upper bound of the retry delay."),
    _v("ORCH_MIRROR_RETRY_JITTER_S", "float", 1.0, "orchestrator",
       "Mirror: uniform random jitter added to each retry delay."),
    _v("ORCH_MIRROR_PERMANENT_RETRY_S", "float", 60.0, "orchestrator",
       "Mirror: pause before retrying after a permanent error (403, missing bucket)."),
    _v("ORCH_MIRROR_FLUSH_TIMEOUT_S", "float", 300.0, "orchestrator",
       "Bound on waiting, at the end of a run, for the mirror to upload what is missing."),
    _v("ORCH_STATE_MIRROR_INTERVAL_S", "float", 10.0, "orchestrator",
       "How often state.json is mirrored to <prefix>/run/node-<R>/ (and on every phase change)."),
    _v("ORCH_MIRROR_STALE_UPLOAD_AGE_S", "float", 3600.0, "orchestrator",
       "Multi-node: multipart uploads older than this are aborted when a mirror starts."),
    _v("ORCH_RDZV_JOIN_TIMEOUT_S", "int", 600, "orchestrator",
       "Multi-node: how long an attempt waits in the rendezvous for the other nodes."),
    _v("ORCH_RDZV_LAST_CALL_S", "int", 30, "orchestrator",
       "--nodes MIN:MAX: once MIN nodes joined, how long the rendezvous still waits for more "
       "(torchrun's c10d last_call_timeout)."),
    _v("ORCH_RDZV_CLOSED_RETRIES", "int", 10, "orchestrator",
       "Multi-node: relaunches after a closed rendezvous that spend no restart."),
    _v("ORCH_MIRROR_PREFLIGHT_ATTEMPTS", "int", 3, "orchestrator",
       "Tries of the launch preflight (and of each restore step) against a failing endpoint."),
    _v("ORCH_MIRROR_NICE", "bool", True, "orchestrator",
       "Mirror: its upload and hashing threads run at nice 19 and the lowest best-effort I/O "
       "priority (Linux, per thread; refused quietly where not allowed)."),
    _v("ORCH_MIRROR_MAX_MBPS", "str", None, "orchestrator",
       "Mirror: cap on the bytes it sends, in MB/s (10^6 bytes), shared by all its upload "
       "threads; auto: adapt the cap to the training step rate (halve it while steps/s is more "
       "than 5% below the idle rate, +25% per window otherwise); unset: unlimited."),
    _v("ORCH_MIRROR_AUTO_MIN_MBPS", "float", 4.0, "orchestrator",
       "Mirror, ORCH_MIRROR_MAX_MBPS=auto: the cap never goes below this (uploads progress)."),
    _v("ORCH_MIRROR_AUTO_WINDOW_S", "float", 5.0, "orchestrator",
       "Mirror, ORCH_MIRROR_MAX_MBPS=auto: the window over which step rates are compared."),
    _v("ORCH_LOG_FORMAT", "str", None, "orchestrator",
       "json or console; unset: console on a terminal, else json. Passed on to the workers."),
    _v("ORCH_NOTICE_SOURCES", "str", "", "orchestrator",
       "Cloud preemption notices to poll, comma separated: aws, gce. Empty: off."),
    _v("ORCH_AWS_METADATA_URL", "str", "http://169.254.169.254", "orchestrator",
       "Base URL of the EC2 instance metadata service."),
    _v("ORCH_GCE_METADATA_URL", "str", "http://metadata.google.internal", "orchestrator",
       "Base URL of the GCE metadata server."),
    _v("ORCH_NOTICE_INTERVAL_S", "float", 5.0, "orchestrator",
       "Minimum time between two checks of each notice source."),
    _v("ORCH_NOTICE_TIMEOUT_S", "float", 1.0, "orchestrator",
       "Bound on each metadata request (connect and read)."),
    _v("ORCH_AWS_TOKEN_TTL_S", "int", 21600, "orchestrator",
       "Lifetime requested for an IMDSv2 session token (1..21600)."),
    _v("ORCH_PREEMPT_SIGNALS", "str", "TERM,USR1", "orchestrator",
       "Signals to the supervisor that mean preempted (names without SIG); SIGINT never does."),
    _v("ORCH_NOTIFY_TIMEOUT_S", "float", 5.0, "orchestrator",
       "Alerts: connect and read timeout of each request (a --notify URL's cto=/rto= wins)."),
    _v("ORCH_NOTIFY_ATTEMPTS", "int", 3, "orchestrator",
       "Alerts: tries per alert and URL (backoff 1 s, 2 s, ...) before notify.failed."),
    _v("ORCH_NOTIFY_CLOSE_TIMEOUT_S", "float", 10.0, "orchestrator",
       "Alerts: bound on sending the queued alerts when launch ends (the rest: notify.unsent)."),
    _v("ORCH_NOTIFY_REPEAT_S", "float", 3600.0, "orchestrator",
       "Alerts: a persisting mirror failure (same error) is alerted again at most this often."),
    # -- storage (storage.settings.StorageSettings) --------------------------------------------
    _v("ORCH_STORAGE_WRITE_CHUNK_BYTES", "int", 16 * MiB, "storage",
       "Largest single write() of a snapshot file (and the O_DIRECT buffer size)."),
    _v("ORCH_STORAGE_HASH_THREADS", "int", 2, "storage",
       "Threads hashing one large snapshot file beside its writes (its 64 KiB block checksums "
       "are independent); 1: a single hashing thread."),
    _v("ORCH_STORAGE_READ_CHUNK_BYTES", "int", 16 * MiB, "storage",
       "Largest single read() when checksumming or reading a snapshot file."),
    _v("ORCH_STORAGE_DIRECT_IO", "bool", True, "storage",
       "Write snapshot tensor files with O_DIRECT where the filesystem allows it."),
    _v("ORCH_REMOTE_PART_SIZE", "int", 32 * MiB, "storage",
       "Object store: multipart part size (and ranged GET size)."),
    _v("ORCH_REMOTE_MULTIPART_THRESHOLD", "int", 32 * MiB, "storage",
       "Object store: files up to this size go up in one PUT."),
    _v("ORCH_REMOTE_CONCURRENCY", "int", 8, "storage",
       "Object store: parts in flight per transfer."),
    _v("ORCH_REMOTE_MAX_POOL_CONNECTIONS", "int", 32, "storage",
       "Object store: HTTP connection pool size."),
    _v("ORCH_REMOTE_CONNECT_TIMEOUT_S", "float", 5.0, "storage",
       "Object store: connect timeout of every call."),
    _v("ORCH_REMOTE_READ_TIMEOUT_S", "float", 30.0, "storage",
       "Object store: read timeout of every call."),
    _v("ORCH_S3_ADDRESSING_STYLE", "str", None, "storage",
       "path, virtual or auto; unset: path-style when an endpoint URL is set, else auto."),
    # -- workers (trainer.settings.WorkerSettings) ---------------------------------------------
    _v("ORCH_PREEMPT_CHECK_EVERY", "int", 1, "trainer",
       "Workers look for a preemption request every K steps (one all-reduce each time)."),
    _v("ORCH_SNAPSHOT_STAGING", "str", "deferred", "trainer",
       "deferred: optimizer.step() waits for the off-thread copy; sync: copy inside snapshot()."),
    _v("ORCH_SNAPSHOT_NICE", "bool", True, "trainer",
       "The snapshot writer thread (and the hashing threads it starts) run at nice 19 and the "
       "lowest best-effort I/O priority, so writing and hashing yield the CPU to training "
       "(Linux, per thread; refused quietly where not allowed)."),
    _v("ORCH_HEARTBEAT_INTERVAL_S", "float", 1.0, "trainer",
       "At most one heartbeat write per this many seconds (0: every step)."),
    _v("ORCH_MAX_SNAPSHOT_INTERVAL_S", "float", 1800.0, "trainer",
       "--checkpoint-every auto: the longest interval it may choose (it aims at 100 x the "
       "latest snapshot's stall, at least 60 s)."),
    _v("ORCH_STOP_AT_STEP", "int", None, "trainer",
       "check-resume: the Checkpointer commits a snapshot at this step and the script stops "
       "there with exit 0.", set_by="tests"),
    _v("ORCH_FAULTS", "str", "", "trainer",
       "Fault-injection rules POINT@STEP[:rank=R][:attempt=A] (tests only); read by the "
       "workers and by the supervisor's mirror.", set_by="tests"),
    # -- the worker contract (contract.env.WorkerEnv), set by launch for its ranks -------------
    _v("ORCH_CHECKPOINT_DIR", "str", None, "contract",
       "Absolute path of the node's checkpoint dir (--checkpoint-dir).", set_by="supervisor"),
    _v("ORCH_RUN_ID", "str", None, "contract",
       "The run id (--run-id, or the one recorded in state.json).", set_by="supervisor"),
    _v("ORCH_ATTEMPT", "int", 0, "contract",
       "The attempt number (counts across launches on the dir).", set_by="supervisor"),
    _v("ORCH_NODE_RANK", "int", 0, "contract", "--node-rank.", set_by="supervisor"),
    _v("ORCH_RESUME_STEP", "str", None, "contract",
       "The snapshot step the supervisor chose, or none for a fresh start; unset: the worker "
       "selects the newest valid one itself.", set_by="supervisor"),
    _v("ORCH_ALLOW_CONFIG_CHANGE", "bool", False, "contract",
       "--allow-config-change.", set_by="supervisor"),
    _v("ORCH_NODE_COPIES", "bool", True, "contract",
       "DDP on several nodes: every node's local rank 0 writes the snapshot to its own disk "
       "(--no-node-copies: global rank 0 only).", set_by="supervisor"),
    _v("ORCH_ALLOW_WORLD_SIZE_CHANGE", "bool", False, "contract",
       "--allow-world-size-change (implied by --nodes MIN:MAX): resume a snapshot written by "
       "another number of ranks.", set_by="supervisor"),
    _v("ORCH_CHECKPOINT_EVERY", "str", None, "contract",
       "--checkpoint-every: steps (25; 0 = final only), a duration (90s, 10m, 1h) or auto; "
       "unset: the script's Checkpointer(every=), else auto.", set_by="supervisor"),
    _v("ORCH_SPARE_GATE", "str", None, "contract",
       "Warm spare: the file whose appearance promotes this group.", set_by="supervisor"),
    _v("ORCH_LAUNCH_TOKEN", "str", None, "contract",
       "Unique per attempt: finds every process of the attempt (kill_orphans).",
       set_by="supervisor"),
    _v("ORCH_ON_DIVERGENCE", "str", "warn", "contract",
       "--on-divergence: warn or fail when a resumed rank re-executes a journaled step with "
       "different loss bits (fail: fatal error, exit 78).", set_by="supervisor"),
)

BY_NAME: Final[dict[str, Var]] = {v.name: v for v in REGISTRY}


def setting(name: str) -> Any:
    """A dataclass field bound to the variable ``name``, with the registry's default."""
    return dataclasses.field(default=BY_NAME[name].default, metadata={"env": name})


def env_var(cls: type, field_name: str) -> str:
    """The variable bound to ``cls.field_name`` (for error messages)."""
    for f in dataclasses.fields(cls):
        if f.name == field_name:
            return str(f.metadata["env"])
    raise KeyError(field_name)


def read(name: str, env: Mapping[str, str]) -> Any:
    """The value of ``name`` in ``env``: parsed, or the default when unset or blank."""
    var = BY_NAME[name]
    raw = env.get(name, "").strip()
    return var.parse(raw) if raw else var.default


T = TypeVar("T")


def load(cls: type[T], env: Mapping[str, str] | None = None, **overrides: Any) -> T:
    """An instance of the settings class ``cls`` from ``env`` (default: ``os.environ``).

    Fields declared with :func:`setting` take the variable's value when it is set (blank is
    unset); ``overrides`` fill other fields. ValueError names the bad variable.
    """
    source = os.environ if env is None else env
    values: dict[str, Any] = dict(overrides)
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        name = f.metadata.get("env")
        if name is None or f.name in overrides:
            continue
        raw = source.get(name, "").strip()
        if raw:
            values[f.name] = BY_NAME[name].parse(raw)
    return cls(**values)


def bound_variables(*classes: type) -> set[str]:
    """The variables the fields of ``classes`` are bound to."""
    return {
        str(f.metadata["env"])
        for cls in classes
        for f in dataclasses.fields(cls)
        if "env" in f.metadata
    }


def markdown_table(set_by: tuple[SetBy, ...] = ("user", "tests")) -> str:
    """The README table of the variables set by ``set_by``, in registry order."""
    rows = ["| variable | type | default | owner | meaning |", "|---|---|---|---|---|"]
    for v in REGISTRY:
        if v.set_by not in set_by:
            continue
        default = "unset" if v.default is None else f"`{v.format(v.default)}`"
        if v.default == "":
            default = "empty"
        rows.append(f"| `{v.name}` | {v.kind} | {default} | `{v.owner}` | {v.doc} |")
    return "\n".join(rows) + "\n"


#: The generated blocks of README.md: (begin marker, end marker, who sets the variables).
README_BLOCKS: Final[tuple[tuple[str, str, tuple[SetBy, ...]], ...]] = (
    ("<!-- tunables:begin -->", "<!-- tunables:end -->", ("user", "tests")),
    ("<!-- worker-env:begin -->", "<!-- worker-env:end -->", ("supervisor",)),
)


def render_readme(text: str) -> str:
    """``text`` (README.md) with its generated blocks replaced by the registry's tables."""
    for begin, end, set_by in README_BLOCKS:
        head, sep, rest = text.partition(begin)
        if not sep:
            raise ValueError(f"README has no {begin} marker")
        _, sep2, tail = rest.partition(end)
        if not sep2:
            raise ValueError(f"README has no {end} marker")
        text = f"{head}{begin}\n{markdown_table(set_by)}{end}{tail}"
    return text


def main(argv: list[str] | None = None) -> int:
    """``python -m contract.settings [--write README.md]``: print or rewrite the tables."""
    args = sys.argv[1:] if argv is None else argv
    if args[:1] == ["--write"] and len(args) == 2:
        with open(args[1], encoding="utf-8") as f:
            text = f.read()
        with open(args[1], "w", encoding="utf-8") as f:
            f.write(render_readme(text))
        return 0
    if args:
        print("usage: python -m contract.settings [--write README.md]", file=sys.stderr)
        return 2
    for _, _, set_by in README_BLOCKS:
        sys.stdout.write(markdown_table(set_by) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
