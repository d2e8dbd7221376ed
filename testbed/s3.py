"""An S3-compatible HTTP endpoint on a free loopback port, with faults on demand.

:class:`S3Server` serves S3 over HTTP, and can be stopped and started again on the same port like
every server of :mod:`testbed`. ``S3Server.fail_next(n, status, code)`` makes the next ``n`` S3
requests fail with an HTTP error (503 SlowDown, 500 InternalError, 403 ...) for real.

- ``STYLEQUEUE_TEST_S3_ENDPOINT`` set (a MinIO URL, keys from ``STYLEQUEUE_TEST_S3_ACCESS_KEY`` /
  ``..._SECRET_KEY``, default ``minioadmin``): that server, reached through a :class:`TcpProxy`
  that ``stop()`` / ``start()`` toggle (we cannot restart someone else's MinIO). Data survives.
- otherwise moto's server, by default in a thread of the test process (``mode="thread"``). Why a
  thread and not a process: moto keeps its buckets in module globals, so a threaded server that is
  stopped and started again on the same port KEEPS its data — an outage, not data loss, exactly
  like a MinIO restart. Celery worker subprocesses reach it over loopback like any endpoint; it
  lives as long as the pytest session, which outlives every worker it starts. ``mode="process"``
  runs ``python -m moto.server`` instead (survives a stuck test process; loses every bucket on
  restart: use it only where that is the point).
"""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Literal

from testbed.net import HOST, Restartable, TcpProxy, free_port, hard_close, port_open, wait_until


def _s3_error(start_response: Callable[..., Any], status: str, code: str, message: str) -> list[bytes]:
    body = (f'<?xml version="1.0" encoding="UTF-8"?><Error><Code>{code}</Code>'
            f"<Message>{message}</Message></Error>").encode()
    start_response(status, [("Content-Type", "application/xml"), ("Content-Length", str(len(body)))])
    return [body]


def _presigned_expiry(query: dict[str, list[str]]) -> float | None:
    from datetime import datetime, timezone

    if "X-Amz-Expires" in query and "X-Amz-Date" in query:  # SigV4
        signed = datetime.strptime(query["X-Amz-Date"][0], "%Y%m%dT%H%M%SZ").replace(tzinfo=timezone.utc)
        return signed.timestamp() + int(query["X-Amz-Expires"][0])
    if "Expires" in query and "Signature" in query:  # SigV2 query auth
        return float(query["Expires"][0])
    return None


class S3Faults:
    """WSGI middleware in front of moto: what real S3 does that moto does not, plus faults.

    * Expired presigned URLs get 403, as on S3 and MinIO (moto 5 ignores ``X-Amz-Expires``; without
      this a test that an expired link stops working would fail for moto's reason, not ours).
    * :meth:`fail_next` answers the next ``count`` requests with an HTTP error (503 SlowDown by
      default), as an overloaded or failing S3 would, so tests see 5xx and throttling for real.
    """

    def __init__(self, app: Callable[..., Any]) -> None:
        self.app = app
        self._lock = threading.Lock()
        self._remaining = 0
        self._error = ("503 Service Unavailable", "SlowDown")
        self.injected = 0

    def fail_next(self, count: int, status: int = 503, code: str = "SlowDown") -> None:
        from http import HTTPStatus

        with self._lock:
            self._remaining = count
            self._error = (f"{status} {HTTPStatus(status).phrase}", code)

    def _take_fault(self) -> tuple[str, str] | None:
        with self._lock:
            if self._remaining <= 0:
                return None
            self._remaining -= 1
            self.injected += 1
            return self._error

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
        from urllib.parse import parse_qs

        fault = self._take_fault()
        if fault is not None:
            return _s3_error(start_response, fault[0], fault[1], "injected by testbed.s3.S3Faults")
        expires_at = _presigned_expiry(parse_qs(environ.get("QUERY_STRING", "")))
        if expires_at is not None and time.time() > expires_at:
            return _s3_error(start_response, "403 Forbidden", "AccessDenied", "Request has expired")
        return self.app(environ, start_response)


class _MotoThread:
    """moto's WSGI app on a werkzeug server in a daemon thread, with a stop that really stops.

    moto's own ThreadedMotoServer.stop() neither closes the listening socket (so the port stays
    taken and clients hang instead of being refused) nor the HTTP/1.1 keep-alive connections (so
    boto3's pooled connections keep being served). This version does both.
    """

    def __init__(self, port: int, faults: "S3Faults") -> None:
        self.port = port
        self.faults = faults
        self._server: Any = None
        self._thread: threading.Thread | None = None
        self._conns: set[socket.socket] = set()

    def start(self) -> None:
        from moto.server import DomainDispatcherApplication, MotoRequestHandler, create_backend_app
        from werkzeug.serving import make_server

        logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one line per request otherwise
        app = self.faults
        app.app = DomainDispatcherApplication(create_backend_app)
        try:
            server = make_server(HOST, self.port, app, threaded=True, request_handler=MotoRequestHandler)
        except SystemExit:  # werkzeug exits the process when the port is taken
            raise OSError(f"port {self.port} is already in use") from None
        accept = server.get_request

        def get_request() -> tuple[socket.socket, Any]:
            conn, addr = accept()
            self._conns.add(conn)
            return conn, addr

        server.get_request = get_request
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, daemon=True, name="moto")
        self._thread.start()

    def stop(self) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        server.shutdown()
        server.server_close()
        conns, self._conns = self._conns, set()
        for conn in conns:
            hard_close(conn)
        if self._thread is not None:
            self._thread.join(timeout=10)


class S3Server(Restartable):
    """An S3-compatible HTTP endpoint: MinIO when configured, else moto (see module docstring)."""

    def __init__(
        self, mode: Literal["thread", "process"] = "thread", port: int | None = None,
        startup_timeout: float = 30.0,
    ) -> None:
        self.external = os.environ.get("STYLEQUEUE_TEST_S3_ENDPOINT", "").rstrip("/")
        self.mode = "external" if self.external else mode
        self.port = port or free_port()
        self.auto_port = port is None
        self.startup_timeout = startup_timeout
        env = os.environ.get
        # moto accepts any keys; these are long enough for Storage to mask them in messages.
        self.access_key = env("STYLEQUEUE_TEST_S3_ACCESS_KEY", "minioadmin") if self.external else "testing-access-key"
        self.secret_key = env("STYLEQUEUE_TEST_S3_SECRET_KEY", "minioadmin") if self.external else "testing-secret-key"
        self.region = "us-east-1"
        self._moto: _MotoThread | None = None
        self.faults = S3Faults(lambda environ, start_response: [])  # app set when moto starts
        self._proxy: TcpProxy | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._log = Path(tempfile.gettempdir()) / f"stylequeue-moto-{uuid.uuid4().hex[:12]}.log"

    @property
    def endpoint_url(self) -> str:
        scheme = self.external.split("://", 1)[0] if self.external else "http"
        return f"{scheme}://{HOST}:{self.port}"

    def fail_next(self, count: int, status: int = 503, code: str = "SlowDown") -> None:
        """The next ``count`` requests get HTTP ``status`` with S3 error ``code`` (moto thread mode)."""
        if self.mode != "thread":
            raise RuntimeError(f"HTTP fault injection needs the threaded moto server, not {self.mode!r}")
        self.faults.fail_next(count, status, code)

    @property
    def keeps_data_on_restart(self) -> bool:
        return self.mode != "process"

    def client(self) -> Any:
        """A boto3 S3 client for this endpoint, path-style, checksums only when required."""
        import boto3
        from botocore.config import Config

        config = Config(
            s3={"addressing_style": "path"},
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
            retries={"max_attempts": 2},
            connect_timeout=5,
            read_timeout=30,
        )
        return boto3.client(
            "s3", endpoint_url=self.endpoint_url, region_name=self.region,
            aws_access_key_id=self.access_key, aws_secret_access_key=self.secret_key, config=config,
        )

    def make_bucket(self, name: str | None = None) -> str:
        name = name or f"sq-test-{uuid.uuid4().hex[:16]}"
        self.client().create_bucket(Bucket=name)
        return name

    def remove_bucket(self, name: str) -> None:
        """Delete every object and then the bucket (best effort: the test may have broken it)."""
        self.faults.fail_next(0)  # a test's unused injected faults end with it
        client = self.client()
        try:
            for page in client.get_paginator("list_objects_v2").paginate(Bucket=name):
                keys = [{"Key": obj["Key"]} for obj in page.get("Contents", [])]
                if keys:
                    client.delete_objects(Bucket=name, Delete={"Objects": keys})
            client.delete_bucket(Bucket=name)
        except Exception:  # noqa: BLE001 - cleanup must not mask the test's own failure
            pass

    def log_text(self) -> str:
        return self._log.read_text(errors="replace") if self._log.exists() else ""

    def start(self) -> None:
        if self.running:
            return
        if self.mode == "external":
            host, port = _host_port(self.external)
            if self._proxy is None or self._proxy.port != self.port:
                self._proxy = TcpProxy(host, port, port=self.port)
            self._proxy.start()
        elif self.mode == "thread":
            self._moto = _MotoThread(self.port, self.faults)
            self._moto.start()
        else:
            with self._log.open("ab") as log:
                self._proc = subprocess.Popen(
                    [sys.executable, "-m", "moto.server", "-H", HOST, "-p", str(self.port)],
                    stdout=log, stderr=subprocess.STDOUT,
                )
        try:
            wait_until(self._ready, self.startup_timeout, f"S3 ({self.mode}) on {self.endpoint_url}",
                       self.log_text)
        except Exception:
            self.stop()
            raise
        self.running = True

    def close(self) -> None:
        self.stop()
        self._log.unlink(missing_ok=True)

    def _ready(self) -> bool:
        if self._proc is not None and self._proc.poll() is not None:
            raise RuntimeError(f"moto server exited with {self._proc.returncode}")
        if not port_open(self.port):
            return False
        self.client().list_buckets()
        return True

    def stop(self) -> None:
        """The endpoint refuses connections until ``start()``; open connections are cut."""
        self.running = False
        if self._proxy is not None:
            self._proxy.stop()
        if self._moto is not None:
            self._moto.stop()
            self._moto = None
        if self._proc is not None:
            proc, self._proc = self._proc, None
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)


def _host_port(url: str) -> tuple[str, int]:
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    default = 443 if parts.scheme == "https" else 80
    return parts.hostname or HOST, parts.port or default
