"""The background writer: errors kept in order, and its low priority (inherited by helpers)."""

from __future__ import annotations

import os
import platform
import threading

import pytest

from trainer.writer import BackgroundWriter

pytestmark = pytest.mark.timeout(30)


def _nice() -> int:
    return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())


@pytest.mark.skipif(platform.system() != "Linux", reason="per-thread nice is Linux only")
def test_low_priority_writer_runs_at_nice_19_and_its_threads_inherit_it() -> None:
    seen: dict[str, int] = {}

    def job() -> None:
        seen["writer"] = _nice()
        helper = threading.Thread(target=lambda: seen.setdefault("hasher", _nice()))
        helper.start()
        helper.join()

    writer = BackgroundWriter("w", low_priority=True)
    writer.submit(job, label="j")
    writer.close()
    assert seen == {"writer": 19, "hasher": 19}
    caller = _nice()
    assert caller != 19 or os.nice(0) == 19  # the training thread keeps its own priority

    plain = BackgroundWriter("p")
    plain.submit(lambda: seen.__setitem__("plain", _nice()), label="p")
    plain.close()
    assert seen["plain"] == caller


def test_first_error_is_kept_and_later_jobs_are_skipped() -> None:
    writer = BackgroundWriter("e", low_priority=True)
    ran: list[str] = []
    queued = threading.Event()

    def fail() -> None:
        queued.wait(10)  # fails only once the next job is in the queue
        raise OSError("disk gone")

    writer.submit(fail, label="a")
    job = writer.submit(lambda: ran.append("b"), label="b")
    queued.set()
    with pytest.raises(OSError, match="disk gone"):
        writer.wait()
    assert ran == [] and job.skipped
