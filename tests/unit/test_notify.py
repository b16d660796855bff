"""Alerts (orchestrator.notify): which events become which messages, and that sending never
blocks the caller, stays bounded, retries, redacts and reports what it could not send."""

from __future__ import annotations

import http.server
import json
import logging
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import apprise
import pytest
import structlog
from structlog.testing import capture_logs

from contract.settings import load
from orchestrator import notify
from orchestrator.config import NOTIFY_KINDS, LaunchConfig
from orchestrator.notify import Alert, AlertBuilder, Destination, Notifier, redact
from orchestrator.runstate import EventLog
from orchestrator.settings import Settings
from tests.support.hanging import Hanging

pytestmark = pytest.mark.timeout(30)

RUN = "run-7"
SECRET = "S3cr3tT0ken"


def builder(kinds: tuple[str, ...] = NOTIFY_KINDS, **kw: Any) -> AlertBuilder:
    return AlertBuilder(run_id=RUN, node_rank=2, kinds=frozenset(kinds), host="node-a", **kw)


def ev(event: str, t: float = 100.0, **fields: Any) -> dict[str, Any]:
    return {"time": t, "event": event, "run_id": RUN, **fields}


def failure(attempt: int = 0, step: int = 40, beat: float = 99.0) -> list[dict[str, Any]]:
    return [
        ev("supervisor.attempt_ended", attempt=attempt, exit_code=1, step=step, resume_step=None,
           last_heartbeat_at=beat),
        ev("supervisor.attempt_failed", attempt=attempt, exit_code=1, source="error_file",
           root_cause="rank 1: RuntimeError: boom in the loss", failed_rank=1, fatal=False,
           progressed=True),
    ]


def backoff(attempt: int = 0) -> dict[str, Any]:
    return ev("supervisor.backoff", attempt=attempt, delay_s=0.5, restarts=1, max_restarts=3)


def feed(b: AlertBuilder, docs: list[dict[str, Any]]) -> list[Alert]:
    return [a for d in docs for a in b.feed(d)]


# -- what is sent when --------------------------------------------------------------------------


def test_failure_message_carries_run_node_step_phase_and_root_cause() -> None:
    [alert] = feed(builder(), [*failure(), backoff()])
    assert alert.kind == "failure" and alert.event == "supervisor.attempt_failed"
    assert "\n" not in alert.title
    assert alert.title.startswith(f"{RUN} node 2: attempt 0 failed (exit 1) at step 40")
    assert "restart 1/3" in alert.title
    for text in ("root cause: rank 1: RuntimeError: boom in the loss", "first failing rank: 1",
                 f"run {RUN}", "node 2 (node-a)", "attempt 0", "phase recovering", "step 40"):
        assert text in alert.body, text


def test_failure_then_gave_up_is_one_gave_up_message_with_the_root_cause() -> None:
    gave_up = ev("supervisor.gave_up", attempt=0, reason="max_restarts",
                 root_cause="rank 1: RuntimeError: boom in the loss", restarts=3,
                 no_progress_attempts=1)
    [alert] = feed(builder(), [*failure(), gave_up])
    assert alert.kind == "gave_up"
    assert "gave up after 3 restarts" in alert.title and "boom" in alert.title
    assert "root cause: rank 1: RuntimeError: boom in the loss" in alert.body
    assert "phase failed" in alert.body
    # Without gave_up selected, the failure itself says so.
    [alert] = feed(builder(("failure",)), [*failure(), gave_up])
    assert alert.kind == "failure" and "giving up" in alert.title and "phase failed" in alert.body


def test_kinds_filter() -> None:
    docs = [*failure(), backoff(),
            ev("supervisor.progress_resumed", attempt=1, step=31, resume_step=30, step_time=112.5),
            ev("supervisor.finished", attempt=1, step=100)]
    assert [a.kind for a in feed(builder(), docs)] == ["failure", "recovered", "finished"]
    assert [a.kind for a in feed(builder(("finished",)), docs)] == ["finished"]
    assert [a.kind for a in feed(builder(("recovered",)), docs)] == ["recovered"]
    assert feed(builder(("mirror", "hang")), docs) == []


def test_recovered_says_time_lost_and_steps_replayed() -> None:
    b = builder()
    feed(b, [*failure(step=40, beat=100.0), backoff()])
    [alert] = b.feed(ev("supervisor.progress_resumed", t=113.0, attempt=1, step=31,
                        resume_step=30, step_time=112.5))
    assert alert.kind == "recovered"
    assert "resumed from step 30" in alert.title
    assert "12.5s lost" in alert.title and "10 steps replayed" in alert.title
    assert "phase running" in alert.body and "step 31" in alert.body
    # The next attempt's progress is no new recovery.
    assert b.feed(ev("supervisor.progress_resumed", attempt=2, step=50, resume_step=40,
                     step_time=120.0)) == []


def test_first_progress_of_a_fresh_run_is_no_recovery() -> None:
    b = builder()
    assert b.feed(ev("supervisor.progress_resumed", attempt=0, step=1, resume_step=None,
                     step_time=1.0)) == []


def test_hang_is_one_hang_message() -> None:
    stacks = "stacks of ranks 0, 1 in /ck/run/logs/hang-attempt-0"
    docs = [ev("supervisor.hang_detected", attempt=0, silent_s=61.7, stacks=stacks,
               stacks_dir="/ck/run/logs/hang-attempt-0"), *failure(), backoff()]
    [alert] = feed(builder(), docs)
    assert alert.kind == "hang" and "no progress for 62s" in alert.title
    assert "attempt 0 killed" in alert.title
    assert stacks in alert.body  # the alert names where every rank's stack is
    # Without hang selected, it is an ordinary failure.
    [alert] = feed(builder(("failure",)), docs)
    assert alert.kind == "failure"


def test_preempted_then_recovered_in_the_next_launch() -> None:
    b = builder()
    [alert] = b.feed(ev("supervisor.preempted", t=200.0, attempt=3, signal="SIGTERM",
                        snapshot_step=57, newest_local_step=57, exit_code=0, grace_left_s=20.0))
    assert alert.kind == "preempted" and "step 57" in alert.title and "exit 75" in alert.title
    assert "phase preempted" in alert.body
    [alert] = b.feed(ev("supervisor.progress_resumed", attempt=4, step=58, resume_step=57,
                        step_time=260.0))
    assert alert.kind == "recovered" and "60.0s lost" in alert.title
    assert "0 steps replayed" in alert.title


def test_mirror_failures_are_deduplicated_within_the_window() -> None:
    b = builder(mirror_repeat_s=600.0)
    fail = "403 AccessDenied for bucket ckpt (step {})"
    out = [a for i in range(5) for a in b.feed(ev("mirror.failed", t=100.0 + 60 * i, step=10 * i,
                                                  error=fail.format(10 * i), permanent=True))]
    assert len(out) == 1 and out[0].kind == "mirror" and "403 AccessDenied" in out[0].title
    # Transient retries are never alerts.
    assert b.feed(ev("mirror.retry", step=1, attempt=1, error="timeout", delay_s=1.0)) == []
    [again] = b.feed(ev("mirror.failed", t=800.0, step=99, error=fail.format(99), permanent=True))
    assert "(4 more such failures since the last alert)" in again.body
    # Another error is another incident.
    assert len(b.feed(ev("mirror.failed", t=801.0, step=None, error="NoSuchBucket",
                         permanent=True))) == 1
    [behind] = b.feed(ev("mirror.behind", pending_steps=[40, 50], newest_remote_step=30,
                         lag_steps=20, error="NoSuchBucket", timeout_s=5.0))
    assert "2 snapshot(s) not uploaded" in behind.title


def test_diverged_and_finished() -> None:
    b = builder()
    [d] = b.feed(ev("resume.diverged", attempt=1, checked_through_step=20,
                    first_divergence_step=17, rank=1, fingerprint="x", expected="y"))
    assert d.kind == "diverged" and "step 17" in d.title and "rank 1" in d.body
    [f] = b.feed(ev("supervisor.finished", attempt=1, step=100))
    assert f.kind == "finished" and "finished at step 100" in f.title and "phase done" in f.body


def test_a_failure_without_its_verdict_is_sent_on_flush() -> None:
    b = builder()
    assert feed(b, failure()) == []
    [alert] = b.flush()
    assert alert.kind == "failure" and "boom" in alert.body
    assert b.flush() == []


# -- redaction ----------------------------------------------------------------------------------


def test_redact_shows_scheme_and_host_only_and_hides_token_hosts() -> None:
    def plugin_redact(url: str) -> str:
        return redact(url, apprise.Apprise.instantiate(url))

    assert plugin_redact(f"json://user:{SECRET}@127.0.0.1:8080/hook/{SECRET}") == \
        "json://127.0.0.1:8080"
    assert plugin_redact(f"slack://{SECRET}/TokenB/TokenC") == "slack://***"
    assert plugin_redact(f"tgram://123456789:{SECRET}/1234") == "tgram://***"
    assert plugin_redact(f"bogus://{SECRET}") == "bogus://***"


# -- sending ------------------------------------------------------------------------------------


class FakeTarget:
    """Fails ``failures`` times, then succeeds; ``gate`` (when given) holds every send."""

    def __init__(self, failures: int = 0, gate: threading.Event | None = None) -> None:
        self.failures = failures
        self.gate = gate
        self.calls: list[dict[str, Any]] = []

    def notify(self, *args: Any, **kwargs: Any) -> bool:
        if self.gate is not None:
            self.gate.wait(10)
        self.calls.append(kwargs)
        if self.failures > 0:
            self.failures -= 1
            return False
        return True


def finished(step: int) -> dict[str, Any]:
    return ev("supervisor.finished", t=time.time(), attempt=0, step=step)


def make(target: Any, **kw: Any) -> Notifier:
    kw.setdefault("retry_initial_s", 0.01)
    kw.setdefault("retry_max_s", 0.02)
    return Notifier([Destination(target=target, name="json://127.0.0.1:1")], builder(), **kw)


def test_retries_then_sends() -> None:
    target = FakeTarget(failures=2)
    n = make(target, attempts=3)
    with capture_logs() as logs:
        n.on_event(finished(5))
        n.close()
    assert len(target.calls) == 3 and n.sent == 1 and n.failed == 0
    [sent] = [e for e in logs if e["event"] == "notify.sent"]
    assert sent["attempts"] == 3 and sent["kind"] == "finished"


def test_retries_then_notify_failed() -> None:
    target = FakeTarget(failures=99)
    n = make(target, attempts=3)
    with capture_logs() as logs:
        n.on_event(finished(5))
        n.close()
    assert len(target.calls) == 3 and n.failed == 1
    [failed] = [e for e in logs if e["event"] == "notify.failed"]
    assert failed["attempts"] == 3 and failed["target"] == "json://127.0.0.1:1"
    assert failed["error"] == "apprise reported a failed send"


def test_queue_is_bounded_drops_the_oldest_and_says_so() -> None:
    gate = threading.Event()
    target = FakeTarget(gate=gate)
    n = make(target, queue_size=3)
    with capture_logs() as logs:
        n.on_event(finished(0))  # taken by the thread, held at the gate
        deadline = time.monotonic() + 5
        while n._senders[0].queue and time.monotonic() < deadline:
            time.sleep(0.01)
        started = time.monotonic()
        for step in range(1, 11):
            n.on_event(finished(step))
        # never blocks the emitting thread (the sender is held at the gate indefinitely; the
        # bound only separates "returned" from "waited for it", with room for a loaded machine)
        assert time.monotonic() - started < 5.0
        gate.set()
        n.close()
    titles = [c["title"] for c in target.calls]
    # 0 in flight; 1..10 queued into 3 places: 1..7 dropped, 8, 9, 10 sent.
    assert [t.rsplit(" ", 1)[-1] for t in titles] == ["0", "8", "9", "10"]
    assert "(7 earlier alerts were dropped" in target.calls[1]["body"]
    assert [e["alerts"] for e in logs if e["event"] == "notify.dropped"] == [7]


@pytest.fixture
def hanging() -> Iterator[Hanging]:
    server = Hanging()
    yield server
    server.close()


def test_close_is_bounded_when_the_endpoint_hangs(hanging: Hanging) -> None:
    dest = notify.destination(f"json://127.0.0.1:{hanging.port}/hook", timeout_s=30.0)
    assert dest is not None
    n = Notifier([dest], builder(), close_timeout_s=1.0)
    with capture_logs() as logs:
        started = time.monotonic()
        for step in range(5):
            n.on_event(finished(step))
        n.close()
        took = time.monotonic() - started
    # The close bound (1 s) holds, not the 30 s request timeout: bounds far apart, so a loaded
    # machine cannot blur them.
    assert took < 15.0
    [unsent] = [e for e in logs if e["event"] == "notify.unsent"]
    assert unsent["in_flight"] is True and unsent["alerts"] == 4
    # The abandoned send must not outlive this test: its failure (when the endpoint goes away)
    # would log notify.failed into the next test's capture. End it here and wait for it.
    hanging.close()
    for sender in n._senders:
        sender.thread.join(timeout=60)
        assert not sender.thread.is_alive()


def test_request_timeout_bounds_each_send(hanging: Hanging) -> None:
    dest = notify.destination(f"json://127.0.0.1:{hanging.port}/hook", timeout_s=0.3)
    assert dest is not None
    n = Notifier([dest], builder(), attempts=2, retry_initial_s=0.01, close_timeout_s=10.0)
    with capture_logs() as logs:
        started = time.monotonic()
        n.on_event(finished(1))
        n.close()
    # two attempts of 0.3 s each, not apprise's default 4 s per request (8 s)
    assert time.monotonic() - started < 6.0
    [failed] = [e for e in logs if e["event"] == "notify.failed"]
    assert failed["attempts"] == 2
    # A URL's own rto= wins over the setting.
    own = notify.destination(f"json://127.0.0.1:{hanging.port}/hook?rto=7", timeout_s=0.3)
    assert own is not None and own.target.request_timeout == (0.3, 7.0)  # type: ignore[attr-defined]


class Boom(BaseException):
    pass


class Exploding:
    def notify(self, *args: Any, **kwargs: Any) -> bool:
        raise Boom("the thread dies")


def test_a_crashed_thread_is_surfaced_not_silent() -> None:
    n = make(Exploding())
    with capture_logs() as logs:
        n.on_event(finished(1))
        n._senders[0].thread.join(5)
        n.on_event(finished(2))  # the next event reports it
        n.close()  # and close does not raise, nor report twice
    crashed = [e for e in logs if e["event"] == "notify.crashed"]
    assert len(crashed) == 1 and "the thread dies" in crashed[0]["error"]


@pytest.fixture
def refusing_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port: int = s.getsockname()[1]
    s.close()
    return port


def test_no_secret_in_any_log_line(refusing_port: int, caplog: pytest.LogCaptureFixture) -> None:
    """A failing URL with credentials: structlog events and stdlib logs (apprise's own) never
    carry the token."""
    url = f"json://admin:{SECRET}@127.0.0.1:{refusing_port}/hooks/{SECRET}x?token={SECRET}y"
    caplog.set_level(logging.DEBUG)
    with capture_logs() as setup:
        assert notify.destination(f"bogus://{SECRET}/x", timeout_s=0.5) is None
    dest = notify.destination(url, timeout_s=0.5)
    assert dest is not None
    n = Notifier([dest], builder(), attempts=2, retry_initial_s=0.01)
    with capture_logs() as logs:
        n.on_event(finished(3))
        n.close()
    assert n.failed == 1
    assert [e["target"] for e in logs if e["event"] == "notify.failed"] == \
        [f"json://127.0.0.1:{refusing_port}"]
    text = json.dumps(setup + logs, default=str) + caplog.text
    assert SECRET not in text


# -- attach ---------------------------------------------------------------------------------------


class Receiver(http.server.BaseHTTPRequestHandler):
    got: ClassVar[list[dict[str, Any]]] = []

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        Receiver.got.append(json.loads(body))
        self.send_response(200)
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


def test_attach_end_to_end_with_a_replayed_preemption(tmp_path: Path) -> None:
    Receiver.got = []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Receiver)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        ck = tmp_path / "ck"
        (ck / "run").mkdir(parents=True)
        earlier = [ev("supervisor.preempted", t=50.0, attempt=0, signal="SIGTERM",
                      snapshot_step=20, newest_local_step=20, exit_code=0, grace_left_s=1.0)]
        (ck / "run" / "events.jsonl").write_text("".join(json.dumps(d) + "\n" for d in earlier))
        config = LaunchConfig(checkpoint_dir=str(ck), script="t.py", node_rank=0,
                              notify=(f"json://127.0.0.1:{server.server_port}/hook",
                                      "bogus://nothing"),
                              notify_on=("recovered", "finished"))
        events = EventLog(str(ck / "run" / "events.jsonl"), clock=_Clock(), run_id=RUN)
        with capture_logs() as logs:
            n = notify.attach(config, events, run_id=RUN, settings=load(Settings, {}))
            assert n is not None
            events.emit("supervisor.progress_resumed", attempt=1, step=21, resume_step=20,
                        step_time=80.0)
            events.emit("supervisor.attempt_failed", attempt=1, exit_code=1, root_cause="x")
            events.emit("supervisor.finished", attempt=1, step=30)
            n.close()
        events.close()
        assert [e["event"] for e in logs if e["event"].startswith("notify.")].count(
            "notify.sent") == 2
        assert any(e["event"] == "notify.url_invalid" and e["target"] == "bogus://***"
                   for e in logs)
        titles = [g["title"] for g in Receiver.got]
        assert titles == [f"{RUN} node 0: recovered: resumed from step 20, 30.0s lost, "
                          "0 steps replayed", f"{RUN} node 0: finished at step 30"]
        assert [g["type"] for g in Receiver.got] == ["success", "success"]
    finally:
        server.shutdown()
        server.server_close()


class _Clock:
    def time(self) -> float:
        return 1000.0

    def monotonic(self) -> float:
        return time.monotonic()

    def sleep(self, seconds: float) -> None:
        time.sleep(seconds)


def test_attach_without_urls_is_none(tmp_path: Path) -> None:
    config = LaunchConfig(checkpoint_dir=str(tmp_path), script="t.py")
    events = EventLog(str(tmp_path / "run" / "events.jsonl"), clock=_Clock(), run_id=RUN)
    assert notify.attach(config, events, run_id=RUN, settings=load(Settings, {})) is None
    events.close()
    structlog.reset_defaults()


def test_a_hung_url_does_not_delay_another() -> None:
    gate = threading.Event()
    stuck, healthy = FakeTarget(gate=gate), FakeTarget()
    n = Notifier([Destination(target=stuck, name="json://a"), Destination(target=healthy,
                                                                          name="json://b")],
                 builder(), close_timeout_s=0.5)
    n.on_event(finished(1))
    deadline = time.monotonic() + 5
    while not healthy.calls and time.monotonic() < deadline:
        time.sleep(0.01)
    assert len(healthy.calls) == 1 and stuck.calls == []
    n.close()
    gate.set()
