"""A private ``redis-server`` on a free loopback port, for the service tests and the benchmarks.

:class:`RedisServer` runs the ``redis-server`` binary (no persistence: a restart empties it;
``appendonly=True`` makes it durable like a deployment's Redis, ``password`` sets ``requirepass``).
Like every server of :mod:`testbed`, it can be stopped and started again on the same port.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import tempfile
from pathlib import Path
from typing import Any

from testbed.net import HOST, Restartable, free_port, wait_until


class RedisServer(Restartable):
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
        self._proc = subprocess.Popen([exe, *self._args()], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)

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

    def _args(self) -> list[str]:
        durable = ["--appendonly", "yes", "--appendfsync", "always"] if self.appendonly else ["--appendonly", "no"]
        auth = ["--requirepass", self.password] if self.password else []
        return ["--port", str(self.port), "--bind", HOST, "--save", "", *durable, *auth,
                "--dir", str(self.workdir), "--logfile", str(self.log_path)]

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


class RedisSentinel(RedisServer):
    """A Redis Sentinel (``redis-server CONF --sentinel``) watching ``master`` as ``name``.

    What a deployment with failover gives its clients: they ask the sentinel for the master and
    connect there, with a ``sentinel://HOST:PORT`` URL and the master's name.
    """

    def __init__(self, master: RedisServer, name: str = "stylequeue", port: int | None = None) -> None:
        super().__init__(port)
        self.master = master
        self.name = name

    @property
    def url(self) -> str:
        return f"sentinel://{HOST}:{self.port}"

    def url_for(self, db: int) -> str:
        return f"{self.url}/{db}"

    def _args(self) -> list[str]:
        conf = self.workdir / "sentinel.conf"  # a sentinel rewrites its config: it must be a file
        conf.write_text(
            f"port {self.port}\nbind {HOST}\ndir {self.workdir}\nlogfile {self.log_path}\n"
            f"sentinel monitor {self.name} {HOST} {self.master.port} 1\n"
        )
        return [str(conf), "--sentinel"]
