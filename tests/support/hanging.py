"""A TCP endpoint on loopback that accepts connections and never answers: what a hung alert
receiver or metrics scraper looks like to a client (its timeouts must bound the wait)."""

from __future__ import annotations

import socket
import threading
import time


class Hanging:
    """Accepts connections on 127.0.0.1 (``port``) and never answers; ``accepted`` holds when."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self.accepted: list[float] = []
        self.conns: list[socket.socket] = []
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.accepted.append(time.time())
            self.conns.append(conn)

    def close(self) -> None:
        self.sock.close()
        for c in self.conns:
            c.close()
