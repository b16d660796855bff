"""One way to run a piece of work beside the caller: a daemon thread whose outcome is a Future.

Background work must never die silently: its result or its exception (any ``BaseException``)
travels in a :class:`concurrent.futures.Future`, and whoever needs the work calls
``future.result()``, which returns the value or re-raises the error on the owner's thread.
A daemon thread rather than an executor: a worker that ends with ``os._exit`` or is torn down by
a signal must not wait at interpreter exit for a pool to join.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import TypeVar

T = TypeVar("T")


def run_in_thread(work: Callable[[], T], *, name: str) -> Future[T]:
    """Start ``work`` on a new daemon thread named ``name``; its outcome is the returned Future."""
    future: Future[T] = Future()
    future.set_running_or_notify_cancel()

    def target() -> None:
        try:
            value = work()
        except BaseException as exc:  # handed to the owner by future.result()
            future.set_exception(exc)
        else:
            future.set_result(value)

    threading.Thread(target=target, name=name, daemon=True).start()
    return future
