"""The ``orchestrator`` command line: ``launch``, ``status`` and ``snapshots``.

A thin layer: it parses arguments, turns every configuration problem into exit status 2
before anything is launched, wires the real clock, store, worker group and signal handlers into
a :class:`~orchestrator.supervisor.Supervisor`, and maps its outcome to the exit codes of the
user-facing contract (0 done, 1 failed with the root cause on stderr, 2 usage, 75 preempted).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import signal
import sys
from collections.abc import Callable, Sequence
from types import FrameType
from typing import Any

from contract.codes import EXIT_FAILED, EXIT_PREEMPTED, EXIT_USAGE, TERMINAL_PHASE_NAMES
from contract.faults import FaultInjector
from contract.logs import configure_logging
from contract.paths import RunPaths
from orchestrator import check_resume, report
from orchestrator.clock import RealClock
from orchestrator.config import (
    KEEP_ALL,
    NOTIFY_KINDS,
    LaunchConfig,
    build_config,
    check_launchable,
    load_config_file,
)
from orchestrator.launcher import (
    ProgressLine,
    TerminalStatus,
    TorchrunGroup,
    kill_orphans,
    total_steps_hint,
)
from orchestrator.mirror import (
    Mirror,
    MirrorCrashed,
    MirrorUnavailable,
    RemoteTier,
    call_bounded,
    error_text,
    open_remote,
    preflight,
)
from orchestrator.notices import poller_from_settings
from orchestrator.restore import terminal_progress
from orchestrator.runstate import (
    EventLog,
    LockHeld,
    RunLock,
    RunState,
    launch_identity,
    next_attempt,
    read_state,
    stable_run_id,
)
from orchestrator.settings import (
    Settings,
    inherited_environment,
    load_settings,
    preempt_signal_numbers,
)
from orchestrator.status import (
    NoRunState,
    remote_snapshot_records,
    remote_status_document,
    render_determinism,
    render_snapshots,
    render_status,
    snapshot_records,
    status_document,
)
from orchestrator.supervisor import StopRequest, Supervisor
from storage import LocalSnapshotStore
from storage.errors import StorageError

PROG = "orchestrator"


def _int_arg(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None


def _keep_arg(text: str) -> int | str:
    if text == KEEP_ALL:
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a count or {KEEP_ALL!r}, got {text!r}") from None


def _nodes_arg(text: str) -> int | str:
    """``N`` as an int, ``MIN:MAX`` as text (LaunchConfig parses and checks the range)."""
    if ":" in text:
        return text
    return _int_arg(text)


def _float_arg(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    """The full argument parser (public so the docs and tests can render it)."""
    parser = argparse.ArgumentParser(prog=PROG, description="Fault-tolerant launcher for PyTorch training.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    # Every launch flag defaults to None so that only flags actually given override --config.
    launch = sub.add_parser("launch", help="run a training script under supervision")
    launch.add_argument(
        "--nodes", type=_nodes_arg, metavar="N|MIN:MAX", help="number of nodes; MIN:MAX is "
        "torchrun's elastic range (the group re-forms with the nodes it has, and a snapshot of "
        "another world size is resumed: implies --allow-world-size-change)"
    )
    launch.add_argument("--nproc-per-node", type=_int_arg, help="ranks on this node")
    launch.add_argument("--node-rank", type=_int_arg, help="this node's rank")
    launch.add_argument("--rdzv-endpoint", metavar="HOST:PORT", help="c10d rendezvous endpoint")
    launch.add_argument("--checkpoint-dir", metavar="DIR", help="node-local checkpoint dir")
    launch.add_argument(
        "--mirror", metavar="URL", help="object store prefix every snapshot is mirrored to "
        "(s3://bucket/prefix or any fsspec URL; credentials from the AWS variables)"
    )
    launch.add_argument("--run-id", metavar="ID", help="run id")
    # Validated by LaunchConfig with contract.interval.parse_interval (a bad value exits 2).
    launch.add_argument(
        "--checkpoint-every", metavar="STEPS|DURATION|auto", help="snapshot interval: steps "
        "(25; 0 = final snapshot only), a duration (90s, 10m, 1h) or auto (100 x the measured "
        "snapshot stall, 60 s to ORCH_MAX_SNAPSHOT_INTERVAL_S); default: the script's "
        "Checkpointer(every=...) if it sets one, else auto"
    )
    launch.add_argument("--keep-local", type=_keep_arg, metavar="K|all", help="keep the last K "
                        "local snapshots, or all of them")
    launch.add_argument("--keep-remote", type=_int_arg, metavar="K", help="keep the last K remote "
                        "snapshots (needs --mirror)")
    launch.add_argument("--keep-every", type=_int_arg, metavar="N", help="also keep steps divisible by N")
    launch.add_argument("--keep-best", type=_int_arg, metavar="K", help="also keep the K best "
                        "by the metric the script declares (Checkpointer(best=BestPolicy(...)))")
    # Refused with a message that says where the metric is named now (see config.BEST_MOVED).
    launch.add_argument("--best-metric", help=argparse.SUPPRESS)
    launch.add_argument("--best-mode", help=argparse.SUPPRESS)
    launch.add_argument("--max-restarts", type=_int_arg, metavar="K", help="relaunches that "
                        "spend a restart before giving up")
    launch.add_argument("--grace", type=_float_arg, metavar="SECONDS", help="budget of a "
                        "preemption (emergency snapshot + mirror flush); terminate grace period")
    launch.add_argument("--hang-timeout", type=_float_arg, metavar="SECONDS", help="restart a "
                        "group whose heartbeats stop advancing for this long")
    launch.add_argument(
        "--allow-config-change", action="store_true", default=None, help="resume despite changed "
        "hyperparameters"
    )
    launch.add_argument(
        "--allow-world-size-change", action="store_true", default=None, help="resume a "
        "snapshot written by another number of ranks: the data continues sample-exactly, "
        "re-partitioned across the new ranks (see the README, World-size changes)"
    )
    launch.add_argument(
        "--node-copies", action=argparse.BooleanOptionalAction, default=None, help="DDP on "
        "several nodes: every node writes its own copy of each snapshot to its disk, so losing "
        "the node of rank 0 loses no snapshot (default: on); --no-node-copies: rank 0's node only"
    )
    launch.add_argument(
        "--warm-spare", action="store_true", default=None, help="single node: keep a second "
        "worker group started (imports, process group, model built) and waiting, so a restart "
        "skips start-up; costs that group's memory (on GPU too, if the script allocates there "
        "before Checkpointer.resume())"
    )
    launch.add_argument(
        "--wrap", action="store_true", default=None, help="run SCRIPT under "
        "trainer.run_script: a module-level script without a main() (nanoGPT's train.py, ...) "
        "gets error files, exit codes and preemption handling without changing it"
    )
    launch.add_argument(
        "--notify", action="append", metavar="URL", help="send alerts here (repeatable; apprise "
        "URLs: slack://..., discord://..., msteams://..., mailto://..., pagerduty://..., "
        "ntfy://..., json://host:port/path); never logged"
    )
    launch.add_argument(
        "--notify-on", metavar="KINDS", help="comma-separated alert kinds: "
        f"{','.join(NOTIFY_KINDS)} (default: all)"
    )
    launch.add_argument("--metrics-port", type=_int_arg, metavar="P", help="serve Prometheus "
                        "/metrics on this port (0: a free one, logged)")
    launch.add_argument("--metrics-host", metavar="HOST", help="address /metrics binds to")
    launch.add_argument("--metrics-file", metavar="PATH", help="also write the metrics to this "
                        "file for node_exporter's textfile collector")
    launch.add_argument(
        "--force", action="store_true", help="launch even when the dir holds a run already done "
        "with the same script, arguments, layout and mirror (otherwise: 'already done at step "
        "N', exit 0, nothing started); the script then resumes from its final snapshot. A new "
        "run needs a new --checkpoint-dir"
    )
    launch.add_argument(
        "--on-divergence", choices=("warn", "fail"), default=None, help="when a resumed rank "
        "re-executes a step and its loss bits differ from the failed attempt's journal: warn "
        "(default; resume.diverged, status shows it) or fail (fatal, the launch gives up)"
    )
    launch.add_argument("--config", metavar="FILE", help="TOML file with defaults for the flags")
    launch.add_argument("script", nargs="?", metavar="SCRIPT", help="the training script")
    launch.add_argument("script_args", nargs=argparse.REMAINDER, metavar="SCRIPT_ARGS")

    _state_defaults(launch)

    status = sub.add_parser("status", help="show the state of a run")
    _add_location(status)
    status.add_argument("--json", action="store_true", help="one JSON object")
    status.add_argument("--watch", action="store_true", help="refresh until the run ends")

    snaps = sub.add_parser("snapshots", help="list snapshots (both tiers when both are given)")
    snaps.add_argument("--checkpoint-dir", metavar="DIR")
    snaps.add_argument("--mirror", metavar="URL")
    snaps.add_argument(
        "--verify",
        nargs="?",
        const="files",
        choices=("files", "deep"),
        metavar="files|deep",
        help="check every file's checksum; 'deep' also recomputes the state's content digest "
        "from the files and compares it with the manifest's (default: sizes only)",
    )
    snaps.add_argument("--json", action="store_true", help="a JSON list, oldest first")

    check = sub.add_parser(
        "check-resume",
        help="run a script twice fresh and once killed and resumed; are they bit-identical?",
    )
    check.add_argument("--nproc-per-node", type=_int_arg, default=2, metavar="M",
                       help="ranks per run (default: 2)")
    check.add_argument("--at", type=_int_arg, metavar="STEP", help="the step whose end the "
                       "last rank is SIGKILLed at; each run then stops at 2 x STEP (default: "
                       "runs stop at step 20 or the script's end, snapshots every 5, and the "
                       "step is chosen from the first run: between two snapshots, so that the "
                       "resume re-executes steps)")
    check.add_argument("--workdir", metavar="DIR", help="where the three runs are kept "
                       "(default: a new temporary dir, printed)")
    check.add_argument("--timeout", type=_float_arg, default=1800.0, metavar="SECONDS",
                       help="bound on each run (default: 1800)")
    check.add_argument("--json", action="store_true", help="one JSON object")
    check.add_argument("script", metavar="SCRIPT", help="the training script")
    check.add_argument("script_args", nargs=argparse.REMAINDER, metavar="SCRIPT_ARGS")

    rep = sub.add_parser("report", help="write a self-contained HTML report of a run "
                         "(timeline, incidents, goodput, snapshots, mirror lag)")
    rep.add_argument("--checkpoint-dir", metavar="DIR", required=True)
    rep.add_argument("--mirror", metavar="URL", help="also list the remote tier")
    rep.add_argument("--out", metavar="FILE.html", required=True, help="the page to write")
    return parser


#: What a launch option left unset means (its LaunchConfig default is None or absent).
_UNSET_MEANS = {
    "rdzv_endpoint": "none: single node, a fresh local rendezvous per attempt",
    "checkpoint_dir": "none; required, here or as checkpoint-dir in --config",
    "mirror": "none: local snapshots only",
    "run_id": "the one in the dir's run/state.json, else a new random one",
    "checkpoint_every": "the script's own interval",
    "keep_remote": "none: every remote snapshot is kept",
    "keep_every": "none",
    "hang_timeout": "none: no heartbeat watchdog",
    "notify": "none: no alerts",
    "notify_on": "all kinds",
    "metrics_port": "none: no /metrics server",
    "metrics_file": "none",
    "config": "none",
    "script": "none; required, here or as script in --config",
    "script_args": "none",
}


def _state_defaults(parser: argparse.ArgumentParser) -> None:
    """End every option's help with its default, unless the help already states it.

    The launch flags default to None so that only flags actually given override --config, so
    argparse's own ``%(default)s`` would say None: the real defaults are LaunchConfig's.
    """
    config_defaults = {
        f.name: f.default for f in dataclasses.fields(LaunchConfig)
        if f.default is not dataclasses.MISSING
    }
    for action in parser._actions:
        if action.help == argparse.SUPPRESS or isinstance(action, argparse._HelpAction):
            continue
        if action.help and re.search(r"\bdefault\b", action.help):
            continue
        value = config_defaults.get(action.dest)
        if action.dest in _UNSET_MEANS:
            text = _UNSET_MEANS[action.dest]
        elif isinstance(value, bool) or (value is None and action.nargs == 0):
            text = "on" if value else "off"
        elif isinstance(value, float):
            text = f"{value:g}"
        elif value is not None:
            text = str(value) + (": off" if value == 0 and action.dest == "keep_best" else "")
        else:
            text = "none"
        action.help = f"{action.help} (default: {text})" if action.help else f"default: {text}"


def _add_location(p: argparse.ArgumentParser) -> None:
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--checkpoint-dir", metavar="DIR")
    where.add_argument("--mirror", metavar="URL")


def _error(command: str, message: str) -> None:
    print(f"{PROG} {command}: error: {message}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``orchestrator`` console script; returns the exit status."""
    args = build_parser().parse_args(argv)
    if args.command == "launch":
        return _launch(args)
    if args.command == "status":
        return _status(args)
    if args.command == "check-resume":
        return _check_resume(args)
    if args.command == "report":
        return report.main(args)
    return _snapshots(args)


def _check_resume(args: argparse.Namespace) -> int:
    """Exit 0 when the three runs are bit-identical; 1 when they are not, or could not be
    compared (a run failed: never "exact" without proof); 2 on bad usage."""
    try:
        the_plan = check_resume.plan(
            script=args.script, script_args=args.script_args, nproc_per_node=args.nproc_per_node,
            at=args.at, workdir=args.workdir, timeout_s=args.timeout,
        )
    except ValueError as exc:
        print(f"{PROG} check-resume: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if args.nproc_per_node < 1 or not os.path.isfile(args.script):
        print(f"{PROG} check-resume: no script {args.script!r} (or --nproc-per-node < 1)",
              file=sys.stderr)
        return EXIT_USAGE
    kill = "chosen from the first run" if the_plan.at is None else str(the_plan.at)
    print(f"check-resume: 3 runs of {args.script} in {the_plan.workdir} (kill at step {kill}, "
          f"stop at {the_plan.stop_at}, snapshots every {the_plan.every})", file=sys.stderr)
    try:
        verdict, details = check_resume.run_check(the_plan)
    except check_resume.CannotCheck as exc:
        if args.json:
            print(json.dumps({"exact": False, "first_divergence": None, "error": str(exc),
                              "hints": exc.hints, "workdir": the_plan.workdir}, indent=2))
        else:
            print(f"NOT checked: {exc}")
            for hint in exc.hints:
                print(f"  hint: {hint}")
        return EXIT_FAILED
    if args.json:
        print(json.dumps({**verdict.to_json(), **details}, indent=2))
    elif verdict.exact:
        print(f"bit-exact: fresh, fresh and resumed runs agree at steps {verdict.compared_steps} "
              f"(killed at the end of step {details['at']}, resumed from "
              f"{details['resumed_from']})")
    else:
        d = verdict.first_divergence
        if d is not None:
            rank = "" if d.rank is None else f" (rank {d.rank})"
            print(f"NOT bit-exact: {d.between} differ first at step {d.step} in {d.component}"
                  f"{rank}")
        for hint in verdict.hints:
            print(f"  hint: {hint}")
    return 0 if verdict.exact else EXIT_FAILED


# -- launch --------------------------------------------------------------------------------


_LAUNCH_KEYS = (
    "nodes",
    "nproc_per_node",
    "node_rank",
    "rdzv_endpoint",
    "checkpoint_dir",
    "mirror",
    "run_id",
    "checkpoint_every",
    "keep_local",
    "keep_remote",
    "keep_every",
    "keep_best",
    "best_metric",
    "best_mode",
    "max_restarts",
    "grace",
    "hang_timeout",
    "allow_config_change",
    "allow_world_size_change",
    "node_copies",
    "warm_spare",
    "wrap",
    "notify",
    "notify_on",
    "metrics_port",
    "metrics_host",
    "metrics_file",
    "on_divergence",
    "script",
)


def _launch(args: argparse.Namespace) -> int:
    explicit: dict[str, Any] = {k: getattr(args, k) for k in _LAUNCH_KEYS}
    script_args = list(args.script_args)
    if script_args[:1] == ["--"]:
        script_args = script_args[1:]
    if args.script is not None:
        explicit["script_args"] = script_args
    try:
        settings = load_settings()
        file_values = load_config_file(args.config) if args.config else {}
        config = build_config(explicit, file_values)
        check_launchable(config)
        remote: RemoteTier | None = None
        if config.mirror is not None:
            # Before anything starts: the bucket must be reachable and writable.
            remote = open_remote(config.mirror)
            preflight(remote, config.mirror, settings)
    except ValueError as exc:  # MirrorUnavailable included
        _error("launch", str(exc))
        return EXIT_USAGE
    paths = RunPaths.of(config.checkpoint_dir)
    lock = RunLock(paths.checkpoint_dir, holder_file=paths.lock)
    try:
        lock.acquire()
    except LockHeld as exc:
        _error("launch", f"{paths.checkpoint_dir} is in use: {exc}")
        return EXIT_USAGE
    try:
        if not args.force and _report_already_done(paths, config, settings):
            return 0
        return _supervise(config=config, settings=settings, paths=paths, remote=remote)
    finally:
        lock.release()


def _already_done(paths: RunPaths, config: LaunchConfig) -> tuple[int, str] | None:
    """``(step, run_id)`` when the dir's run is finished and this launch would only repeat its
    end; None to launch as usual.

    The evidence (all of it, else launch): ``state.json`` says ``done``; it records the same
    :func:`launch_identity` (script, arguments, layout, mirror); the run id, if given, matches;
    the last step equals the newest local snapshot's, which is valid (manifest and sizes, no
    checksum pass: nothing is loaded) and was written by that run; with a mirror, it reached
    the object store (a relaunch uploads what is missing). Multi-node runs always launch: a node
    that skipped would leave the others waiting in the rendezvous.
    """
    if config.nodes != 1:
        return None
    state = read_state(paths)
    if state is None or state.get("phase") != "done":
        return None
    run_id = state.get("run_id")
    if state.get("launch") != launch_identity(config) or not isinstance(run_id, str):
        return None
    if config.run_id is not None and config.run_id != run_id:
        return None
    step = state.get("step")
    if not isinstance(step, int) or isinstance(step, bool) or step != state.get("newest_local_step"):
        return None
    if config.mirror is not None and (
        state.get("newest_remote_step") != step or state.get("mirror_pending_steps")
    ):
        return None
    newest = LocalSnapshotStore(paths.checkpoint_dir).newest_valid(verify_checksums=False)
    if newest is None or newest.step != step or newest.manifest is None:
        return None
    return (step, run_id) if newest.manifest.run_id == run_id else None


def _report_already_done(paths: RunPaths, config: LaunchConfig, settings: Settings) -> bool:
    """Say so and record it when :func:`_already_done`; ``state.json`` is left as it is."""
    configure_logging(
        fmt=settings.log_format, run_id=None, node_rank=config.node_rank, rank=None, attempt=None
    )
    done = _already_done(paths, config)
    if done is None:
        return False
    step, run_id = done
    configure_logging(
        fmt=settings.log_format, run_id=run_id, node_rank=config.node_rank, rank=None, attempt=None
    )
    events = EventLog(paths.events, clock=RealClock(), run_id=run_id)
    try:
        events.emit("supervisor.already_done", step=step, pid=os.getpid(), script=config.script)
    finally:
        events.close()
    print(
        f"{PROG}: already done at step {step} ({paths.checkpoint_dir}: same script and "
        "arguments); nothing launched (--force launches anyway)",
        file=sys.stderr,
    )
    return True


def _supervise(
    *, config: LaunchConfig, settings: Settings, paths: RunPaths, remote: RemoteTier | None = None
) -> int:
    run_id = config.run_id or stable_run_id(paths)
    # A progress line at the bottom of a terminal (never with JSON logs or off a terminal).
    terminal = (
        TerminalStatus.install()
        if sys.stderr.isatty() and settings.log_format in (None, "console")
        else None
    )
    try:
        return _supervise_run(
            config=config, settings=settings, paths=paths, remote=remote, run_id=run_id,
            terminal=terminal,
        )
    finally:
        if terminal is not None:
            terminal.uninstall()


def _supervise_run(
    *,
    config: LaunchConfig,
    settings: Settings,
    paths: RunPaths,
    remote: RemoteTier | None,
    run_id: str,
    terminal: TerminalStatus | None,
) -> int:
    configure_logging(
        fmt=settings.log_format, run_id=run_id, node_rank=config.node_rank, rank=None, attempt=None
    )
    # Imported here: apprise and prometheus_client cost ~0.1 s that status, snapshots and an
    # "already done" relaunch do not need to pay.
    from orchestrator import metrics, notify

    clock = RealClock()
    events = EventLog(paths.events, clock=clock, run_id=run_id)
    # Before anything is recorded as started: a --metrics-port in use or an unwritable
    # --metrics-file is a usage error, and no notifier thread is left open by it.
    try:
        run_metrics = metrics.attach(config, events, run_id=run_id, settings=settings)
    except ValueError as exc:
        events.close()
        _error("launch", str(exc))
        return EXIT_USAGE
    notifier = notify.attach(config, events, run_id=run_id, settings=settings)
    try:
        orphans = kill_orphans(paths.checkpoint_dir, settings.kill_wait_s)
        if orphans:
            events.emit("supervisor.orphans_killed", pids=orphans)
        first_attempt = next_attempt(paths)
        events.emit(
            "supervisor.started",
            pid=os.getpid(),
            first_attempt=first_attempt,
            nodes=config.nodes,
            nproc_per_node=config.nproc_per_node,
            max_restarts=config.max_restarts,
            script=config.script,
        )
        def make_group() -> TorchrunGroup:
            return TorchrunGroup(
                config=config,
                settings=settings,
                run_id=run_id,
                base_env=inherited_environment(),
                log_path=paths.attempt_log,
                echo=sys.stderr.buffer,
            )

        group = make_group()
        stop = StopRequest()
        preempt_signals = preempt_signal_numbers(settings.preempt_signals)
        store = LocalSnapshotStore(paths.checkpoint_dir)
        mirror = None
        if remote is not None:
            mirror = Mirror(
                remote=remote,
                local=store,
                events=events,
                settings=settings,
                node_rank=config.node_rank,
                keep_remote=config.keep_remote,
                faults=FaultInjector.from_spec(settings.faults, rank=None, attempt=first_attempt),
                # Several nodes share the prefix: only abort uploads no live supervisor can own.
                stale_upload_age_s=0.0 if config.nodes == 1 else settings.mirror_stale_upload_age_s,
            )
        observers: list[Callable[[RunState], None]] = []
        if terminal is not None:
            observers.append(ProgressLine(terminal, total=total_steps_hint(config.script_args)).update)
        if run_metrics is not None:
            observers.append(run_metrics.on_state)

        def observe(state: RunState) -> None:
            for observer in observers:
                observer(state)

        supervisor = Supervisor(
            config=config,
            settings=settings,
            run_id=run_id,
            paths=paths,
            clock=clock,
            group=group,
            store=store,
            events=events,
            stop=stop,
            first_attempt=first_attempt,
            pid=os.getpid(),
            mirror=mirror,
            progress=terminal_progress(sys.stderr),
            preempt_signals=preempt_signals,
            preemptions=_previous_preemptions(paths),
            notices=poller_from_settings(settings),
            spare_factory=make_group if config.warm_spare else None,
            observer=observe if observers else None,
        )

        def on_signal(signum: int, _frame: FrameType | None) -> None:
            stop.request(signum)

        # SIGTERM (and SIGUSR1, ORCH_PREEMPT_SIGNALS): preemption, exit 75; SIGINT: interrupt.
        handled = {signal.SIGINT, signal.SIGTERM, *preempt_signals}
        previous = {s: signal.signal(s, on_signal) for s in handled}
        try:
            outcome = supervisor.run()
        except StorageError as exc:
            _error("launch", f"run failed: storage error: {error_text(exc)}")
            return EXIT_FAILED
        except MirrorCrashed as exc:
            _error("launch", f"run failed: {exc}")
            return EXIT_FAILED
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
    finally:
        # Bounded: the last alerts (gave up, finished) go out, the metrics server stops.
        for closer in (notifier, run_metrics):
            if closer is not None:
                closer.close()
        events.close()
    if outcome.exit_code == EXIT_PREEMPTED:
        print(f"{PROG}: preempted; relaunch the same command to resume", file=sys.stderr)
    elif outcome.exit_code != 0 and outcome.failure:
        print(f"{PROG}: run failed: {outcome.failure}{_log_hint(paths)}", file=sys.stderr)
    if outcome.state_error is not None:
        print(f"{PROG}: warning: the run's state was not recorded ({outcome.state_error}); "
              "`orchestrator status` shows an older state", file=sys.stderr)
    audit = (read_state(paths) or {}).get("determinism")
    if isinstance(audit, dict) and audit.get("state") == "diverged":
        # --on-divergence warn trained on: the last word on the terminal must not hide that the
        # result differs from an uninterrupted run (the mid-run warning scrolls away).
        print(f"{PROG}: warning: the resumed run is not bit-identical to the failed attempt: "
              f"{render_determinism(audit)}; `orchestrator check-resume` names the cause",
              file=sys.stderr)
    return outcome.exit_code


def _log_hint(paths: RunPaths) -> str:
    """`` (torchrun's output: <log>)`` for the last attempt, whose tracebacks the terminal did
    not show (see launcher.EchoFilter); empty when there is none."""
    state = read_state(paths)
    attempt = None if state is None else state.get("attempt")
    if not isinstance(attempt, int) or isinstance(attempt, bool):
        return ""
    path = paths.attempt_log(attempt)
    return f" (torchrun's output: {path})" if os.path.exists(path) else ""


def _previous_preemptions(paths: RunPaths) -> int:
    """Preemptions recorded by earlier launches on this dir (a run's count spans relaunches)."""
    state = read_state(paths)
    value = None if state is None else state.get("preemptions")
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0


# -- status and snapshots ------------------------------------------------------------------


def _quiet_logging() -> None:
    # Storage logs (e.g. an invalid snapshot) must go to stderr: stdout carries --json output.
    configure_logging(fmt=None, run_id=None, node_rank=None, rank=None, attempt=None)


def _checkpoint_dir(command: str, directory: str) -> str | None:
    if not os.path.isdir(directory):
        _error(command, f"checkpoint dir {directory} does not exist")
        return None
    return directory


def _remote(command: str, url: str) -> RemoteTier | None:
    try:
        return open_remote(url)
    except MirrorUnavailable as exc:
        _error(command, str(exc))
        return None


def _status(args: argparse.Namespace) -> int:
    _quiet_logging()
    remote: RemoteTier | None = None
    directory: str | None = None
    if args.mirror is not None:
        remote = _remote("status", args.mirror)
        if remote is None:
            return EXIT_USAGE
    else:
        directory = _checkpoint_dir("status", str(args.checkpoint_dir))
        if directory is None:
            return EXIT_USAGE
    try:
        settings = load_settings()
    except ValueError as exc:
        _error("status", str(exc))
        return EXIT_USAGE
    clock = RealClock()
    deadline = clock.monotonic() + settings.watch_max_s
    while True:
        try:
            if remote is not None:
                doc = remote_status_document(remote, clock=clock, settings=settings)
            else:
                assert directory is not None
                doc = status_document(directory, clock=clock)
        except NoRunState as exc:
            _error("status", str(exc))
            return EXIT_FAILED
        except StorageError as exc:
            _error("status", f"cannot read the mirror: {error_text(exc)}")
            return EXIT_FAILED
        if args.json:
            print(json.dumps(doc, sort_keys=True), flush=True)
        else:
            print(render_status(doc), flush=True)
        ended = doc.get("phase") in TERMINAL_PHASE_NAMES or not doc.get("supervisor_alive")
        if not args.watch or ended or clock.monotonic() >= deadline:
            return 0
        if not args.json:
            print(flush=True)
        clock.sleep(settings.watch_interval_s)


def _snapshots(args: argparse.Namespace) -> int:
    _quiet_logging()
    if args.checkpoint_dir is None and args.mirror is None:
        _error("snapshots", "give --checkpoint-dir DIR, --mirror URL, or both")
        return EXIT_USAGE
    records: list[dict[str, Any]] = []
    verify, deep = args.verify is not None, args.verify == "deep"
    if args.checkpoint_dir is not None:
        directory = _checkpoint_dir("snapshots", str(args.checkpoint_dir))
        if directory is None:
            return EXIT_USAGE
        records.extend(snapshot_records(directory, verify=verify, deep=deep))
    if args.mirror is not None:
        remote = _remote("snapshots", args.mirror)
        if remote is None:
            return EXIT_USAGE
        try:
            settings = load_settings()
        except ValueError as exc:
            _error("snapshots", str(exc))
            return EXIT_USAGE
        try:
            records.extend(
                call_bounded(
                    settings, lambda: remote_snapshot_records(remote, verify=verify, deep=deep)
                )
            )
        except StorageError as exc:
            _error("snapshots", f"cannot list the mirror: {error_text(exc)}")
            return EXIT_FAILED
    records.sort(key=lambda r: (r["step"], r.get("tier") != "local"))
    if args.json:
        print(json.dumps(records, sort_keys=True))
    else:
        print(render_snapshots(records))
    return 0


if __name__ == "__main__":
    sys.exit(main())
