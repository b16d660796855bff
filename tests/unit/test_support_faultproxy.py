"""FaultProxy modes against a tiny local echo server (loopback only)."""

from __future__ import annotations

import contextlib
import socket
import threading
import time

import pytest

from contract.polling import wait_until
from tests.support.faultproxy import FaultProxy


class EchoServer:
    """Threaded TCP echo server on 127.0.0.1:<free port>."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.sock.settimeout(0.1)
        self.port = self.sock.getsockname()[1]
        self.accepted = 0
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        t = threading.Thread(target=self._accept, daemon=True)
        t.start()
        self._threads.append(t)

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                c, _ = self.sock.accept()
            except (TimeoutError, OSError):
                continue
            self.accepted += 1
            t = threading.Thread(target=self._echo, args=(c,), daemon=True)
            t.start()
            self._threads.append(t)

    def _echo(self, c: socket.socket) -> None:
        c.settimeout(0.1)
        with c:
            while not self._stop.is_set():
                try:
                    data = c.recv(65536)
                except TimeoutError:
                    continue
                except OSError:
                    return
                if not data:
                    return
                with contextlib.suppress(OSError):
                    c.sendall(data)

    def close(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(5)
        self.sock.close()


@pytest.fixture
def echo():
    srv = EchoServer()
    yield srv
    srv.close()


@pytest.fixture
def proxy(echo, fault_proxy):
    return fault_proxy("127.0.0.1", echo.port)


def _connect(p: FaultProxy, timeout: float = 5.0) -> socket.socket:
    return socket.create_connection(("127.0.0.1", p.port), timeout=timeout)


def _recv_exact(s: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = s.recv(n - len(buf))
        if not chunk:
            break
        buf += chunk
    return buf


@pytest.mark.timeout(30)
def test_pass_forwards_and_counts(proxy, echo):
    assert proxy.endpoint_url == f"http://127.0.0.1:{proxy.port}"
    payload = bytes(range(256)) * 400  # 100 KiB
    with _connect(proxy) as s:
        s.sendall(payload)
        assert _recv_exact(s, len(payload)) == payload
    wait_until(lambda: proxy.active == 0, timeout=5.0, what="the connection to close", interval=0.01)
    st = proxy.stats()
    assert st["connections"] == 1
    assert st["bytes_up"] == len(payload)
    assert st["bytes_down"] == len(payload)
    assert st["resets"] == 0
    assert echo.accepted == 1


@pytest.mark.timeout(30)
def test_refuse_rejects_new_connections_then_recovers(proxy):
    with _connect(proxy) as keep:  # opened before: unaffected by refuse
        proxy.refuse()
        assert proxy.mode == "refuse"
        t0 = time.monotonic()
        with pytest.raises(ConnectionRefusedError):
            _connect(proxy)
        assert time.monotonic() - t0 < 1.0
        keep.sendall(b"still here")
        assert _recv_exact(keep, 10) == b"still here"
    proxy.passthrough()
    with _connect(proxy) as s:
        s.sendall(b"back")
        assert _recv_exact(s, 4) == b"back"


@pytest.mark.timeout(30)
def test_refuse_from_the_start(echo, fault_proxy):
    p = fault_proxy("127.0.0.1", echo.port, mode="refuse")
    with pytest.raises(ConnectionRefusedError):
        _connect(p)
    p.passthrough()
    with _connect(p) as s:
        s.sendall(b"ok")
        assert _recv_exact(s, 2) == b"ok"


@pytest.mark.timeout(30)
def test_reset_immediately(proxy):
    proxy.reset()
    # the RST can surface in connect() itself or on the first send/recv
    with pytest.raises((ConnectionResetError, BrokenPipeError)), _connect(proxy) as s:
        s.sendall(b"x" * 1000)
        s.recv(10)
    assert proxy.resets == 1


@pytest.mark.timeout(30)
def test_reset_after_n_bytes_mid_upload(proxy, echo):
    proxy.reset(after_bytes=10_000)
    received = b""
    with _connect(proxy) as s, pytest.raises(ConnectionResetError):
        for _ in range(100):  # 1 MB "upload"
            s.sendall(b"u" * 10_000 + b"")
            # echo is read back concurrently enough for the small budget
            s.settimeout(0.5)
            with contextlib.suppress(TimeoutError):
                received += s.recv(65536)
        s.settimeout(5)
        while True:  # drain until the RST surfaces
            chunk = s.recv(65536)
            if not chunk:
                break
            received += chunk
    assert proxy.bytes_up == 10_000  # exactly the budget reached the target
    assert len(received) <= 10_000
    assert proxy.resets == 1
    # the budget is spent: further connections are reset too
    with pytest.raises((ConnectionResetError, BrokenPipeError)), _connect(proxy) as s2:
        s2.sendall(b"again")
        s2.recv(10)
    assert proxy.resets == 2


@pytest.mark.timeout(30)
def test_reset_once_then_pass(proxy):
    proxy.reset(after_bytes=0, once=True)
    with pytest.raises((ConnectionResetError, BrokenPipeError)), _connect(proxy) as s:
        s.sendall(b"x")
        s.recv(10)
    assert proxy.mode == "pass"
    with _connect(proxy) as s:
        s.sendall(b"retry")
        assert _recv_exact(s, 5) == b"retry"
    assert proxy.resets == 1


@pytest.mark.timeout(30)
def test_reset_applies_to_open_connection(proxy):
    with _connect(proxy) as s:
        s.sendall(b"one")
        assert _recv_exact(s, 3) == b"one"
        proxy.reset(after_bytes=2)
        with pytest.raises((ConnectionResetError, BrokenPipeError)):
            s.sendall(b"three")
            s.recv(10)  # at most "th" echoes back, then the RST
            s.recv(10)


@pytest.mark.timeout(30)
def test_blackhole_swallows_and_clients_time_out(proxy, echo):
    proxy.blackhole()
    with _connect(proxy) as s:
        s.sendall(b"hello?")
        s.settimeout(0.5)
        t0 = time.monotonic()
        with pytest.raises(TimeoutError):
            s.recv(10)
        assert time.monotonic() - t0 >= 0.45
    assert echo.accepted == 0  # never reached the target
    assert proxy.bytes_up == 0 and proxy.bytes_down == 0
    proxy.passthrough()
    with _connect(proxy) as s:
        s.sendall(b"hi")
        assert _recv_exact(s, 2) == b"hi"


@pytest.mark.timeout(30)
def test_blackhole_applies_to_open_connection(proxy):
    with _connect(proxy) as s:
        s.sendall(b"a")
        assert _recv_exact(s, 1) == b"a"
        proxy.blackhole()
        s.sendall(b"b")
        s.settimeout(0.5)
        with pytest.raises(TimeoutError):
            s.recv(10)


@pytest.mark.timeout(30)
def test_reset_all_kills_existing_connections(proxy):
    socks = [_connect(proxy) for _ in range(3)]
    try:
        for s in socks:
            s.sendall(b"x")
            assert _recv_exact(s, 1) == b"x"
        assert proxy.active == 3
        assert proxy.reset_all() == 3
        assert proxy.active == 0
        for s in socks:
            with pytest.raises((ConnectionResetError, BrokenPipeError)):
                s.sendall(b"y")
                s.recv(10)
        assert proxy.resets == 3
        assert proxy.mode == "pass"  # reset_all does not change the mode
        with _connect(proxy) as s:
            s.sendall(b"z")
            assert _recv_exact(s, 1) == b"z"
    finally:
        for s in socks:
            s.close()


@pytest.mark.timeout(30)
def test_target_down_gives_reset_not_hang(fault_proxy):
    with socket.socket() as tmp:
        tmp.bind(("127.0.0.1", 0))
        dead_port = tmp.getsockname()[1]
    p = fault_proxy("127.0.0.1", dead_port)
    # the RST can surface in connect() itself or on the first send/recv
    with pytest.raises((ConnectionResetError, BrokenPipeError)), _connect(p) as s:
        s.sendall(b"x")
        s.recv(10)
    wait_until(lambda: p.stats()["upstream_failures"] == 1, timeout=5.0,
               what="one upstream failure", interval=0.01)


@pytest.mark.timeout(30)
def test_close_is_bounded_and_joins_threads(echo):
    before = {t.ident for t in threading.enumerate()}
    p = FaultProxy("127.0.0.1", echo.port)
    socks = [_connect(p) for _ in range(5)]
    p.blackhole()
    for s in socks:
        s.sendall(b"x")
    t0 = time.monotonic()
    p.close()
    assert time.monotonic() - t0 < 3
    leftover = [
        t
        for t in threading.enumerate()
        if t.ident not in before and t.name.startswith("faultproxy")
    ]
    assert leftover == []
    with pytest.raises(ConnectionRefusedError):
        _connect(p)
    for s in socks:
        s.close()
    p.close()  # idempotent


def test_rejects_non_loopback_target():
    with pytest.raises(ValueError, match="loopback"):
        FaultProxy("192.0.2.1", 80)
    with pytest.raises(ValueError, match="mode"):
        FaultProxy("127.0.0.1", 80, mode="nope")
