"""The worker's top-level handler: logging set-up, error files, exit codes, group teardown.

:func:`run` (or the :func:`entrypoint` decorator) calls the training ``main``; if it raises, the
handler writes ``run/errors/attempt-<A>/rank-<R>.json`` into the checkpoint directory (the one
given, else ``ORCH_CHECKPOINT_DIR``), logs the error and exits with :data:`EXIT_FATAL` (78) for
errors a relaunch cannot fix (configuration mismatch, bad arguments, world-size mismatch) or
:data:`EXIT_FAILURE` (1) otherwise. The process group is destroyed on every path; a failing rank
then ends with ``os._exit`` (no interpreter finalisation, no ``atexit`` handlers), which spares
the recovery a second or so of freeing tensors. A rank that used a process group and succeeded
(or was preempted) runs the ``atexit`` handlers and flushes every open file, then also ends with
``os._exit``: interpreter finalisation after gloo (FSDP2 about one exit in three, DDP about one
in 25 here) aborts with "terminate called without an active exception" (SIGABRT), which would
turn a finished run into a failed attempt after everything was committed.

:func:`run_script` runs a module-level script (one without a ``main()``, such as nanoGPT's
``train.py``) under the same handler, as ``python -m trainer.script SCRIPT ARGS`` does.
"""

from __future__ import annotations

import atexit
import functools
import gc
import io
import logging
import os
import runpy
import sys
from collections.abc import Callable, Sequence
from typing import Any, NoReturn, TypeVar

import structlog

from contract.codes import EXIT_FATAL, EXIT_PREEMPTED
from trainer import preemption
from trainer.distributed import is_initialized, shutdown
from trainer.errors import (
    EXIT_FAILURE,
    Preempted,
    UsageError,
    is_fatal,
    write_error_file,
)
from trainer.settings import WorkerSettings

log = structlog.get_logger("trainer.runtime")

T = TypeVar("T")

#: True while :func:`run` is calling its ``main``: a nested ``run`` (a script that calls
#: ``trainer.run(main)`` itself, run by :func:`run_script`) leaves the handling to the outer one.
_running = False


def configure_worker_logging(settings: WorkerSettings) -> None:
    """Configure structlog with run_id/node_rank/rank/attempt bound (storage's shared set-up)."""
    from contract.logs import configure_logging

    configure_logging(
        fmt=settings.log_format,
        run_id=settings.run_id,
        node_rank=settings.node_rank,
        rank=settings.rank,
        attempt=settings.attempt,
    )


def run(
    main: Callable[[], Any], *, checkpoint_dir: str | None = None, configure_logs: bool = True
) -> NoReturn:
    """Run ``main`` as a worker: exit 0 on success, write an error file and exit non-zero otherwise.

    ``SystemExit(2)`` (argparse's usage errors) counts as a fatal usage error, any other non-zero
    ``SystemExit`` as an ordinary failure. :class:`~trainer.errors.Preempted` (the emergency
    snapshot is committed) exits :data:`EXIT_PREEMPTED` (75) without an error file; the first
    SIGTERM is turned into such a request (see :mod:`trainer.preemption`).

    Called inside another ``run`` (a script run by :func:`run_script` that calls ``run`` itself),
    it just calls ``main`` and leaves errors, exit codes and teardown to the outer handler.
    """
    global _running
    if _running:
        main()
        raise SystemExit(0)
    try:
        settings = WorkerSettings.from_env()
    except ValueError as exc:
        print(f"trainer: bad worker environment: {exc}", file=sys.stderr)
        raise SystemExit(EXIT_FATAL) from exc
    if configure_logs:
        configure_worker_logging(settings)
    # A SIGTERM that reaches the rank itself (SLURM signals every process; torchrun forwards
    # one) becomes a preemption request honoured at the next step boundary, not a death.
    preemption.install_signal_handlers(
        local_world_size=settings.local_world_size,
        under_torchelastic=settings.under_torchelastic,
    )
    code = 0
    _running = True
    try:
        main()
    except Preempted as exc:
        log.warning("worker.preempted", step=exc.step)
        code = EXIT_PREEMPTED
    except SystemExit as exc:
        if exc.code == 2:
            # argparse's usage-error status: the same arguments will fail again.
            code = _report(UsageError("exited with status 2 (bad arguments)"), settings, checkpoint_dir)
        elif exc.code not in (0, None):
            code = _report(RuntimeError(f"exited with status {exc.code}"), settings, checkpoint_dir)
    except BaseException as exc:  # the process ends here: report every failure, then exit
        code = _report(exc, settings, checkpoint_dir)
    finally:
        _running = False
        # A script may destroy its group itself before returning: torchrun's world says too.
        had_group = settings.world_size > 1 or is_initialized()
        shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    if had_group and code in (0, EXIT_PREEMPTED):
        _exit_without_finalising(code)
    if code in (EXIT_FAILURE, EXIT_FATAL):
        # A failed rank holds the recovery up until it is gone, and finalising an interpreter
        # that holds gigabytes of tensors takes about a second (measured: 1.3 s with 3 GB, 0.3
        # s without). The report is written and flushed; nothing else of it is worth keeping.
        logging.shutdown()
        os._exit(code)
    raise SystemExit(code)


def _exit_without_finalising(code: int) -> NoReturn:
    """End a rank that used a process group: what a normal exit does for the user, without the
    C++ teardown of gloo's threads that aborts (see the module docstring).

    The ``atexit`` handlers run (experiment trackers flush there), every open Python file is
    flushed (a script that never closed its log file keeps its last lines), then logging is
    shut down and the process ends with ``code``.
    """
    try:
        atexit._run_exitfuncs()
    finally:
        for obj in gc.get_objects():
            if isinstance(obj, io.IOBase):
                try:
                    if not obj.closed and obj.writable():
                        obj.flush()
                except (OSError, ValueError):
                    pass  # a broken pipe or a detached buffer: nothing to keep there
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def _report(exc: BaseException, settings: WorkerSettings, checkpoint_dir: str | None) -> int:
    fatal = is_fatal(exc)
    directory = checkpoint_dir or settings.checkpoint_dir
    path = None
    if directory:
        try:
            path = write_error_file(directory, exc, rank=settings.rank, attempt=settings.attempt)
        except OSError as write_exc:
            log.error("worker.error_file_failed", error=str(write_exc))
    log.error(
        "worker.failed",
        error_type=type(exc).__name__,
        error=str(exc),
        fatal=fatal,
        error_file=path,
        exc_info=exc,
    )
    return EXIT_FATAL if fatal else EXIT_FAILURE


def run_script(
    path: str, argv: Sequence[str] = (), *, checkpoint_dir: str | None = None,
    configure_logs: bool = True,
) -> NoReturn:
    """Run the module-level script ``path`` with arguments ``argv`` under :func:`run`'s handler.

    The script runs as ``python path argv...`` would run it: as ``__main__`` (its ``if __name__
    == "__main__"`` block runs), with ``sys.argv == [path, *argv]`` and its directory first on
    ``sys.path`` (its sibling modules import). Exceptions, ``sys.exit`` codes and preemption are
    handled exactly as for ``run(main)``; a missing script is a fatal :class:`UsageError`. A
    script that calls ``trainer.run(main)`` itself works too (the inner ``run`` defers to this one).
    """

    def main() -> None:
        if not os.path.isfile(path):
            raise UsageError(f"training script {path!r} does not exist or is not a file")
        script_dir = os.path.dirname(os.path.abspath(path))
        package_dir = os.path.dirname(os.path.abspath(__file__))
        if sys.path and os.path.abspath(sys.path[0] or os.curdir) == package_dir:
            # `python trainer/script.py ...` put the trainer package's own directory first: its
            # modules (settings, data, state, ...) must not shadow the script's.
            del sys.path[0]
        sys.path.insert(0, script_dir)
        sys.argv = [path, *argv]
        runpy.run_path(path, run_name="__main__")

    run(main, checkpoint_dir=checkpoint_dir, configure_logs=configure_logs)


def entrypoint(fn: Callable[[], Any]) -> Callable[[], NoReturn]:
    """Decorator form of :func:`run`: calling the decorated function runs it as a worker."""

    @functools.wraps(fn)
    def wrapper() -> NoReturn:
        run(fn)

    return wrapper
