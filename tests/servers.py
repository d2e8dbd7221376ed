"""Real servers for the service tests, on free loopback ports.

Every server here is a context manager with ``start()`` / ``stop()`` that can be called again and
again: a stopped server refuses connections (real ``ECONNREFUSED``, open connections are cut), and a
restarted one listens on the SAME port, so clients configured once see an outage and a recovery —
what the fault tests of issue 4 need. ``S3Server.fail_next(n, status, code)`` makes the next ``n``
S3 requests fail with an HTTP error (503 SlowDown, 500 InternalError, 403 ...) for real.

* :class:`RedisServer` runs the ``redis-server`` binary (no persistence: a restart empties it;
  ``appendonly=True`` makes it durable like a deployment's Redis, ``password`` sets ``requirepass``).
* :class:`S3Server` serves S3 over HTTP:

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
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Literal

HOST = "127.0.0.1"


def free_port() -> int:
    """A port that was free a moment ago (the kernel picks it; a small race is accepted)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def port_open(port: int, host: str = HOST, timeout: float = 0.2) -> bool:
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


class _Restartable:
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


class RedisServer(_Restartable):
    """A private ``redis-server`` process; ``stop()`` is SIGTERM, ``kill()`` SIGKILL.

    ``appendonly``: an append-only file fsynced on every write, so queued and unacknowledged
    messages survive ``restart()`` and even ``kill()`` (what ``appendonly yes`` gives a deployment).
    ``password``: ``requirepass``; :attr:`url` then carries it, as a deployment's URL would.
    """

    def __init__(self, port: int | None = None, startup_timeout: float = 15.0, *,
                 appendonly: bool = False, password: str | None = None) -> None:
        self.appendonly = appendonly
        self.password = password
        self.port = port or free_port()
        self.auto_port = port is None
        self.startup_timeout = startup_timeout
        self.workdir = Path(tempfile.mkdtemp(prefix="stylequeue-redis-"))
        self.log_path = self.workdir / "redis.log"
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return self.url_for(0)

    def url_for(self, db: int) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}{HOST}:{self.port}/{db}"

    def client(self, db: int = 0) -> Any:
        import redis

        return redis.Redis(host=HOST, port=self.port, db=db, socket_timeout=5, password=self.password)

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def start(self) -> None:
        if self.running:
            return
        exe = shutil.which("redis-server")
        if exe is None:
            raise RuntimeError("redis-server is not installed (apt-get install redis-server)")
        durable = ["--appendonly", "yes", "--appendfsync", "always"] if self.appendonly else ["--appendonly", "no"]
        auth = ["--requirepass", self.password] if self.password else []
        args = [exe, "--port", str(self.port), "--bind", HOST, "--save", "", *durable, *auth,
                "--dir", str(self.workdir), "--logfile", str(self.log_path)]
        self._proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)

        def ready() -> bool:
            if self._proc is not None and self._proc.poll() is not None:
                raise RuntimeError(f"redis-server exited with {self._proc.returncode}\n{self.log_text()}")
            return bool(self.client().ping())

        try:
            wait_until(ready, self.startup_timeout, f"redis-server on port {self.port}", self.log_text)
        except Exception:
            self._terminate(signal.SIGKILL)
            raise
        self.running = True

    def stop(self) -> None:
        """Graceful stop (SIGTERM); the port is free again when this returns."""
        self._terminate(signal.SIGTERM)

    def kill(self) -> None:
        """Crash it (SIGKILL), as a failing broker host would."""
        self._terminate(signal.SIGKILL)

    def _terminate(self, sig: int) -> None:
        proc, self._proc, self.running = self._proc, None, False
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(sig)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.workdir, ignore_errors=True)


class TcpProxy(_Restartable):
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
            _hard_close(listener)
        with self._lock:
            conns, self._conns = self._conns, set()
        for conn in conns:
            _hard_close(conn)

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
                _hard_close(client)
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
                _hard_close(sock)
                with self._lock:
                    self._conns.discard(sock)


def _hard_close(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    sock.close()


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
            return _s3_error(start_response, fault[0], fault[1], "injected by tests.servers.S3Faults")
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
            _hard_close(conn)
        if self._thread is not None:
            self._thread.join(timeout=10)


class S3Server(_Restartable):
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


def service_env_for(
    redis: RedisServer, s3: S3Server, bucket: str, data_dir: Path,
    broker_db: int = 0, backend_db: int = 1, **extra: str,
) -> dict[str, str]:
    """``STYLEQUEUE_*`` variables pointing every part of the service at these servers.

    Storage root ``s3://<bucket>/stylequeue``; inputs may live anywhere in ``bucket``, every other
    bucket is refused. Weights are explicit random ones (``random:0``): nothing downloads, nothing
    falls back silently. ``extra`` adds or overrides variables (full names).
    """
    env = {
        "STYLEQUEUE_DATA_DIR": str(data_dir / "data"),
        "STYLEQUEUE_BROKER_URL": redis.url_for(broker_db),
        "STYLEQUEUE_RESULT_BACKEND": redis.url_for(backend_db),
        "STYLEQUEUE_S3_ENDPOINT_URL": s3.endpoint_url,
        "STYLEQUEUE_S3_REGION": s3.region,
        "STYLEQUEUE_S3_ACCESS_KEY_ID": s3.access_key,
        "STYLEQUEUE_S3_SECRET_ACCESS_KEY": s3.secret_key,
        "STYLEQUEUE_S3_ADDRESSING_STYLE": "path",
        "STYLEQUEUE_STORAGE_ROOT": f"s3://{bucket}/stylequeue",
        "STYLEQUEUE_ALLOWED_PREFIXES": f"s3://{bucket}/",
        "STYLEQUEUE_STORAGE_RETRIES": "3",
        "STYLEQUEUE_STORAGE_BACKOFF_S": "0.05",
        "STYLEQUEUE_WEIGHTS": "random:0",
        "STYLEQUEUE_WEIGHTS_CACHE_DIR": str(data_dir / "weights-cache"),
        "STYLEQUEUE_DEVICE": "cpu",
    }
    env.update(extra)
    return env
