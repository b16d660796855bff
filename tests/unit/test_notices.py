"""Cloud preemption notices against a fake metadata server on 127.0.0.1.

The fake implements the IMDSv2 token flow (a GET without a valid token is answered 401, as on
EC2 with IMDSv2 required) and the GCE endpoint (a request without ``Metadata-Flavor: Google``
is answered 403), and is scripted per test: no notice, then a notice.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator

import pytest

from orchestrator.notices import (
    AwsSpotNotice,
    GceNotice,
    NoticePoller,
    PreemptionNotice,
    notices_from_settings,
    poller_from_settings,
)
from orchestrator.settings import load_settings
from tests.support.clock import FakeClock
from tests.support.fake_metadata import FakeMetadata, running_fake_metadata


@pytest.fixture
def fake() -> Iterator[FakeMetadata]:
    with running_fake_metadata() as server:
        yield server


@pytest.fixture
def blackhole() -> Iterator[str]:
    """A listening socket that never answers: connects succeed, reads hang."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    accepted: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        sock.settimeout(0.05)
        while not stop.is_set():
            try:
                conn, _ = sock.accept()
            except OSError:
                continue
            accepted.append(conn)  # held open, never read nor written

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        stop.set()
        thread.join(2)
        for conn in accepted:
            conn.close()
        sock.close()


def _dead_url() -> str:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()  # nothing listens there any more: connection refused
    return f"http://127.0.0.1:{port}"


# ------------------------------------------------------------------------------- AWS


@pytest.mark.timeout(20)
def test_aws_no_notice_then_notice(fake: FakeMetadata) -> None:
    notice = AwsSpotNotice(fake.url, timeout_s=2.0)
    assert isinstance(notice, PreemptionNotice)
    assert notice.check() is None
    fake.aws_action = {"action": "terminate", "time": "2030-01-01T00:02:00Z"}
    reason = notice.check()
    assert reason is not None
    assert "terminate" in reason and "2030-01-01T00:02:00Z" in reason
    fake.aws_action = {"action": "hibernate", "time": "2030-01-01T00:05:00Z"}
    reason = notice.check()
    assert reason is not None and "hibernate" in reason


@pytest.mark.timeout(20)
def test_aws_sends_token_and_ttl_headers(fake: FakeMetadata) -> None:
    notice = AwsSpotNotice(fake.url, timeout_s=2.0, token_ttl_s=300)
    assert notice.check() is None
    put = [h for m, _, h in fake.requests if m == "PUT"]
    gets = [h for m, _, h in fake.requests if m == "GET"]
    assert put and put[0]["X-aws-ec2-metadata-token-ttl-seconds"] == "300"
    assert gets and gets[0]["X-aws-ec2-metadata-token"] == "tok-1"


@pytest.mark.timeout(20)
def test_aws_get_without_token_is_rejected_by_the_fake(fake: FakeMetadata) -> None:
    import urllib.error
    import urllib.request

    url = fake.url + "/latest/meta-data/spot/instance-action"
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(url, timeout=2)
    assert info.value.code == 401


@pytest.mark.timeout(20)
def test_aws_token_reused_then_refreshed_before_expiry(fake: FakeMetadata) -> None:
    clock = FakeClock(start=1000.0)
    notice = AwsSpotNotice(fake.url, timeout_s=2.0, token_ttl_s=600, clock=clock.monotonic)
    for _ in range(3):
        assert notice.check() is None
        clock.advance(100)
    assert fake.count("PUT", "/latest/api/token") == 1
    assert notice.tokens_fetched == 1
    assert fake.count("GET", "/latest/meta-data/spot/instance-action") == 3
    clock.advance(300 - 30)  # 570 s after the token: inside the 60 s refresh margin
    assert notice.check() is None
    assert fake.count("PUT", "/latest/api/token") == 2
    last_get = [h for m, _, h in fake.requests if m == "GET"][-1]
    assert last_get["X-aws-ec2-metadata-token"] == "tok-2"


@pytest.mark.timeout(20)
def test_aws_token_refreshed_on_401(fake: FakeMetadata) -> None:
    notice = AwsSpotNotice(fake.url, timeout_s=2.0)
    assert notice.check() is None
    fake.revoke_tokens()  # e.g. the instance was stopped and started
    fake.aws_action = {"action": "stop", "time": "2030-01-01T00:00:00Z"}
    reason = notice.check()
    assert reason is not None and "stop" in reason
    assert notice.tokens_fetched == 2
    statuses = [(m, h.get("X-aws-ec2-metadata-token")) for m, _, h in fake.requests]
    assert statuses == [("PUT", None), ("GET", "tok-1"), ("GET", "tok-1"), ("PUT", None),
                        ("GET", "tok-2")]


@pytest.mark.timeout(20)
@pytest.mark.parametrize(
    "body",
    [b"not json", b"[1, 2]", b'{"time": "x"}', b'{"action": "explode", "time": "x"}'],
)
def test_aws_malformed_response_is_logged_not_a_notice(
    fake: FakeMetadata, body: bytes, capsys: pytest.CaptureFixture[str]
) -> None:
    notice = AwsSpotNotice(fake.url, timeout_s=2.0)
    fake.aws_action = body
    assert notice.check() is None
    assert "notice.malformed" in capsys.readouterr().out


@pytest.mark.timeout(20)
def test_aws_unreachable_returns_none(capsys: pytest.CaptureFixture[str]) -> None:
    notice = AwsSpotNotice(_dead_url(), timeout_s=1.0)
    started = time.monotonic()
    assert notice.check() is None
    assert notice.check() is None
    assert time.monotonic() - started < 2.0
    out = capsys.readouterr().out
    assert out.count("notice.unreachable") >= 1


@pytest.mark.timeout(20)
def test_aws_blackholed_returns_none_within_timeout(blackhole: str) -> None:
    notice = AwsSpotNotice(blackhole, timeout_s=0.5)
    started = time.monotonic()
    assert notice.check() is None
    elapsed = time.monotonic() - started
    assert elapsed < 1.5, elapsed  # one budget for token + GET, not one per request


@pytest.mark.timeout(20)
def test_bad_url_returns_none() -> None:
    assert AwsSpotNotice("ftp://nowhere", timeout_s=0.5).check() is None
    assert GceNotice("not a url", timeout_s=0.5).check() is None


# ------------------------------------------------------------------------------- GCE


@pytest.mark.timeout(20)
def test_gce_no_notice_then_notice(fake: FakeMetadata) -> None:
    notice = GceNotice(fake.url, timeout_s=2.0)
    assert isinstance(notice, PreemptionNotice)
    assert notice.check() is None
    fake.gce_value = "TRUE"
    reason = notice.check()
    assert reason is not None and "preempted" in reason
    sent = [h for m, p, h in fake.requests if p.endswith("/instance/preempted")]
    assert all(h.get("Metadata-Flavor") == "Google" for h in sent) and len(sent) == 2


@pytest.mark.timeout(20)
def test_gce_fake_rejects_missing_flavor_header(fake: FakeMetadata) -> None:
    import urllib.error
    import urllib.request

    fake.gce_value = "TRUE"
    url = fake.url + "/computeMetadata/v1/instance/preempted"
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(url, timeout=2)
    assert info.value.code == 403


@pytest.mark.timeout(20)
def test_gce_malformed_and_error_status(
    fake: FakeMetadata, capsys: pytest.CaptureFixture[str]
) -> None:
    fake.gce_value = "maybe"
    assert GceNotice(fake.url, timeout_s=2.0).check() is None
    assert "notice.malformed" in capsys.readouterr().out
    assert GceNotice(fake.url + "/wrong-prefix", timeout_s=2.0).check() is None
    assert "notice.unexpected_status" in capsys.readouterr().out


@pytest.mark.timeout(20)
def test_gce_unreachable_and_blackholed(blackhole: str) -> None:
    assert GceNotice(_dead_url(), timeout_s=1.0).check() is None
    started = time.monotonic()
    assert GceNotice(blackhole, timeout_s=0.5).check() is None
    assert time.monotonic() - started < 1.5


# ---------------------------------------------------------------------------- poller


class Scripted:
    name = "scripted"

    def __init__(self, answers: list[str | None]) -> None:
        self.answers = answers
        self.calls = 0

    def check(self) -> str | None:
        self.calls += 1
        return self.answers.pop(0) if self.answers else None


@pytest.mark.timeout(10)
def test_poller_rate_limits_with_injected_clock() -> None:
    source = Scripted([None, None, "spot says bye"])
    poller = NoticePoller([source], interval_s=5.0)
    assert poller.poll(100.0) is None
    assert source.calls == 1
    assert poller.poll(101.0) is None
    assert poller.poll(104.9) is None
    assert source.calls == 1
    assert poller.poll(105.0) is None
    assert source.calls == 2
    assert poller.poll(109.0) is None
    assert source.calls == 2
    assert poller.poll(110.0) == "spot says bye"
    assert source.calls == 3
    # edge-triggered: reported once, kept in .reason, no more checks
    assert poller.poll(200.0) is None
    assert poller.reason == "spot says bye"
    assert source.calls == 3


@pytest.mark.timeout(10)
def test_poller_survives_a_raising_source_and_tries_the_next() -> None:
    class Broken:
        name = "broken"

        def check(self) -> str | None:
            raise RuntimeError("bug")

    poller = NoticePoller([Broken(), Scripted(["gce instance preempted"])], interval_s=1.0)
    assert poller.poll(0.0) == "gce instance preempted"


@pytest.mark.timeout(10)
def test_poller_without_sources_is_inert() -> None:
    poller = NoticePoller([], interval_s=1.0)
    assert not poller.enabled
    assert all(poller.poll(float(t)) is None for t in range(10))


@pytest.mark.timeout(20)
def test_poller_against_fake_server(fake: FakeMetadata) -> None:
    poller = NoticePoller([AwsSpotNotice(fake.url, timeout_s=2.0)], interval_s=5.0)
    assert poller.poll(0.0) is None
    fake.aws_action = {"action": "terminate", "time": "T"}
    assert poller.poll(1.0) is None  # not checked yet
    reason = poller.poll(5.0)
    assert reason is not None and "terminate" in reason


# -------------------------------------------------------------------------- settings


def test_off_by_default() -> None:
    settings = load_settings({})
    assert settings.notice_sources == ""
    assert notices_from_settings(settings) == []
    assert not poller_from_settings(settings).enabled


@pytest.mark.timeout(20)
def test_sources_from_environment(fake: FakeMetadata) -> None:
    settings = load_settings(
        {
            "ORCH_NOTICE_SOURCES": " AWS, gce ,aws",
            "ORCH_AWS_METADATA_URL": fake.url,
            "ORCH_GCE_METADATA_URL": fake.url,
            "ORCH_NOTICE_INTERVAL_S": "2.5",
            "ORCH_NOTICE_TIMEOUT_S": "0.75",
            "ORCH_AWS_TOKEN_TTL_S": "120",
        }
    )
    notices = notices_from_settings(settings)
    assert [n.name for n in notices] == ["aws", "gce"]
    aws, gce = notices
    assert isinstance(aws, AwsSpotNotice) and isinstance(gce, GceNotice)
    assert aws.timeout_s == gce.timeout_s == 0.75
    assert aws.token_ttl_s == 120
    poller = poller_from_settings(settings)
    assert poller.interval_s == 2.5
    fake.gce_value = "TRUE"
    assert poller.poll(0.0) == "gce instance preempted"


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"ORCH_NOTICE_SOURCES": "aws,azure"}, "ORCH_NOTICE_SOURCES"),
        ({"ORCH_NOTICE_INTERVAL_S": "0"}, "ORCH_NOTICE_INTERVAL_S"),
        ({"ORCH_NOTICE_TIMEOUT_S": "-1"}, "ORCH_NOTICE_TIMEOUT_S"),
        ({"ORCH_AWS_TOKEN_TTL_S": "99999"}, "ORCH_AWS_TOKEN_TTL_S"),
    ],
)
def test_bad_notice_settings(env: dict[str, str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        load_settings(env)
