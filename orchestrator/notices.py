"""Cloud preemption notices: pollers of the instance metadata services, off by default.

A spot/preemptible VM is told shortly before it is taken away (EC2: two minutes, GCE: about
thirty seconds). The supervisor polls these sources from its loop and treats a notice like
SIGTERM: ask the workers for an emergency snapshot, then stop. This module only answers "is
there a notice?"; it never signals anything itself.

* :class:`PreemptionNotice` is the protocol: ``check()`` returns a reason string when a notice
  is present, else None. It never raises on network or protocol errors (it logs a structured
  ``notice.*`` event and returns None) and never blocks much longer than its timeout.
* :class:`AwsSpotNotice`: EC2 IMDSv2 (session token, then ``spot/instance-action``).
* :class:`GceNotice`: GCE ``instance/preempted``.
* :class:`NoticePoller` rate-limits the checks of several sources against an injected clock
  (``poll(now)``) and reports the first notice once.
* :func:`notices_from_settings` / :func:`poller_from_settings` build them from
  :class:`~orchestrator.settings.Settings` (``ORCH_NOTICE_SOURCES``, empty = off).

Only the standard library (``http.client``) is used, so no proxy settings apply: metadata
services are link-local and must never be reached through an HTTP proxy.
"""

from __future__ import annotations

import http.client
import json
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Protocol, runtime_checkable
from urllib.parse import urlsplit

import structlog

from orchestrator.settings import Settings, notice_source_names

log = structlog.get_logger("orchestrator.notices")

AWS_TOKEN_PATH = "/latest/api/token"
AWS_ACTION_PATH = "/latest/meta-data/spot/instance-action"
AWS_TOKEN_TTL_HEADER = "X-aws-ec2-metadata-token-ttl-seconds"
AWS_TOKEN_HEADER = "X-aws-ec2-metadata-token"
AWS_ACTIONS = ("terminate", "stop", "hibernate")
GCE_PREEMPTED_PATH = "/computeMetadata/v1/instance/preempted"
GCE_FLAVOR_HEADER = "Metadata-Flavor"

#: Bodies larger than this are not metadata answers; read no more.
_MAX_BODY = 64 * 1024


class NoticeError(Exception):
    """A metadata request failed (network, timeout, HTTP protocol); never escapes ``check``."""


@runtime_checkable
class PreemptionNotice(Protocol):
    """One source of preemption notices."""

    #: Short source name (``aws``, ``gce``) used in logs and reasons.
    name: str

    def check(self) -> str | None:
        """A reason when a notice is present, else None; never raises, bounded by a timeout."""
        ...


def _request(
    base_url: str,
    method: str,
    path: str,
    headers: Mapping[str, str],
    timeout_s: float,
) -> tuple[int, bytes]:
    """(status, body) of one HTTP request; NoticeError on any network or protocol failure.

    The whole exchange is bounded by ``timeout_s``: the socket timeout is re-armed with the
    remaining budget before the body is read.
    """
    parts = urlsplit(base_url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise NoticeError(f"bad metadata URL {base_url!r}")
    deadline = time.monotonic() + timeout_s
    cls = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
    conn = cls(parts.hostname, parts.port, timeout=timeout_s)
    full_path = parts.path.rstrip("/") + path
    try:
        conn.request(method, full_path, headers=dict(headers))
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError(f"timed out after {timeout_s}s")
        if conn.sock is not None:
            conn.sock.settimeout(remaining)
        resp = conn.getresponse()
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError(f"timed out after {timeout_s}s")
        if conn.sock is not None:
            conn.sock.settimeout(remaining)
        body = resp.read(_MAX_BODY)
        return resp.status, body
    except (OSError, http.client.HTTPException, ValueError) as exc:
        text = str(exc) or type(exc).__name__
        raise NoticeError(f"{method} {full_path}: {type(exc).__name__}: {text}") from exc
    finally:
        conn.close()


class _Source:
    """Shared error bookkeeping: one warning per new error, one info on recovery."""

    name = "?"

    def __init__(self, base_url: str, timeout_s: float) -> None:
        if not timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        self.base_url = base_url
        self.timeout_s = timeout_s
        self._last_error: str | None = None

    def _failed(self, event: str, error: str) -> None:
        if error != self._last_error:
            log.warning(event, source=self.name, url=self.base_url, error=error)
        else:
            log.debug(event, source=self.name, url=self.base_url, error=error)
        self._last_error = error

    def _ok(self) -> None:
        if self._last_error is not None:
            log.info("notice.recovered", source=self.name, url=self.base_url)
            self._last_error = None


class AwsSpotNotice(_Source):
    """EC2 spot interruption notice through IMDSv2.

    A session token is obtained with ``PUT /latest/api/token`` and cached; it is renewed shortly
    before it expires (``clock`` is monotonic seconds) and whenever the service answers 401.
    ``GET /latest/meta-data/spot/instance-action``: 404 means no notice, 200 carries
    ``{"action": "terminate"|"stop"|"hibernate", "time": "..."}``.
    """

    name = "aws"

    def __init__(
        self,
        base_url: str = "http://169.254.169.254",
        *,
        timeout_s: float = 1.0,
        token_ttl_s: int = 21600,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__(base_url, timeout_s)
        self.token_ttl_s = int(token_ttl_s)
        self._clock = clock
        self._token: str | None = None
        self._token_expires = 0.0
        #: Tokens obtained so far (observability and tests).
        self.tokens_fetched = 0

    def _refresh_margin(self) -> float:
        return min(60.0, self.token_ttl_s / 10.0)

    def _get_token(self, deadline: float) -> str:
        now = self._clock()
        if self._token is not None and now < self._token_expires - self._refresh_margin():
            return self._token
        status, body = _request(
            self.base_url,
            "PUT",
            AWS_TOKEN_PATH,
            {AWS_TOKEN_TTL_HEADER: str(self.token_ttl_s)},
            _remaining(deadline),
        )
        if status != 200:
            raise NoticeError(f"PUT {AWS_TOKEN_PATH}: HTTP {status}")
        token = body.decode("ascii", "replace").strip()
        if not token:
            raise NoticeError(f"PUT {AWS_TOKEN_PATH}: empty token")
        self._token = token
        self._token_expires = now + self.token_ttl_s
        self.tokens_fetched += 1
        return token

    def check(self) -> str | None:
        deadline = time.monotonic() + self.timeout_s
        try:
            status, body = 0, b""
            for _ in range(2):  # a second time only after a 401 with a fresh token
                token = self._get_token(deadline)
                status, body = _request(
                    self.base_url,
                    "GET",
                    AWS_ACTION_PATH,
                    {AWS_TOKEN_HEADER: token},
                    _remaining(deadline),
                )
                if status != 401:
                    break
                self._token = None
        except NoticeError as exc:
            self._failed("notice.unreachable", str(exc))
            return None
        if status == 404:
            self._ok()
            return None
        if status != 200:
            self._failed("notice.unexpected_status", f"GET {AWS_ACTION_PATH}: HTTP {status}")
            return None
        try:
            doc = json.loads(body)
            action = doc["action"]
            when = doc.get("time")
            if action not in AWS_ACTIONS:
                raise ValueError(f"unknown action {action!r}")
        except (ValueError, TypeError, KeyError, AttributeError) as exc:
            snippet = body[:200].decode("utf-8", "replace")
            self._failed("notice.malformed", f"{type(exc).__name__}: {exc}; body={snippet!r}")
            return None
        self._ok()
        reason = f"aws spot instance-action: {action} at {when}"
        log.warning("notice.preemption", source=self.name, action=action, time=when)
        return reason


class GceNotice(_Source):
    """GCE preemption: ``GET .../instance/preempted`` with ``Metadata-Flavor: Google``.

    The body is ``TRUE`` once the VM is being preempted, ``FALSE`` before.
    """

    name = "gce"

    def __init__(
        self, base_url: str = "http://metadata.google.internal", *, timeout_s: float = 1.0
    ) -> None:
        super().__init__(base_url, timeout_s)

    def check(self) -> str | None:
        try:
            status, body = _request(
                self.base_url,
                "GET",
                GCE_PREEMPTED_PATH,
                {GCE_FLAVOR_HEADER: "Google"},
                self.timeout_s,
            )
        except NoticeError as exc:
            self._failed("notice.unreachable", str(exc))
            return None
        if status != 200:
            self._failed("notice.unexpected_status", f"GET {GCE_PREEMPTED_PATH}: HTTP {status}")
            return None
        value = body.decode("utf-8", "replace").strip().upper()
        if value == "FALSE":
            self._ok()
            return None
        if value != "TRUE":
            self._failed("notice.malformed", f"body={body[:200]!r}")
            return None
        self._ok()
        log.warning("notice.preemption", source=self.name)
        return "gce instance preempted"


def _remaining(deadline: float) -> float:
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        raise NoticeError("notice check timed out")
    return remaining


class NoticePoller:
    """Checks its sources at most every ``interval_s`` (by the ``now`` it is given).

    ``poll(now)`` returns the reason the first time a source reports a notice and None
    otherwise (between checks, and after the notice was reported: it is edge-triggered, so the
    supervisor starts one emergency snapshot, not one per loop turn). The reason stays in
    :attr:`reason`; no source is queried after it. With no sources it never does anything.
    """

    def __init__(self, notices: Sequence[PreemptionNotice], interval_s: float) -> None:
        if not interval_s > 0:
            raise ValueError(f"interval_s must be > 0, got {interval_s}")
        self.notices = list(notices)
        self.interval_s = interval_s
        self.reason: str | None = None
        self._last_check: float | None = None

    @property
    def enabled(self) -> bool:
        return bool(self.notices)

    def poll(self, now: float) -> str | None:
        if not self.notices or self.reason is not None:
            return None
        if self._last_check is not None and now - self._last_check < self.interval_s:
            return None
        self._last_check = now
        for notice in self.notices:
            try:
                reason = notice.check()
            except Exception as exc:  # a source must never take the supervisor down
                log.warning(
                    "notice.check_failed",
                    source=getattr(notice, "name", "?"),
                    error=f"{type(exc).__name__}: {exc}",
                )
                continue
            if reason:
                self.reason = reason
                return reason
        return None


def notices_from_settings(settings: Settings) -> list[PreemptionNotice]:
    """The sources named by ``ORCH_NOTICE_SOURCES`` (empty list when off)."""
    out: list[PreemptionNotice] = []
    for name in notice_source_names(settings.notice_sources):
        if name == "aws":
            out.append(
                AwsSpotNotice(
                    settings.aws_metadata_url,
                    timeout_s=settings.notice_timeout_s,
                    token_ttl_s=settings.aws_token_ttl_s,
                )
            )
        elif name == "gce":
            out.append(GceNotice(settings.gce_metadata_url, timeout_s=settings.notice_timeout_s))
        else:  # Settings validates the names; keep the two lists in step
            raise ValueError(f"unknown notice source {name!r}")
    return out


def poller_from_settings(settings: Settings) -> NoticePoller:
    """A :class:`NoticePoller` over :func:`notices_from_settings` (disabled when none)."""
    return NoticePoller(notices_from_settings(settings), settings.notice_interval_s)
