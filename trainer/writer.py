"""A background writer thread that runs snapshot and export jobs in order and keeps their errors.

Jobs run one at a time, first in first out, on a single daemon thread. The first error a job
raises is captured and re-raised to the training thread by :meth:`BackgroundWriter.wait`,
:meth:`BackgroundWriter.raise_if_failed` and the next :meth:`BackgroundWriter.submit`; jobs queued
after a failure are skipped, so an error is never lost and never buried under later ones.
"""

from __future__ import annotations

import contextvars
import queue
import threading
from collections.abc import Callable

from contract.priority import lower_thread_priority


class Job:
    """A queued unit of work; :meth:`wait` blocks until it ran (or was skipped)."""

    def __init__(self, fn: Callable[[], None], label: str) -> None:
        self.fn = fn
        self.label = label
        self.done = threading.Event()
        self.skipped = False

    def wait(self) -> None:
        """Block until the job finished; does not raise (see BackgroundWriter.wait)."""
        self.done.wait()


class BackgroundWriter:
    """Runs jobs on one background thread; errors are re-raised on the caller's thread."""

    def __init__(self, name: str = "trainer-writer", *, low_priority: bool = False) -> None:
        self._name = name
        #: Lower the thread's CPU and I/O priority when it starts (contract.priority): it works
        #: beside training, and the hashing threads it starts inherit the priority.
        self._low_priority = low_priority
        self._queue: queue.Queue[Job | None] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._error: BaseException | None = None
        self._closed = False

    @property
    def failed(self) -> bool:
        """True once a job has raised."""
        return self._error is not None

    def raise_if_failed(self) -> None:
        """Re-raise the first error a job raised, if any."""
        with self._lock:
            err = self._error
        if err is not None:
            raise err

    def submit(self, fn: Callable[[], None], *, label: str) -> Job:
        """Queue ``fn``; raises the error of an earlier job first, if there is one."""
        self.raise_if_failed()
        if self._closed:
            raise RuntimeError("writer is closed")
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
            self._thread.start()
        # Run the job in a copy of the caller's context so that bound log fields follow it.
        context = contextvars.copy_context()
        job = Job(lambda: context.run(fn), label)
        self._queue.put(job)
        return job

    def wait(self) -> None:
        """Block until every queued job ran, then re-raise the first error if one failed."""
        if self._thread is not None:
            self._queue.join()
        self.raise_if_failed()

    def close(self) -> None:
        """Wait for the queue, stop the thread and re-raise a pending error."""
        if self._thread is not None and not self._closed:
            self._queue.join()
            self._queue.put(None)
            self._thread.join()
        self._closed = True
        self.raise_if_failed()

    def _run(self) -> None:
        if self._low_priority:
            lower_thread_priority(event="snapshot.priority_unavailable")
        while True:
            job = self._queue.get()
            try:
                if job is None:
                    return
                if self._error is not None:
                    job.skipped = True
                    continue
                try:
                    job.fn()
                except BaseException as exc:  # re-raised on the training thread, never lost
                    with self._lock:
                        if self._error is None:
                            self._error = exc
            finally:
                if job is not None:
                    job.done.set()
                self._queue.task_done()
