"""The launch configuration: one frozen, validated value built from flags and a TOML file.

``orchestrator launch`` turns its flags (and the optional ``--config FILE``) into a
:class:`LaunchConfig`; everything downstream receives that value and never looks at argv again.
Validation that needs no filesystem happens in ``__post_init__`` (a ``ValueError`` with the
reason); :func:`check_launchable` adds the checks that look at the disk (script present,
checkpoint dir writable) so that a bad launch fails with exit 2 before anything starts.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Mapping
from dataclasses import MISSING, dataclass, field, fields
from typing import Any

import tomllib

from contract.interval import FORMS as INTERVAL_FORMS
from contract.interval import Interval, parse_interval

#: What a run id may look like (it names rendezvous ids, object-store prefixes and files).
RUN_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_NODE_RANGE = re.compile(r"^(\d+)(?::(\d+))?$")
_ENDPOINT = re.compile(r"^(?P<host>\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9._-]+):(?P<port>\d{1,5})$")
#: Why --best-metric/--best-mode are refused: the best metric is named once, by the script.
BEST_MOVED = (
    "the best metric is named once, in the training script: Checkpointer(best=trainer.BestPolicy("
    "metric=NAME, mode='max'|'min')); every snapshot's manifest records it and --keep-best K "
    "ranks by it (--best-metric/--best-mode are no longer accepted)"
)


#: Local snapshots kept when --keep-local is not given. With auto intervals a run snapshots as
#: often as once a minute; keeping all of them fills a node's disk. Three leave a fallback when
#: the newest turns out damaged (retention also never deletes the newest valid snapshot, one
#: being written or uploaded, or one not yet mirrored).
DEFAULT_KEEP_LOCAL = 3
#: ``--keep-local all``: keep every local snapshot.
KEEP_ALL = "all"
#: What ``--notify-on`` selects from (all of them by default): an attempt failed (with its root
#: cause), the run recovered (resumed from a step, time lost), was preempted, gave up, the mirror
#: fell behind or fails permanently, a resume diverged from the failed attempt, a hang was
#: detected, the run finished.
NOTIFY_KINDS = ("failure", "recovered", "preempted", "gave_up", "mirror", "diverged", "hang",
                "finished")


@dataclass(frozen=True, kw_only=True)
class LaunchConfig:
    """Everything ``orchestrator launch`` was asked to do.

    ``None`` for an optional knob means "not set": ``checkpoint_every=None`` leaves the interval
    to the training script's ``Checkpointer(every=...)``, else ``auto`` (given as an int or text,
    it is parsed by :func:`contract.interval.parse_interval`), ``keep_local`` keeps the last
    :data:`DEFAULT_KEEP_LOCAL` local snapshots unless set (``"all"`` or None: every one), ``hang_timeout=None`` disables the heartbeat watchdog, ``run_id=None`` is
    resolved at launch (see ``runstate.stable_run_id``).
    """

    checkpoint_dir: str
    script: str
    script_args: tuple[str, ...] = ()
    #: Nodes in the group; ``"MIN:MAX"`` (torchrun's elastic range) is parsed into
    #: ``min_nodes`` and ``nodes`` = MAX, and allows a world-size change on resume.
    nodes: int = 1
    nproc_per_node: int = 1
    node_rank: int = 0
    rdzv_endpoint: str | None = None
    mirror: str | None = None
    run_id: str | None = None
    checkpoint_every: Interval | None = None
    keep_local: int | None = DEFAULT_KEEP_LOCAL
    keep_remote: int | None = None
    keep_every: int | None = None
    keep_best: int = 0
    #: Never set: kept so that a --best-metric/--best-mode flag or TOML key fails with
    #: BEST_MOVED instead of being silently ignored; retention reads the manifests' declaration.
    best_metric: str | None = None
    best_mode: str | None = None
    max_restarts: int = 3
    grace: float = 30.0
    hang_timeout: float | None = None
    allow_config_change: bool = False
    #: Resume a snapshot written by another number of ranks (re-partitioned: trainer.reshape);
    #: implied by ``--nodes MIN:MAX``.
    allow_world_size_change: bool = False
    #: DDP on several nodes: every node keeps its own copy of each snapshot (``--no-node-copies``:
    #: only the node of global rank 0 does).
    node_copies: bool = True
    #: The low end of ``--nodes MIN:MAX`` (None: a fixed node count); never given directly.
    min_nodes: int | None = None
    warm_spare: bool = False
    #: Run SCRIPT under ``trainer.run_script`` (``python -m trainer.script``): a module-level
    #: script without a ``main()`` gets error files, exit codes and SIGTERM handling unchanged.
    wrap: bool = False
    #: What a resumed rank does when a re-executed step differs from the journal: ``warn``
    #: (log ``resume.diverged``, report it in ``status``, train on) or ``fail`` (fatal, exit 78).
    on_divergence: str = "warn"
    #: Where alerts go (apprise URLs: ``slack://...``, ``json://host:port/path``, ...); they may
    #: carry credentials, so they are never logged nor written to ``state.json``.
    notify: tuple[str, ...] = field(default=(), repr=False)
    #: Which alerts are sent (:data:`NOTIFY_KINDS`); None: all of them.
    notify_on: tuple[str, ...] | None = None
    #: Prometheus ``/metrics`` on ``metrics_host:metrics_port`` (0: a free port, logged).
    metrics_port: int | None = None
    metrics_host: str = "127.0.0.1"
    #: Prometheus text file for node_exporter's textfile collector, rewritten atomically.
    metrics_file: str | None = None

    def __post_init__(self) -> None:
        if not self.checkpoint_dir:
            raise ValueError("--checkpoint-dir is required")
        if not self.script:
            raise ValueError("a training SCRIPT is required")
        self._parse_nodes()
        if self.nodes < 1:
            raise ValueError(f"--nodes must be >= 1, got {self.nodes}")
        if self.nproc_per_node < 1:
            raise ValueError(f"--nproc-per-node must be >= 1, got {self.nproc_per_node}")
        if not 0 <= self.node_rank < self.nodes:
            raise ValueError(f"--node-rank must be in [0, {self.nodes}), got {self.node_rank}")
        if self.nodes > 1 and not self.rdzv_endpoint:
            raise ValueError("--nodes > 1 needs --rdzv-endpoint HOST:PORT (shared by all nodes)")
        if self.rdzv_endpoint is not None:
            m = _ENDPOINT.match(self.rdzv_endpoint)
            if m is None or not 0 < int(m.group("port")) < 65536:
                raise ValueError(f"--rdzv-endpoint must be HOST:PORT, got {self.rdzv_endpoint!r}")
        if self.run_id is not None and not RUN_ID_PATTERN.match(self.run_id):
            raise ValueError(
                "--run-id must be 1-128 characters of letters, digits, '.', '_' or '-' "
                f"starting with a letter or digit, got {self.run_id!r}"
            )
        if self.mirror is not None and not self.mirror:
            raise ValueError("--mirror must not be empty")
        every: object = self.checkpoint_every
        if every is not None and not isinstance(every, Interval):
            if isinstance(every, bool) or not isinstance(every, (int, str)):
                raise ValueError(f"--checkpoint-every must be {INTERVAL_FORMS}, got {every!r}")
            object.__setattr__(self, "checkpoint_every", parse_interval(every))
        keep: object = self.keep_local  # "all" arrives as text, from the flag or a config file
        if keep == KEEP_ALL:
            object.__setattr__(self, "keep_local", None)
        elif keep is not None and (isinstance(keep, bool) or not isinstance(keep, int)):
            raise ValueError(f"--keep-local must be a count >= 1 or {KEEP_ALL}, got {keep!r}")
        _at_least_one("--keep-local", self.keep_local)
        _at_least_one("--keep-remote", self.keep_remote)
        if self.keep_remote is not None and self.mirror is None:
            raise ValueError("--keep-remote needs --mirror URL (it is the remote's retention)")
        _at_least_one("--keep-every", self.keep_every)
        _non_negative("--keep-best", self.keep_best)
        _non_negative("--max-restarts", self.max_restarts)
        if self.best_metric is not None or self.best_mode is not None:
            flag = "--best-metric" if self.best_metric is not None else "--best-mode"
            raise ValueError(f"{flag}: {BEST_MOVED}")
        if not self.grace >= 0:
            raise ValueError(f"--grace must be >= 0 seconds, got {self.grace}")
        if self.hang_timeout is not None and not self.hang_timeout > 0:
            raise ValueError(f"--hang-timeout must be > 0 seconds, got {self.hang_timeout}")
        if self.on_divergence not in ("warn", "fail"):
            raise ValueError(f"--on-divergence must be warn or fail, got {self.on_divergence!r}")
        if self.warm_spare and self.nodes > 1:
            raise ValueError("--warm-spare is single-node only (a spare group cannot join the "
                             "other nodes' rendezvous ahead of time)")
        self._check_observability()

    def _parse_nodes(self) -> None:
        """``nodes`` given as ``"MIN:MAX"`` (flag or config file): set ``min_nodes`` and MAX."""
        nodes: object = self.nodes
        if isinstance(nodes, str):
            m = _NODE_RANGE.match(nodes.strip())
            if m is None:
                raise ValueError(f"--nodes must be N or MIN:MAX, got {nodes!r}")
            low, high = int(m.group(1)), int(m.group(2)) if m.group(2) else None
            if high is None:
                object.__setattr__(self, "nodes", low)
            else:
                if not 1 <= low <= high:
                    raise ValueError(f"--nodes MIN:MAX needs 1 <= MIN <= MAX, got {nodes!r}")
                object.__setattr__(self, "nodes", high)
                object.__setattr__(self, "min_nodes", low)
        elif isinstance(nodes, bool) or not isinstance(nodes, int):
            raise ValueError(f"--nodes must be N or MIN:MAX, got {nodes!r}")
        if self.min_nodes is not None and not 1 <= self.min_nodes <= self.nodes:
            raise ValueError(f"--nodes MIN:MAX needs 1 <= MIN <= MAX, got {self.min_nodes}:{self.nodes}")

    @property
    def nnodes(self) -> str:
        """torchrun's ``--nnodes``: ``N``, or ``MIN:MAX`` for an elastic range."""
        if self.min_nodes is None or self.min_nodes == self.nodes:
            return str(self.nodes)
        return f"{self.min_nodes}:{self.nodes}"

    @property
    def world_size_may_change(self) -> bool:
        """``--allow-world-size-change``, or an elastic ``--nodes MIN:MAX`` range."""
        return self.allow_world_size_change or (
            self.min_nodes is not None and self.min_nodes < self.nodes
        )

    def _check_observability(self) -> None:
        urls: object = self.notify
        if isinstance(urls, str):
            urls = (urls,)
        if not isinstance(urls, (list, tuple)) or not all(isinstance(u, str) and u for u in urls):
            raise ValueError("--notify takes notification URLs (apprise: slack://..., "
                             "json://host:port/path, mailto://...)")
        object.__setattr__(self, "notify", tuple(urls))
        kinds: object = self.notify_on
        if isinstance(kinds, str):
            kinds = tuple(k.strip() for k in kinds.split(",") if k.strip())
        if kinds is not None:
            if not isinstance(kinds, (list, tuple)) or not kinds:
                raise ValueError(f"--notify-on takes a comma-separated list of {', '.join(NOTIFY_KINDS)}")
            unknown = [k for k in kinds if k not in NOTIFY_KINDS]
            if unknown:
                raise ValueError(f"--notify-on: unknown {', '.join(map(str, unknown))} "
                                 f"(choose from {', '.join(NOTIFY_KINDS)})")
            object.__setattr__(self, "notify_on", tuple(kinds))
        if self.metrics_port is not None and not 0 <= self.metrics_port < 65536:
            raise ValueError(f"--metrics-port must be in [0, 65535], got {self.metrics_port}")
        if not self.metrics_host:
            raise ValueError("--metrics-host must name an address (default 127.0.0.1)")
        if self.metrics_file is not None and not self.metrics_file:
            raise ValueError("--metrics-file must be a path")

    @property
    def retention_active(self) -> bool:
        """Whether any local retention rule is set (otherwise every snapshot is kept)."""
        return self.keep_local is not None or self.keep_every is not None or self.keep_best > 0


def _non_negative(flag: str, value: int | None) -> None:
    if value is not None and value < 0:
        raise ValueError(f"{flag} must be >= 0, got {value}")


def _at_least_one(flag: str, value: int | None) -> None:
    if value is not None and value < 1:
        raise ValueError(f"{flag} must be >= 1, got {value}")


# The type each key of a TOML config file must have; bools are not ints here (TOML has both).
_FIELD_TYPES: dict[str, tuple[type, ...]] = {
    "checkpoint_dir": (str,),
    "script": (str,),
    "script_args": (list,),
    "nodes": (int, str),
    "nproc_per_node": (int,),
    "node_rank": (int,),
    "rdzv_endpoint": (str,),
    "mirror": (str,),
    "run_id": (str,),
    "checkpoint_every": (int, str),
    "keep_local": (int, str),
    "keep_remote": (int,),
    "keep_every": (int,),
    "keep_best": (int,),
    "best_metric": (str,),
    "best_mode": (str,),
    "max_restarts": (int,),
    "grace": (int, float),
    "hang_timeout": (int, float),
    "allow_config_change": (bool,),
    "allow_world_size_change": (bool,),
    "node_copies": (bool,),
    "warm_spare": (bool,),
    "wrap": (bool,),
    "notify": (list, str),
    "notify_on": (list, str),
    "metrics_port": (int,),
    "metrics_host": (str,),
    "metrics_file": (str,),
    "on_divergence": (str,),
}
CONFIG_KEYS = frozenset(_FIELD_TYPES)


def load_config_file(path: str) -> dict[str, Any]:
    """Read a TOML config file into ``LaunchConfig`` field values.

    Keys are the long flag names, with dashes or underscores (``max-restarts`` or
    ``max_restarts``); an unknown key or a value of the wrong type is a ``ValueError``.
    """
    try:
        with open(path, "rb") as f:
            doc = tomllib.load(f)
    except FileNotFoundError:
        raise ValueError(f"config file {path} does not exist") from None
    except OSError as exc:
        raise ValueError(f"config file {path} is unreadable: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ValueError(f"config file {path} is not valid TOML: {exc}") from None
    out: dict[str, Any] = {}
    for raw_key, value in doc.items():
        key = raw_key.replace("-", "_")
        if key not in _FIELD_TYPES:
            known = ", ".join(sorted(k.replace("_", "-") for k in CONFIG_KEYS))
            raise ValueError(f"config file {path}: unknown key {raw_key!r} (known: {known})")
        if key in out:
            raise ValueError(f"config file {path}: key {raw_key!r} given twice")
        expected = _FIELD_TYPES[key]
        if isinstance(value, bool) and bool not in expected:
            raise ValueError(f"config file {path}: {raw_key} must not be a boolean")
        if not isinstance(value, expected):
            names = " or ".join(t.__name__ for t in expected)
            raise ValueError(f"config file {path}: {raw_key} must be {names}, got {value!r}")
        if key == "script_args" and isinstance(value, list):
            if not all(isinstance(a, str) for a in value):
                raise ValueError(f"config file {path}: script-args must be a list of strings")
            value = tuple(value)
        if key == "checkpoint_dir":
            # Relative to the config file, like every tool that reads paths from a file.
            value = os.path.join(os.path.dirname(os.path.abspath(path)), value)
        out[key] = value
    return out


def build_config(
    explicit: Mapping[str, Any], file_values: Mapping[str, Any] | None = None
) -> LaunchConfig:
    """Merge defaults < config file < explicit flags into a validated :class:`LaunchConfig`.

    ``explicit`` holds only the flags the user actually gave (absent or None = not given).
    """
    merged: dict[str, Any] = dict(file_values or {})
    for key, value in explicit.items():
        if key not in CONFIG_KEYS:
            raise ValueError(f"unknown launch option {key!r}")
        if value is not None:
            merged[key] = value
    for f in fields(LaunchConfig):
        if f.default is MISSING and f.default_factory is MISSING and f.name not in merged:
            flag = "SCRIPT" if f.name == "script" else "--" + f.name.replace("_", "-")
            raise ValueError(f"{flag} is required")
    if "script_args" in merged:
        merged["script_args"] = tuple(merged["script_args"])
    return LaunchConfig(**merged)


def check_launchable(config: LaunchConfig) -> None:
    """Filesystem checks done before anything is launched; ``ValueError`` with the reason."""
    if not os.path.isfile(config.script):
        raise ValueError(f"training script {config.script} does not exist or is not a file")
    if not os.access(config.script, os.R_OK):
        raise ValueError(f"training script {config.script} is not readable")
    directory = os.path.abspath(config.checkpoint_dir)
    if os.path.exists(directory) and not os.path.isdir(directory):
        raise ValueError(f"checkpoint dir {directory} exists and is not a directory")
    # Where the supervisor writes, and where rank 0 commits snapshots (a directory per
    # snapshot): a read-only one would otherwise be found by the first save, attempts later.
    for sub in ("run", "snapshots"):
        where = os.path.join(directory, sub)
        try:
            os.makedirs(where, exist_ok=True)
        except OSError as exc:
            raise ValueError(f"checkpoint dir {where} cannot be created: {exc.strerror}") from None
        probe = os.path.join(where, f".write-probe-{os.getpid()}")
        try:
            os.mkdir(probe)
            with open(os.path.join(probe, "probe"), "wb") as f:
                f.write(b"ok")
        except OSError as exc:
            raise ValueError(f"checkpoint dir {where} is not writable: {exc.strerror}") from None
        finally:
            shutil.rmtree(probe, ignore_errors=True)
