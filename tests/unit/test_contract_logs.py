"""Structured logging: bound context in every JSON event, secrets redacted."""

from __future__ import annotations

import collections
import json
from collections.abc import Iterator
from typing import Any

import pytest
import structlog

from contract.logs import configure_logging, redact


@pytest.fixture(autouse=True)
def _reset_structlog() -> Iterator[None]:
    yield
    structlog.contextvars.clear_contextvars()
    structlog.reset_defaults()


def events(err: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in err.splitlines() if line.strip()]


def test_json_events_carry_bound_context(capfd: pytest.CaptureFixture[str]) -> None:
    configure_logging(fmt="json", run_id="run-7", node_rank=1, rank=3, attempt=2)
    log = structlog.get_logger("t")
    log.info("hello", step=5)
    log.debug("hidden")  # below the default INFO level
    out, err = capfd.readouterr()
    assert out == ""
    [ev] = events(err)
    assert ev["event"] == "hello" and ev["step"] == 5 and ev["level"] == "info"
    assert (ev["run_id"], ev["node_rank"], ev["rank"], ev["attempt"]) == ("run-7", 1, 3, 2)
    assert "timestamp" in ev


def test_reconfigure_rebinds_without_stacking(capfd: pytest.CaptureFixture[str]) -> None:
    configure_logging(fmt="json", run_id="r", rank=0, attempt=0, stale="x")
    configure_logging(fmt="json", run_id="r", rank=0, attempt=1)
    structlog.get_logger().warning("again")
    [ev] = events(capfd.readouterr().err)  # one line: the JSON renderer did not stack
    assert ev["attempt"] == 1 and "stale" not in ev


SECRET_FIELDS = {
    "secret_key": "hunter2-a",
    "password": "hunter2-b",
    "aws_secret_access_key": "hunter2-c",
    "db_PASSWD": "hunter2-d",
    "auth_token": "hunter2-e",
    "Authorization": "Bearer hunter2-f",
    "access_key": "hunter2-g",
    "credentials": {"user": "hunter2-h"},
}


def test_secret_keys_redacted(capfd: pytest.CaptureFixture[str]) -> None:
    configure_logging(fmt="json", run_id="r", rank=0, attempt=0, api_token="hunter2-bound")
    structlog.get_logger().info("connect", user="alice", **SECRET_FIELDS)
    err = capfd.readouterr().err
    assert "hunter2" not in err
    [ev] = events(err)
    for key in SECRET_FIELDS:
        assert ev[key] == "***"
    assert ev["api_token"] == "***"
    assert ev["user"] == "alice"  # ordinary fields untouched


@pytest.mark.parametrize(
    ("raw", "clean"),
    [
        ("s3://AKIA:secret@host/b", "s3://***@host/b"),
        ("mirror s3://AKIA:secret@host/bucket/prefix ok", "mirror s3://***@host/bucket/prefix ok"),
        ("https://user:p@ss@example.com/x", "https://***@example.com/x"),
        ("http://u:pw@a/ and ftp://v:pw2@b/", "http://***@a/ and ftp://***@b/"),
        ("s3://bucket/key", "s3://bucket/key"),
        ("user@example.com", "user@example.com"),
        ("no urls here", "no urls here"),
    ],
)
def test_redact_url_userinfo(raw: str, clean: str) -> None:
    assert redact(raw) == clean


def test_url_userinfo_redacted_in_events(capfd: pytest.CaptureFixture[str]) -> None:
    configure_logging(fmt="json", run_id="r", rank=0, attempt=0)
    log = structlog.get_logger()
    log.info("mirror s3://AKIA:secret@host/b", mirror="s3://AKIA:secret@host/b")
    log.info("nested", config={"mirror": "s3://AKIA:secret@host/b", "db": {"password": "pw9"}},
             urls=["s3://AKIA:secret@host/c"])
    try:
        raise ConnectionError("cannot reach s3://AKIA:secret@host/b")
    except ConnectionError:
        log.exception("upload failed")
    err = capfd.readouterr().err
    assert "AKIA" not in err and "secret@" not in err and "pw9" not in err
    first, nested, failed = events(err)
    assert first["mirror"] == "s3://***@host/b"
    assert first["event"] == "mirror s3://***@host/b"
    assert nested["config"]["mirror"] == "s3://***@host/b"
    assert nested["config"]["db"]["password"] == "***"
    assert nested["urls"] == ["s3://***@host/c"]
    assert "ConnectionError" in failed["exception"]
    assert "s3://***@host/b" in failed["exception"]


def test_odd_values_do_not_break_logging(capfd: pytest.CaptureFixture[str]) -> None:
    configure_logging(fmt="json", run_id="r", rank=0, attempt=0)
    point = collections.namedtuple("point", "x y")(1, "s3://a:b@h/")
    deep: Any = "s3://a:b@h/"
    for _ in range(50):
        deep = [deep]
    structlog.get_logger().info("odd", point=point, deep=deep, n=None, f=1.5, b=b"x")
    [ev] = events(capfd.readouterr().err)
    assert ev["point"] == [1, "s3://***@h/"]
    assert ev["n"] is None and ev["f"] == 1.5


def test_console_format(capfd: pytest.CaptureFixture[str]) -> None:
    configure_logging(fmt="console", run_id="run-c", rank=0, attempt=0)
    structlog.get_logger().info("readable", password="hunter2")
    err = capfd.readouterr().err
    assert "readable" in err and "run-c" in err and "hunter2" not in err
    with pytest.raises(json.JSONDecodeError):
        json.loads(err.splitlines()[0])


def test_bad_format_rejected() -> None:
    with pytest.raises(ValueError, match="json"):
        configure_logging(fmt="xml")
