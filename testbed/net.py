"""Loopback networking for the real-server harness, and the base class every server shares.

Every server here is a context manager with ``start()`` / ``stop()`` that can be called again and
again: a stopped server refuses connections (real ``ECONNREFUSED``, open connections are cut), and a
restarted one listens on the SAME port, so clients configured once see an outage and a recovery —
what the fault tests of issue 4 need.

* :func:`free_port`, :func:`port_open`, :func:`wait_until`: the helpers every server starts with.
* :class:`Restartable`: the start / stop / restart / context-manager plumbing.
* :class:`TcpProxy`: a TCP forwarder that ``stop()`` / ``start()`` toggle (an outage of a server
  we cannot restart ourselves, such as someone else's MinIO).
"""

from __future__ import annotations

import socket
import threading
import time
from typing import Any, Callable

HOST = "127.0.0.1"


def free_port() -> int:
    """A port that was free a moment ago (the kernel picks it; a small race is accepted)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def port_open(port: int, host: str = HOST, timeout: float = 0.2) -> bool:
    """True when something accepts a TCP connection on ``host:port`` within ``timeout`` s."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def wait_until(
    check: Callable[[], bool], timeout: float, what: str, log: Callable[[], str] = lambda: ""
) -> None:
    """Poll ``check`` until it is true; on timeout raise with the server's log in the message."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except Exception:  # noqa: BLE001 - "not ready yet" comes in many shapes
            pass
        time.sleep(0.05)
    raise RuntimeError(f"{what} not ready after {timeout:.0f}s\n--- log ---\n{log()[-4000:]}")


class Restartable:
    """Context-manager plumbing shared by every server: enter starts, exit stops for good."""

    running: bool = False

    def start(self) -> None:  # pragma: no cover - overridden
        raise NotImplementedError

    def stop(self) -> None:  # pragma: no cover - overridden
        raise NotImplementedError

    def close(self) -> None:
        self.stop()

    def restart(self) -> None:
        self.stop()
        self.start()

    def __enter__(self) -> Any:
        """Start; a port picked by free_port() that someone took meanwhile is picked again."""
        for attempt in range(3):
            try:
                self.start()
                return self
            except (OSError, RuntimeError):
                if not getattr(self, "auto_port", False) or attempt == 2:
                    raise
                self.port = free_port()
        raise AssertionError("unreachable")

    def __exit__(self, *exc: object) -> None:
        self.close()


class TcpProxy(Restartable):
    """A TCP forwarder on a fixed port; ``stop()`` refuses new and cuts open connections."""

    def __init__(self, upstream_host: str, upstream_port: int, port: int | None = None) -> None:
        self.upstream = (upstream_host, upstream_port)
        self.port = port or free_port()
        self.auto_port = port is None
        self._listener: socket.socket | None = None
        self._conns: set[socket.socket] = set()
        self._lock = threading.Lock()

    def start(self) -> None:
        if self.running:
            return
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((HOST, self.port))
        listener.listen(64)
        self._listener = listener
        self.running = True
        threading.Thread(target=self._accept_loop, args=(listener,), daemon=True).start()

    def stop(self) -> None:
        listener, self._listener, self.running = self._listener, None, False
        if listener is not None:
            hard_close(listener)
        with self._lock:
            conns, self._conns = self._conns, set()
        for conn in conns:
            hard_close(conn)

    def _accept_loop(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return  # listener closed by stop()
            try:
                upstream = socket.create_connection(self.upstream, timeout=5)
                upstream.settimeout(None)
            except OSError:
                hard_close(client)
                continue
            with self._lock:
                self._conns.update((client, upstream))
            for src, dst in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(src, dst), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (src, dst):
                hard_close(sock)
                with self._lock:
                    self._conns.discard(sock)


def hard_close(sock: socket.socket) -> None:
    """Shut down both directions, then close: the peer sees the connection cut, not a hang."""
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    sock.close()
