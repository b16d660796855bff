"""Starting, watching and stopping one worker group: a torchrun child per attempt.

torchrun always runs with ``--max-restarts=0``: every restart is a fresh torchrun process with a
fresh rendezvous, because torchrun's in-place restart after a SIGKILLed rank fails on gloo
(``connectFullMesh ... Connection refused`` to a stale peer). torchrun starts each rank in its
own session, so signals to torchrun's process group never reach the ranks; instead every process
of an attempt carries a unique ``ORCH_LAUNCH_TOKEN`` in its environment, and :func:`find_processes`
finds them all through ``/proc`` (even ranks orphaned by a dead torchrun) so that nothing of an
attempt survives into the next one. torchrun gets ``PR_SET_PDEATHSIG=SIGTERM``: if the supervisor
dies, even by SIGKILL, torchrun is told to stop and tears its ranks down itself.
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import io
import os
import queue
import re
import select
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from typing import IO, Any, Protocol, TextIO

import structlog

from contract.env import CHECKPOINT_DIR_VAR, LAUNCH_TOKEN_VAR, WorkerEnv
from orchestrator.config import LaunchConfig
from orchestrator.settings import Settings

log = structlog.get_logger("orchestrator.launcher")

TOKEN_VAR = LAUNCH_TOKEN_VAR
#: ``launch --wrap``: the file torchrun runs before SCRIPT (``python -m trainer.script``'s),
#: found beside this package rather than imported, as ``trainer`` imports torch.
WRAPPER = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "trainer", "script.py")
_PR_SET_PDEATHSIG = 1


class WorkerGroup(Protocol):
    """One attempt's worker group, as the supervisor sees it."""

    def start(self, attempt: int, resume_step: int | None, *, spare_gate: str | None = None) -> None:
        """Launch the group for ``attempt``, resuming from ``resume_step`` (None = fresh).

        With ``spare_gate`` the group is a warm spare: its ranks start up and wait in
        ``Checkpointer.resume()`` until that file appears, and read the resume step from it.
        """
        ...

    def poll(self) -> int | None:
        """The group's exit status once it has exited (and nothing of it is left), else None."""
        ...

    def terminate(self, grace_s: float) -> int:
        """Ask the group to stop, SIGKILL whatever is left after ``grace_s``; its exit status."""
        ...

    def kill(self) -> None:
        """SIGKILL every process of the group and wait until they are gone."""
        ...

    def output_tail(self) -> str:
        """The last part of the attempt's output, kept in memory: what the diagnosis reads
        when the attempt log lost writes (a full or read-only disk)."""
        ...


# -- processes of an attempt ---------------------------------------------------------------


def find_processes(required: Mapping[str, str], *, present: Sequence[str] = ()) -> list[int]:
    """Pids of live processes whose environment has every ``required`` pair and ``present`` var.

    Linux ``/proc``: processes of other users, and zombies, have an unreadable or empty
    environment and are skipped, so only our own live processes can match.
    """
    needles = [f"{k}={v}".encode() for k, v in required.items()]
    prefixes = [f"{k}=".encode() for k in present]
    own = os.getpid()
    found: list[int] = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == own:
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as f:
                env = f.read().split(b"\0")
        except OSError:
            continue
        if all(n in env for n in needles) and all(
            any(item.startswith(p) for item in env) for p in prefixes
        ):
            found.append(int(entry))
    return found


def _pidfd(pid: int) -> int | None:
    try:
        return os.pidfd_open(pid)
    except ProcessLookupError:
        return None


def kill_and_wait(pids: Sequence[int], timeout_s: float) -> list[int]:
    """SIGKILL ``pids`` and wait (event-driven, on pidfds) until they exit; pids still alive."""
    fds: dict[int, int] = {}
    for pid in pids:
        fd = _pidfd(pid)
        if fd is None:
            continue
        fds[fd] = pid
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    try:
        poller = select.poll()
        for fd in fds:
            poller.register(fd, select.POLLIN)
        pending = set(fds)
        deadline_ms = int(timeout_s * 1000)
        while pending and deadline_ms > 0:
            before = _now_ms()
            for fd, _ in poller.poll(deadline_ms):
                pending.discard(fd)
                poller.unregister(fd)
            deadline_ms -= _now_ms() - before
        return [fds[fd] for fd in pending]
    finally:
        for fd in fds:
            os.close(fd)


def _now_ms() -> int:
    return int(time.monotonic() * 1000)


# -- output tee ----------------------------------------------------------------------------


class Tee:
    """Copies a pipe to several sinks on a background thread until EOF.

    The pipe is always drained to EOF, even when a sink fails (a full disk, a closed stderr):
    a stalled pipe would block torchrun's and the ranks' writes and hang the group. A failed
    sink is dropped and its error kept; an unexpected error of the thread itself is kept too and
    re-raised by :meth:`check` and :meth:`join`, so nothing fails silently.
    """

    def __init__(self, source: IO[bytes], sinks: Mapping[str, Any]) -> None:
        self._source = source
        self._sinks = dict(sinks)
        self.sink_errors: dict[str, OSError] = {}
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="torchrun-tee", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            fd = self._source.fileno()
            while chunk := os.read(fd, 65536):
                for name, sink in list(self._sinks.items()):
                    try:
                        sink.write(chunk)
                        sink.flush()
                    except OSError as exc:
                        self.sink_errors[name] = exc
                        del self._sinks[name]
        except BaseException as exc:  # re-raised on the supervisor's thread by check()/join()
            self._error = exc

    def check(self) -> None:
        """Re-raise the thread's own failure, if any."""
        if self._error is not None:
            raise RuntimeError("the torchrun output tee thread failed") from self._error

    def join(self, timeout_s: float) -> bool:
        """Wait for EOF; False if the pipe is still open after ``timeout_s``."""
        self._thread.join(timeout_s)
        self.check()
        return not self._thread.is_alive()


class OutputTail:
    """A sink that keeps the last ``limit`` bytes written to it (the tee's memory of an attempt)."""

    def __init__(self, limit: int = 64 * 1024) -> None:
        self._limit = limit
        self._chunks: collections.deque[bytes] = collections.deque()
        self._size = 0
        self._lock = threading.Lock()

    def write(self, chunk: bytes) -> None:
        with self._lock:
            self._chunks.append(bytes(chunk))
            self._size += len(chunk)
            while self._size - len(self._chunks[0]) >= self._limit:
                self._size -= len(self._chunks.popleft())

    def flush(self) -> None:
        pass

    def text(self) -> str:
        with self._lock:
            data = b"".join(self._chunks)
        return data[-self._limit :].decode("utf-8", errors="replace")


class LossyEcho:
    """A sink that forwards to a stream on its own thread and drops data it cannot keep up with.

    The supervisor's stderr may be a pipe nobody reads yet (a test harness, a full log
    collector): a blocking write there would stall the tee, then torchrun's output pipe, then
    every rank's ``print``. The attempt log stays complete; only the echo loses bytes.
    """

    def __init__(self, stream: IO[bytes], max_chunks: int = 256) -> None:
        self._stream = stream
        self._queue: queue.Queue[bytes] = queue.Queue(maxsize=max_chunks)
        self.dropped_bytes = 0
        self._thread = threading.Thread(target=self._run, name="torchrun-echo", daemon=True)
        self._thread.start()

    def write(self, data: bytes) -> int:
        try:
            self._queue.put_nowait(bytes(data))
        except queue.Full:
            self.dropped_bytes += len(data)
        return len(data)

    def flush(self) -> None:
        """Nothing to do: the echo thread flushes after each chunk."""

    def _run(self) -> None:
        while True:
            chunk = self._queue.get()
            try:
                self._stream.write(chunk)
                self._stream.flush()
            except (OSError, ValueError):
                # stderr is gone (closed, broken pipe): keep draining so writers never block.
                self.dropped_bytes += len(chunk)


#: torchrun's per-rank line prefix (``[rank0]:``, ``[default1]:``), when it adds one.
_RANK_PREFIX = re.compile(rb"^\[[^\]\s]*\]:\s?")
_TRACEBACK = b"Traceback (most recent call last):"
_CHAINED = (
    b"During handling of the above exception, another exception occurred:",
    b"The above exception was the direct cause of the following exception:",
)
#: A frame line: also how a SyntaxError in the script starts (it has no "Traceback" header).
_FRAME = re.compile(rb'^\s+File "[^"]*", line \d+')
#: A traceback's last line: ``Type: message`` or a bare ``Type`` (a dotted name, no spaces).
#: Another line at column 0 inside a traceback is another process's, interleaved in the pipe.
_EXCEPTION_LINE = re.compile(rb"^[A-Za-z_][\w.]*(?::(?:\s.*)?)?$")
_RULE = re.compile(rb"^={20,}\s*$")


class EchoFilter:
    """A sink in front of the terminal echo that keeps multi-screen output in the attempt log.

    Python tracebacks (the ranks' on a script error, torchrun's own on a Ctrl-C, a preemption
    or a failed worker) and torchrun's ``FAILED ... Root Cause (first observed failure)``
    summary are held back, line by line; everything else (the ranks' ordinary log lines, their
    prints) passes through. The first time it holds something back in an attempt it writes one
    line naming the log instead (the root cause itself is the supervisor's to say). The attempt
    log, written by its own sink, stays complete.
    """

    _NORMAL, _TRACEBACK, _AFTER_EXCEPTION, _RULE_SEEN, _SUMMARY = range(5)

    def __init__(self, sink: Any, *, log_path: str) -> None:
        self._sink = sink
        self._log_path = log_path
        self._partial = b""
        self._state = self._NORMAL
        self._held: bytes | None = None
        self.hidden_lines = 0

    def write(self, data: bytes) -> int:
        lines = (self._partial + bytes(data)).split(b"\n")
        self._partial = lines.pop()
        out = [kept for line in lines if (kept := self._line(line + b"\n")) is not None]
        if out:
            self._sink.write(b"".join(out))
        return len(data)

    def flush(self) -> None:
        self._sink.flush()

    def close(self) -> None:
        """The pipe reached EOF: pass on a held rule line and an unterminated last line."""
        tail = b""
        if self._held is not None:
            tail += self._held
            self._held = None
        if self._partial and self._state in (self._NORMAL, self._AFTER_EXCEPTION):
            tail += self._partial + b"\n"
        self._partial = b""
        if tail:
            self._sink.write(tail)
            self._sink.flush()

    def _hide(self) -> bytes | None:
        self.hidden_lines += 1
        if self.hidden_lines == 1:
            return (
                f"orchestrator: torchrun's tracebacks and failure summary are kept out of the "
                f"terminal: see {self._log_path}\n".encode()
            )
        return None

    def _line(self, raw: bytes) -> bytes | None:
        text = _RANK_PREFIX.sub(b"", raw.rstrip(b"\r\n"))
        stripped = text.strip()
        state = self._state
        if state == self._RULE_SEEN:
            held, self._held = self._held or b"", None
            if stripped.endswith(b" FAILED"):
                self._state = self._SUMMARY
                note = self._hide()  # the rule line held back
                self.hidden_lines += 1
                return note
            self._state = self._NORMAL
            rest = self._line(raw)
            return held + (rest or b"")
        if state == self._SUMMARY:
            if _RULE.match(text):
                self._state = self._NORMAL
            return self._hide()
        if state == self._TRACEBACK:
            if not stripped or text[:1].isspace() or stripped == _TRACEBACK or stripped in _CHAINED:
                return self._hide()
            if not _EXCEPTION_LINE.match(stripped):
                # Another rank's ordinary line, written between two lines of this traceback
                # (seen in CI: "rank 1 attempt 1 ..." between a frame and its source line):
                # echoed, and the traceback goes on.
                return raw
            self._state = self._AFTER_EXCEPTION  # "Type: message", the traceback's last line
            return self._hide()
        if state == self._AFTER_EXCEPTION:
            if not stripped or stripped in _CHAINED or stripped.startswith(b":"):
                # Blank lines between chained tracebacks; ": message" when two ranks' lines
                # interleaved mid-line.
                return self._hide()
            self._state = self._NORMAL
        if stripped == _TRACEBACK or _FRAME.match(text):
            self._state = self._TRACEBACK
            return self._hide()
        if _RULE.match(text):
            self._state = self._RULE_SEEN
            self._held = raw
            return None
        return raw


# -- the progress line on a terminal -------------------------------------------------------


class TerminalStatus:
    """One status line kept at the bottom of a terminal while other output scrolls above it.

    Installed in place of ``sys.stderr``: every write through :attr:`stream` (structlog's lines,
    ``print``) or its ``buffer`` (the ranks' echo, from another thread) first erases the status
    line, and a write that ends a line draws it again, so the two never share a row.
    """

    _ERASE = "\r\x1b[K"

    def __init__(self, real: TextIO) -> None:
        self._real = real
        self._lock = threading.RLock()
        self._text = ""
        self._shown = False
        self.stream = _StatusText(self)

    @classmethod
    def install(cls) -> TerminalStatus:
        """Put a status line in front of ``sys.stderr`` (undo with :meth:`uninstall`)."""
        status = cls(sys.stderr)
        sys.stderr = status.stream
        return status

    def uninstall(self) -> None:
        """End the status line (left on screen) and give ``sys.stderr`` back."""
        with self._lock:
            if self._shown:
                self._real.write("\n")
                self._real.flush()
            self._text, self._shown = "", False
        if sys.stderr is self.stream:
            sys.stderr = self._real

    def show(self, text: str) -> None:
        """Replace the status line with ``text`` (one row, clipped to the terminal's width)."""
        width = shutil.get_terminal_size((100, 24)).columns
        text = text if len(text) < width else text[: max(0, width - 2)] + "~"
        with self._lock:
            self._text = text
            self._real.write(self._ERASE + text)
            self._real.flush()
            self._shown = True

    def write(self, data: str | bytes) -> None:
        with self._lock:
            if self._shown:
                self._real.write(self._ERASE)
                self._shown = False
            if isinstance(data, bytes):
                self._real.flush()
                self._real.buffer.write(data)
                self._real.buffer.flush()
                ends = data.endswith(b"\n")
            else:
                self._real.write(data)
                ends = data.endswith("\n")
            if ends and self._text:
                self._real.write(self._text)
                self._shown = True
            self._real.flush()


class _StatusText(io.TextIOBase):
    """``sys.stderr`` while a :class:`TerminalStatus` is installed."""

    def __init__(self, status: TerminalStatus) -> None:
        super().__init__()
        self._status = status
        self.buffer = _StatusBytes(status)

    def write(self, s: str) -> int:
        self._status.write(s)
        return len(s)

    def isatty(self) -> bool:
        return True

    def fileno(self) -> int:
        return self._status._real.fileno()


class _StatusBytes(io.RawIOBase):
    def __init__(self, status: TerminalStatus) -> None:
        super().__init__()
        self._status = status

    def writable(self) -> bool:
        return True

    def write(self, b: Any) -> int:
        data = bytes(b)
        self._status.write(data)
        return len(data)


_STEPS_FLAG = re.compile(r"^--(?:max-|total-|num-)?(?:train-)?steps(?:=(\d+))?$")


def total_steps_hint(script_args: Sequence[str]) -> int | None:
    """The run's total steps when the script takes them as ``--steps N`` (or ``--max-steps``,
    ``--total-steps``, ``--num-steps``, ``--train-steps``, ``=N``); None otherwise: the
    supervisor cannot know what a script's arguments mean, so this is only a display hint."""
    for i, arg in enumerate(script_args):
        m = _STEPS_FLAG.match(arg)
        if m is None:
            continue
        value = m.group(1) or (script_args[i + 1] if i + 1 < len(script_args) else "")
        if value.isdigit() and int(value) > 0:
            return int(value)
    return None


class ProgressLine:
    """Renders the supervisor's state as the terminal's status line, at most once a second.

    ``step[/total] | steps/s | last snapshot | restarts | phase``: the step from the heartbeats,
    the rate over the last ``window_s`` of this supervisor's own observations (reset when an
    attempt starts or the step goes back), the newest local snapshot.
    """

    def __init__(
        self,
        status: TerminalStatus,
        *,
        total: int | None = None,
        clock: Callable[[], float] = time.monotonic,
        min_interval_s: float = 1.0,
        window_s: float = 10.0,
    ) -> None:
        self._status = status
        self._total = total
        self._clock = clock
        self._min_interval_s = min_interval_s
        self._window_s = window_s
        self._samples: list[tuple[float, int]] = []
        self._attempt: int | None = None
        self._phase: str | None = None
        self._last_draw: float | None = None

    def render(self, state: Any, now: float) -> str:
        """The line for ``state`` (a :class:`~orchestrator.runstate.RunState`) at ``now``."""
        step = state.step
        if state.attempt != self._attempt or (
            self._samples and step is not None and step < self._samples[-1][1]
        ):
            self._samples = []
            self._attempt = state.attempt
        if step is not None and state.phase == "running":
            if not self._samples or self._samples[-1][1] != step:
                self._samples.append((now, step))
            while len(self._samples) > 2 and now - self._samples[1][0] > self._window_s:
                self._samples.pop(0)
        total = self._total if self._total is not None and (step or 0) <= self._total else None
        where = "-" if step is None else str(step)
        parts = [f"step {where}" + (f"/{total}" if total is not None else "")]
        rate = None
        if len(self._samples) >= 2:
            (t0, s0), (_, s1) = self._samples[0], self._samples[-1]
            # Up to now, not to the last change: a stalled run's rate decays.
            rate = (s1 - s0) / max(now - t0, 1e-6) if now > t0 else None
        parts.append("- steps/s" if rate is None else f"{rate:.3g} steps/s")
        snap = state.newest_local_step
        parts.append(f"last snapshot {'-' if snap is None else snap}")
        parts.append(f"restarts {state.restarts}")
        parts.append(state.phase)
        return "orchestrator: " + " | ".join(parts)

    def update(self, state: Any) -> None:
        """Observe ``state``; redraw if a second passed or the phase changed."""
        now = self._clock()
        phase_changed = state.phase != self._phase
        self._phase = state.phase
        text = self.render(state, now)
        if (
            not phase_changed
            and self._last_draw is not None
            and now - self._last_draw < self._min_interval_s
        ):
            return
        self._last_draw = now
        with contextlib.suppress(OSError, ValueError):
            self._status.show(text)


# -- the torchrun worker group -------------------------------------------------------------


def _make_pdeathsig(sig: signal.Signals) -> Callable[[], None]:
    """A preexec function setting the child's parent-death signal.

    libc is resolved here, in the parent: between fork and exec the child must not take locks
    (ctypes' loader does). PR_SET_PDEATHSIG fires when the *thread* that forked exits, so
    groups must be started from the supervisor's main thread.
    """
    libc = ctypes.CDLL(None, use_errno=True)
    prctl = libc.prctl
    parent = os.getpid()

    def preexec() -> None:
        prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0)
        if os.getppid() != parent:
            # The supervisor died before the death signal was armed: it will never come.
            os.kill(os.getpid(), sig)

    return preexec


def build_torchrun_command(config: LaunchConfig, settings: Settings, rdzv_id: str) -> list[str]:
    """torchrun's argv for one attempt (``--max-restarts=0``: we relaunch, never torchrun).

    Multi-node, ``rdzv_id`` must be the same on every node for every attempt: each node's
    supervisor counts its own attempts, and a replaced node starts again from 0.
    """
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nnodes={config.nnodes}",
        f"--nproc-per-node={config.nproc_per_node}",
    ]
    if config.nodes == 1:
        # A fresh c10d store on a free port each attempt: no state shared with the last one.
        cmd.append("--standalone")
    else:
        cmd += [
            "--rdzv-backend=c10d",
            f"--rdzv-endpoint={config.rdzv_endpoint}",
            f"--rdzv-id={rdzv_id}",
            f"--rdzv-conf=join_timeout={settings.rdzv_join_timeout_s}"
            + ("" if config.nnodes == str(config.nodes)
               else f",last_call_timeout={settings.rdzv_last_call_s}"),
            f"--node-rank={config.node_rank}",
        ]
    cmd += ["--max-restarts=0", f"--monitor-interval={settings.monitor_interval_s:g}"]
    if config.wrap:
        cmd.append(WRAPPER)
    cmd += [config.script, *config.script_args]
    return cmd


def build_worker_env(
    *,
    base: Mapping[str, str],
    config: LaunchConfig,
    settings: Settings,
    run_id: str,
    attempt: int,
    resume_step: int | None,
    token: str,
    spare_gate: str | None = None,
) -> dict[str, str]:
    """The environment of torchrun and its ranks: ``base`` plus the :class:`WorkerEnv` contract.

    A warm spare learns its resume step only when it is promoted (from the gate file), so it
    gets no ``ORCH_RESUME_STEP``.
    """
    contract = WorkerEnv(
        checkpoint_dir=os.path.abspath(config.checkpoint_dir),
        run_id=run_id,
        attempt=attempt,
        node_rank=config.node_rank,
        resume_mode="auto" if spare_gate is not None else "step" if resume_step is not None
        else "fresh",
        resume_step=None if spare_gate is not None else resume_step,
        allow_config_change=config.allow_config_change,
        allow_world_size_change=config.world_size_may_change,
        node_copies=config.node_copies,
        # None: the script's own interval (an inherited value is dropped by apply()).
        checkpoint_every=config.checkpoint_every,
        pg_timeout_s=settings.pg_timeout_s,
        log_format=settings.worker_log_format(),
        spare_gate=spare_gate,
        launch_token=token,
        on_divergence="fail" if config.on_divergence == "fail" else "warn",
    )
    env = contract.apply(base)
    env.setdefault("OMP_NUM_THREADS", "1")
    # Ranks write into a pipe: unbuffered, their last words before a crash reach the log.
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


class TorchrunGroup:
    """The real :class:`WorkerGroup`: ``python -m torch.distributed.run`` as a child process."""

    def __init__(
        self,
        *,
        config: LaunchConfig,
        settings: Settings,
        run_id: str,
        base_env: Mapping[str, str],
        log_path: Callable[[int], str],
        echo: IO[bytes] | None,
    ) -> None:
        self._config = config
        self._settings = settings
        self._run_id = run_id
        self._base_env = dict(base_env)
        self._log_path = log_path
        self._echo = LossyEcho(echo) if echo is not None else None
        self._echo_filter: EchoFilter | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._tee: Tee | None = None
        self._log: IO[bytes] | None = None
        self._tail = OutputTail()
        self._token = ""
        self._attempt = -1
        self._status: int | None = None

    def start(self, attempt: int, resume_step: int | None, *, spare_gate: str | None = None) -> None:
        if self._proc is not None and self._status is None:
            raise RuntimeError("the previous attempt's worker group is still running")
        self._token = uuid.uuid4().hex
        self._attempt = attempt
        self._status = None
        # Single node: a fresh --standalone store per attempt. Multi-node: one id for the run.
        rdzv_id = self._run_id if self._config.nodes > 1 else f"{self._run_id}-{attempt}"
        cmd = build_torchrun_command(self._config, self._settings, rdzv_id)
        env = build_worker_env(
            base=self._base_env,
            config=self._config,
            settings=self._settings,
            run_id=self._run_id,
            attempt=attempt,
            resume_step=resume_step,
            token=self._token,
            spare_gate=spare_gate,
        )
        path = self._log_path(attempt)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        self._log = open(path, "ab")  # noqa: SIM115 - closed when the attempt ends
        self._proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
            preexec_fn=_make_pdeathsig(signal.SIGTERM),
        )
        self._tail = OutputTail()
        sinks: dict[str, Any] = {"log": self._log, "tail": self._tail}
        if self._echo is not None:
            # torchrun's tracebacks and failure summary stay in the log (see EchoFilter).
            self._echo_filter = EchoFilter(self._echo, log_path=path)
            sinks["stderr"] = self._echo_filter
        if self._proc.stdout is None:
            raise RuntimeError("torchrun was started without an output pipe")
        self._tee = Tee(self._proc.stdout, sinks)
        log.info("launcher.torchrun_started", pid=self._proc.pid, attempt=attempt, cmd=cmd)

    def output_tail(self) -> str:
        return self._tail.text()

    @property
    def pid(self) -> int | None:
        """torchrun's pid while an attempt is running."""
        return self._proc.pid if self._proc is not None else None

    def poll(self) -> int | None:
        if self._proc is None:
            raise RuntimeError("poll() before start()")
        if self._status is not None:
            return self._status
        if self._tee is not None:
            self._tee.check()
        code = self._proc.poll()
        if code is None:
            return None
        self._finish(code)
        return code

    def terminate(self, grace_s: float) -> int:
        if self._proc is None:
            raise RuntimeError("terminate() before start()")
        if self._status is not None:
            return self._status
        # torchrun forwards SIGTERM to every rank (each in its own session) and waits for them.
        with contextlib.suppress(ProcessLookupError):
            self._proc.send_signal(signal.SIGTERM)
        try:
            code = self._proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            log.warning("launcher.grace_expired", grace_s=grace_s, attempt=self._attempt)
            self.kill()
            code = self._proc.wait()
        self._finish(code)
        return code

    def kill(self) -> None:
        if self._proc is None:
            return
        pids = set(find_processes({TOKEN_VAR: self._token}))
        if self._proc.poll() is None:
            pids.add(self._proc.pid)
        left = kill_and_wait(sorted(pids), self._settings.kill_wait_s)
        if left:
            log.error("launcher.unkillable", pids=left, attempt=self._attempt)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self._proc.wait(timeout=self._settings.kill_wait_s)
        if self._proc.returncode is not None:
            self._finish(self._proc.returncode)

    def _finish(self, code: int) -> None:
        """After torchrun exited: remove stragglers of the attempt, drain and close the log."""
        if self._status is not None:
            return
        self._status = code
        stragglers = find_processes({TOKEN_VAR: self._token})
        if stragglers:
            # Ranks orphaned by a torchrun that died abruptly would keep the old process group
            # (and its gloo sockets) alive into the next attempt.
            log.warning("launcher.stragglers_killed", pids=stragglers, attempt=self._attempt)
            kill_and_wait(stragglers, self._settings.kill_wait_s)
        if self._tee is not None:
            if not self._tee.join(self._settings.tee_join_s):
                log.warning("launcher.output_still_open", attempt=self._attempt)
            for sink, exc in self._tee.sink_errors.items():
                log.warning("launcher.output_sink_failed", sink=sink, error=str(exc))
        if self._echo_filter is not None:
            with contextlib.suppress(OSError, ValueError):
                self._echo_filter.close()
            self._echo_filter = None
        if self._echo is not None and self._echo.dropped_bytes:
            log.warning(
                "launcher.echo_dropped",
                dropped_bytes=self._echo.dropped_bytes,
                log=self._log_path(self._attempt),
            )
        if self._log is not None:
            # A full disk fails the flush of the buffered tail: the tee already reported the
            # sink (launcher.output_sink_failed), and the attempt's outcome does not depend on it.
            with contextlib.suppress(OSError):
                self._log.close()
            self._log = None
        if self._proc is not None and self._proc.stdout is not None:
            self._proc.stdout.close()


def kill_orphans(checkpoint_dir: str, timeout_s: float) -> list[int]:
    """SIGKILL processes left by an earlier supervisor of ``checkpoint_dir``; their pids.

    Call only while holding the dir's lock: then no live supervisor owns such processes, and
    ranks orphaned when a supervisor was SIGKILLed must not write into the new run.
    """
    # Only processes we launched carry a launch token: a shell that merely exported
    # ORCH_CHECKPOINT_DIR must never be touched.
    pids = find_processes(
        {CHECKPOINT_DIR_VAR: os.path.abspath(checkpoint_dir)}, present=(TOKEN_VAR,)
    )
    if pids:
        kill_and_wait(pids, timeout_s)
    return pids
