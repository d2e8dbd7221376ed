"""A webhook receiver on loopback: a real HTTP server (``http.server`` in a thread) that records
every request it gets and answers as a test scripts it.

* ``answer(path, [500, 500])``: the first two requests to ``path`` get 500, later ones 200;
* ``hang(path)``: requests to ``path`` are read, then never answered (the connection stays open
  until the client gives up or the receiver stops), as a stuck receiver would;
* everything else gets 200.

``received(path)`` lists what came: headers, raw body, time, the status answered (None for a hung
one) and when a hung one's client gave up.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from testbed.net import HOST, Restartable, free_port


@dataclass
class Received:
    """One request as it arrived."""

    path: str
    headers: dict[str, str]
    body: bytes
    at: float
    status: int | None = None  # what was answered; None while (or because) it hung
    closed_at: float | None = None  # when a hung request's client gave up

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class _Script:
    statuses: list[int] = field(default_factory=list)
    hang: bool = False


class WebhookReceiver(Restartable):
    """A recording HTTP server on ``HOST``; ``url(path)`` is what a job's webhook names."""

    def __init__(self, port: int | None = None) -> None:
        self.port = port or free_port()
        self.auto_port = port is None
        self._lock = threading.Lock()
        self._scripts: dict[str, _Script] = {}
        self._received: list[Received] = []
        self._release = threading.Event()
        self._server: ThreadingHTTPServer | None = None

    def url(self, path: str) -> str:
        return f"http://{HOST}:{self.port}{path}"

    def answer(self, path: str, statuses: list[int]) -> None:
        with self._lock:
            self._scripts[path] = _Script(list(statuses))

    def hang(self, path: str) -> None:
        with self._lock:
            self._scripts[path] = _Script(hang=True)

    def received(self, path: str | None = None) -> list[Received]:
        with self._lock:
            return [r for r in self._received if path is None or r.path == path]

    def _handle(self, handler: BaseHTTPRequestHandler) -> None:
        length = int(handler.headers.get("Content-Length") or 0)
        request = Received(handler.path, {k.lower(): v for k, v in handler.headers.items()},
                           handler.rfile.read(length), time.time())
        with self._lock:
            self._received.append(request)
            script = self._scripts.get(handler.path, _Script())
            status = None if script.hang else (script.statuses.pop(0) if script.statuses else 200)
        if status is None:
            # Never answer: wait for the client to give up (EOF) or the receiver to stop.
            handler.connection.settimeout(0.2)
            while not self._release.is_set():
                try:
                    if handler.connection.recv(1) == b"":
                        break
                except TimeoutError:
                    continue
                except OSError:
                    break
            request.closed_at = time.time()
            handler.close_connection = True
            return
        request.status = status
        handler.send_response(status)
        handler.send_header("Content-Length", "0")
        handler.end_headers()

    def start(self) -> None:
        if self.running:
            return
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                receiver._handle(self)

            def log_message(self, *args: Any) -> None:
                pass

        self._release.clear()
        self._server = ThreadingHTTPServer((HOST, self.port), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        self.running = True

    def stop(self) -> None:
        server, self._server, self.running = self._server, None, False
        self._release.set()
        if server is not None:
            server.shutdown()
            server.server_close()
