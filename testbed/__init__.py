"""Real servers for the service tests and the benchmarks: the harness both ``tests/`` and ``bench/``
import, so that a benchmark never imports the test suite.

Everything it starts is real and listens on loopback only (``127.0.0.1``, free ports): a private
``redis-server``, an S3 endpoint (moto in this process, or a MinIO named by
``STYLEQUEUE_TEST_S3_ENDPOINT``), ``celery worker`` / ``stylequeue`` subprocesses. It is not part
of the stylequeue wheel (``pyproject.toml`` ships ``stylequeue*`` only); it is importable from the
repository root, as ``python -m pytest`` and ``python -m bench.<name>`` run.

* :mod:`testbed.net`: ``HOST``, ``free_port``, ``port_open``, ``wait_until``, the restartable
  server base class and :class:`~testbed.net.TcpProxy`.
* :mod:`testbed.redis`: :class:`~testbed.redis.RedisServer`.
* :mod:`testbed.s3`: :class:`~testbed.s3.S3Server` (moto or MinIO) and its fault injection,
  :class:`~testbed.s3.S3Faults`.
* :mod:`testbed.env`: ``service_env_for``, the ``STYLEQUEUE_*`` variables pointing at the servers.
* :mod:`testbed.workers`: :class:`~testbed.workers.CeleryWorker`, ``start_all`` / ``stop_all``,
  :class:`~testbed.workers.Beat`, and ``start_stylequeue`` / ``stop_process`` for other commands.
* :mod:`testbed.receiver`: :class:`~testbed.receiver.WebhookReceiver`, an HTTP server that records
  webhook deliveries and answers as scripted (statuses in turn, or never).
* :mod:`testbed.poison`: a worker plugin (``--include testbed.poison``) whose stylize task kills
  its process for one job id, for the fault tests.
"""
