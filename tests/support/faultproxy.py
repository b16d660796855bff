"""A small TCP fault-injection proxy for tests (loopback only).

``FaultProxy`` listens on 127.0.0.1:<free port> and forwards every connection to a target on
loopback. The test switches its mode at any time:

``pass``       forward bytes both ways (the default).
``refuse``     the listening socket is closed: new connections get ECONNREFUSED at once.
               Connections already open keep working; add ``reset_all()`` to kill them too.
               Going back to another mode re-opens the listener on the same port.
``reset``      abort connections with a TCP RST (SO_LINGER 0). ``reset(after_bytes=N)`` lets
               N more bytes through (counted over all connections, in ``direction`` "up" =
               client->target, "down" or "any") and then aborts the connection that crosses
               the budget, i.e. a reset mid-upload. Once the budget is spent, new connections
               are reset as soon as they are accepted and open ones on their next byte.
               ``once=True`` switches back to ``pass`` after the first reset.
``blackhole``  accept and read, but never forward nor answer: clients hit their timeouts.
               Applies to open connections too (their bytes are swallowed from then on); a
               connection accepted in blackhole mode never reaches the target at all.

``reset_all()`` aborts (RST) every open connection and returns once they are gone.
Counters: ``connections`` (accepted), ``active``, ``bytes_up``, ``bytes_down``, ``resets``;
``stats()`` returns them as a dict.

All threads are daemons and are joined by ``close()`` (also via the context manager).
Each connection is served by one thread running a select() loop with a short tick, which
checks the proxy's mode and abort requests; sockets are only ever closed by their own thread.
"""

from __future__ import annotations

import contextlib
import ipaddress
import select
import socket
import struct
import threading
import time
from typing import Any

from contract import polling

MODES = ("pass", "refuse", "reset", "blackhole")
_TICK = 0.05
_CHUNK = 65536
LISTEN_HOST = "127.0.0.1"


def _require_loopback(host: str) -> str:
    addr = socket.gethostbyname(host)
    if not ipaddress.ip_address(addr).is_loopback:
        raise ValueError(f"FaultProxy only forwards to loopback, not {host!r} ({addr})")
    return addr


def _abort(sock: socket.socket | None) -> None:
    """Close with RST instead of FIN."""
    if sock is None:
        return
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    with contextlib.suppress(OSError):
        sock.close()


class _Conn:
    __slots__ = ("abort_requested", "blackholed", "client", "id", "thread", "upstream")

    def __init__(self, cid: int, client: socket.socket) -> None:
        self.id = cid
        self.client = client
        self.upstream: socket.socket | None = None
        self.abort_requested = False
        self.blackholed = False
        self.thread: threading.Thread | None = None


class _Aborted(Exception):
    pass


class FaultProxy:
    def __init__(
        self,
        target_host: str,
        target_port: int,
        *,
        mode: str = "pass",
        listen_port: int = 0,
        connect_timeout: float = 5.0,
    ) -> None:
        self.target_host = _require_loopback(target_host)
        self.target_port = int(target_port)
        self.connect_timeout = connect_timeout
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}; expected one of {MODES}")
        self._lock = threading.RLock()
        self._mode = mode
        self._reset_budget = 0
        self._reset_direction = "up"
        self._reset_once = False
        self._stop = threading.Event()
        self._conns: dict[int, _Conn] = {}
        self._threads: list[threading.Thread] = []  # every handler thread, joined by close()
        self._next_id = 0
        self._listener_error: BaseException | None = None
        # counters
        self.connections = 0
        self.bytes_up = 0
        self.bytes_down = 0
        self.resets = 0
        self.upstream_failures = 0

        self._listener: socket.socket | None = self._bind(listen_port)
        self.port: int = self._listener.getsockname()[1]
        self._listening = True
        if mode == "refuse":
            self._listener.close()
            self._listener = None
            self._listening = False
        self._accept_thread = threading.Thread(
            target=self._accept_loop, name=f"faultproxy-{self.port}-accept", daemon=True
        )
        self._accept_thread.start()

    # ------------------------------------------------------------------ public API
    @property
    def address(self) -> tuple[str, int]:
        return (LISTEN_HOST, self.port)

    @property
    def endpoint_url(self) -> str:
        return f"http://{LISTEN_HOST}:{self.port}"

    @property
    def mode(self) -> str:
        return self._mode

    @property
    def active(self) -> int:
        with self._lock:
            return len(self._conns)

    def stats(self) -> dict[str, Any]:
        with self._lock:
            return {
                "mode": self._mode,
                "connections": self.connections,
                "active": len(self._conns),
                "bytes_up": self.bytes_up,
                "bytes_down": self.bytes_down,
                "resets": self.resets,
                "upstream_failures": self.upstream_failures,
            }

    def set_mode(
        self, mode: str, *, after_bytes: int = 0, direction: str = "up", once: bool = False
    ) -> None:
        """Switch mode; returns once the listener state matches (refuse = closed)."""
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}; expected one of {MODES}")
        if direction not in ("up", "down", "any"):
            raise ValueError("direction must be 'up', 'down' or 'any'")
        if after_bytes < 0:
            raise ValueError("after_bytes must be >= 0")
        with self._lock:
            self._reset_budget = after_bytes
            self._reset_direction = direction
            self._reset_once = once
            self._mode = mode
        self._wait_listener(mode != "refuse")

    def passthrough(self) -> None:
        self.set_mode("pass")

    def refuse(self) -> None:
        self.set_mode("refuse")

    def reset(self, after_bytes: int = 0, *, direction: str = "up", once: bool = False) -> None:
        self.set_mode("reset", after_bytes=after_bytes, direction=direction, once=once)

    def blackhole(self) -> None:
        self.set_mode("blackhole")

    def reset_all(self, timeout: float = 5.0) -> int:
        """Abort every open connection with RST; returns how many were asked to abort."""
        with self._lock:
            conns = list(self._conns.values())
            for c in conns:
                c.abort_requested = True
        deadline = time.monotonic() + timeout
        for c in conns:
            if c.thread is not None:
                c.thread.join(max(0.0, deadline - time.monotonic()))
        return len(conns)

    def close(self, timeout: float = 5.0) -> None:
        if self._stop.is_set():
            return
        self._stop.set()
        self._accept_thread.join(timeout)
        self.reset_all(timeout)
        deadline = time.monotonic() + timeout
        with self._lock:
            threads = list(self._threads)
        for t in threads:
            t.join(max(0.0, deadline - time.monotonic()))
        with self._lock:
            self._threads = [t for t in self._threads if t.is_alive()]

    def __enter__(self) -> FaultProxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        target = f"{self.target_host}:{self.target_port}"
        return f"<FaultProxy {LISTEN_HOST}:{self.port} -> {target} {self.stats()}>"

    # ------------------------------------------------------------------ internals
    def _bind(self, port: int) -> socket.socket:
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((LISTEN_HOST, port))
            s.listen(128)
        except OSError:
            s.close()
            raise
        return s

    def _wait_listener(self, want_listening: bool, timeout: float = 5.0) -> None:
        def applied() -> bool:
            if self._listener_error is not None:
                err, self._listener_error = self._listener_error, None
                raise RuntimeError(f"FaultProxy could not re-open port {self.port}: {err}")
            return self._listening == want_listening or self._stop.is_set()

        try:
            polling.wait_until(applied, timeout=timeout, what="the mode change", interval=0.005)
        except polling.PollTimeout:
            raise RuntimeError("FaultProxy accept thread did not apply the mode change") from None

    def _accept_loop(self) -> None:
        try:
            while not self._stop.is_set():
                want = self._mode != "refuse"
                if want and self._listener is None:
                    try:
                        self._listener = self._bind(self.port)
                        self._listening = True
                    except OSError as e:
                        self._listener_error = e
                        time.sleep(_TICK)
                        continue
                elif not want and self._listener is not None:
                    self._listener.close()
                    self._listener = None
                    self._listening = False
                if self._listener is None:
                    time.sleep(_TICK / 5)
                    continue
                r, _, _ = select.select([self._listener], [], [], _TICK)
                if not r:
                    continue
                try:
                    client, _addr = self._listener.accept()
                except OSError:
                    continue
                self._start_conn(client)
        finally:
            if self._listener is not None:
                self._listener.close()
                self._listener = None
            self._listening = False

    def _start_conn(self, client: socket.socket) -> None:
        with self._lock:
            self._next_id += 1
            conn = _Conn(self._next_id, client)
            self.connections += 1
            self._conns[conn.id] = conn
            mode = self._mode
            budget = self._reset_budget
        if mode == "reset" and budget <= 0:
            self._finish_reset(conn)
            return
        if mode == "blackhole":
            conn.blackholed = True
        t = threading.Thread(
            target=self._serve, args=(conn,), name=f"faultproxy-{self.port}-c{conn.id}", daemon=True
        )
        conn.thread = t
        with self._lock:
            self._threads = [x for x in self._threads if x.is_alive()]
            self._threads.append(t)
        t.start()

    def _finish_reset(self, conn: _Conn, *, injected: bool = True) -> None:
        # bookkeeping first: once the RST is out the test may already assert on counters
        with self._lock:
            if injected:
                self.resets += 1
            self._conns.pop(conn.id, None)
            if injected and self._reset_once and self._mode == "reset":
                self._mode = "pass"
                self._reset_once = False
        _abort(conn.client)
        _abort(conn.upstream)
        conn.upstream = None

    def _take_budget(self, n: int, direction: str) -> tuple[int, bool]:
        """In reset mode: how many of n bytes may pass and whether to abort afterwards."""
        with self._lock:
            if self._mode != "reset":
                return n, False
            if self._reset_direction not in ("any", direction):
                return n, False
            allowed = min(n, self._reset_budget)
            self._reset_budget -= allowed
            if allowed < n and self._reset_once:
                self._mode = "pass"
                self._reset_once = False
            return allowed, allowed < n

    def _serve(self, conn: _Conn) -> None:
        aborted = False
        injected = True
        try:
            if not conn.blackholed:
                try:
                    conn.upstream = socket.create_connection(
                        (self.target_host, self.target_port), timeout=self.connect_timeout
                    )
                except OSError:
                    with self._lock:
                        self.upstream_failures += 1
                    # the target is down: the client sees a reset, like a dead server
                    aborted, injected = True, False
                    return
                conn.upstream.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conn.client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._pump(conn)
        except _Aborted:
            aborted = True
        except OSError:  # a peer reset / broken pipe: pass the failure on as a reset
            aborted, injected = True, False
        finally:
            if aborted:
                self._finish_reset(conn, injected=injected)
            else:
                with self._lock:
                    self._conns.pop(conn.id, None)
                for s in (conn.client, conn.upstream):
                    if s is not None:
                        with contextlib.suppress(OSError):
                            s.close()

    def _check(self, conn: _Conn) -> None:
        if conn.abort_requested or self._stop.is_set():
            raise _Aborted

    def _send(self, conn: _Conn, sock: socket.socket, data: bytes) -> None:
        view = memoryview(data)
        while view:
            self._check(conn)
            _, w, _ = select.select([], [sock], [], _TICK)
            if w:
                n = sock.send(view)
                view = view[n:]

    def _pump(self, conn: _Conn) -> None:
        client, upstream = conn.client, conn.upstream
        client_eof = upstream_eof = False
        while True:
            self._check(conn)
            if client_eof and (upstream_eof or upstream is None):
                return
            rlist = []
            if not client_eof:
                rlist.append(client)
            if upstream is not None and not upstream_eof:
                rlist.append(upstream)
            r, _, _ = select.select(rlist, [], [], _TICK)
            for sock in r:
                data = sock.recv(_CHUNK)
                from_client = sock is client
                if not data:
                    if from_client:
                        client_eof = True
                        if upstream is not None and not conn.blackholed:
                            with contextlib.suppress(OSError):
                                upstream.shutdown(socket.SHUT_WR)
                    else:
                        upstream_eof = True
                        with contextlib.suppress(OSError):
                            client.shutdown(socket.SHUT_WR)
                    continue
                if conn.blackholed or self._mode == "blackhole":
                    conn.blackholed = True
                    continue  # swallow
                direction = "up" if from_client else "down"
                allowed, abort = self._take_budget(len(data), direction)
                if allowed:
                    dst = upstream if from_client else client
                    assert dst is not None
                    with self._lock:  # counted before sending, so tests never see it lag
                        if from_client:
                            self.bytes_up += allowed
                        else:
                            self.bytes_down += allowed
                    self._send(conn, dst, data[:allowed])
                if abort:
                    raise _Aborted
