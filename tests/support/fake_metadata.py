"""A fake cloud metadata server on 127.0.0.1 for preemption-notice tests.

It implements the IMDSv2 token flow (a GET without a valid token is answered 401, as on EC2
with IMDSv2 required) and the GCE endpoint (a request without ``Metadata-Flavor: Google`` is
answered 403), and is scripted per test: no notice, then a notice.
"""

from __future__ import annotations

import itertools
import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


class FakeMetadata(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.lock = threading.Lock()
        self.requests: list[tuple[str, str, dict[str, str]]] = []
        self.tokens: set[str] = set()
        self._counter = itertools.count(1)
        #: None -> 404; a dict -> 200 JSON; bytes -> 200 with that raw body.
        self.aws_action: Any = None
        self.gce_value = "FALSE"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def new_token(self) -> str:
        token = f"tok-{next(self._counter)}"
        self.tokens.add(token)
        return token

    def revoke_tokens(self) -> None:
        with self.lock:
            self.tokens.clear()

    def count(self, method: str, path: str) -> int:
        with self.lock:
            return sum(1 for m, p, _ in self.requests if (m, p) == (method, path))


class _Handler(BaseHTTPRequestHandler):
    server: FakeMetadata

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _send(self, status: int, body: bytes = b"") -> None:
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _record(self) -> None:
        with self.server.lock:
            self.server.requests.append((self.command, self.path, dict(self.headers.items())))

    def do_PUT(self) -> None:
        self._record()
        if self.path != "/latest/api/token":
            return self._send(404)
        ttl = self.headers.get("X-aws-ec2-metadata-token-ttl-seconds")
        if ttl is None or not ttl.isdigit() or not 1 <= int(ttl) <= 21600:
            return self._send(400, b"missing or invalid ttl")
        with self.server.lock:
            token = self.server.new_token()
        self._send(200, token.encode())

    def do_GET(self) -> None:
        self._record()
        if self.path == "/latest/meta-data/spot/instance-action":
            with self.server.lock:
                ok = self.headers.get("X-aws-ec2-metadata-token") in self.server.tokens
                action = self.server.aws_action
            if not ok:
                return self._send(401)
            if action is None:
                return self._send(404, b"Not Found")
            body = action if isinstance(action, bytes) else json.dumps(action).encode()
            return self._send(200, body)
        if self.path == "/computeMetadata/v1/instance/preempted":
            if self.headers.get("Metadata-Flavor") != "Google":
                return self._send(403, b"Missing Metadata-Flavor:Google header.")
            return self._send(200, self.server.gce_value.encode())
        self._send(404)


@contextmanager
def running_fake_metadata() -> Iterator[FakeMetadata]:
    """A :class:`FakeMetadata` serving on a background thread for the block's duration."""
    server = FakeMetadata()
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)
