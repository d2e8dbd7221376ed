"""A worker node's own Prometheus endpoint: per-GPU utilisation and memory, and its processes.

Flower sees tasks and the queue exporter sees the broker; neither sees a GPU. ``stylequeue
worker`` (the launcher, which never imports torch) serves this on ``worker_metrics_port``:

* ``stylequeue_worker_gpus{hostname}``: GPUs NVML lists on this node (0 where there is no NVML);
* ``stylequeue_gpu_utilization_ratio{hostname,gpu,uuid,model}``: the share of the last sample
  period in which a kernel ran (NVML's ``utilization.gpu``, 0 to 1);
* ``stylequeue_gpu_memory_used_bytes`` and ``stylequeue_gpu_memory_total_bytes`` (same labels);
* ``stylequeue_worker_process_up{hostname,worker}``: 1 while that ``celery worker`` child runs.

The GPU series come from NVML (nvidia-ml-py's ``pynvml``), read on every scrape. On a node
without an NVIDIA driver they are simply absent, not zero: a CPU worker has no GPU to be idle.
NVML lists every GPU of the node (or of the container), whatever ``--gpus`` picked; ``gpu`` is
NVML's index (nvidia-smi's) and ``uuid`` names the device for certain. This lives in worker/ and
not in monitoring/ because the launcher serves it, and worker/ may not import from a room above.
"""

from __future__ import annotations

import logging
import socket
from typing import Any, Callable, Iterator, Mapping

from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector, CollectorRegistry

from stylequeue.exceptions import ConfigError
from stylequeue.settings import Settings

log = logging.getLogger(__name__)

GPU_LABELS = ["hostname", "gpu", "uuid", "model"]
# Every per-GPU series, name -> help: absent without NVML. deploy/grafana's dashboard may use
# these names only (tests/service/test_flower.py checks it against this mapping).
GPU_METRICS = {
    "stylequeue_gpu_utilization_ratio": "Share of the last sample period a kernel ran on the GPU (NVML)",
    "stylequeue_gpu_memory_used_bytes": "GPU memory in use (NVML)",
    "stylequeue_gpu_memory_total_bytes": "GPU memory in all (NVML)",
}


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)  # older pynvml returns bytes


def load_nvml() -> Any | None:
    """pynvml, initialised; None where there is no NVML (no driver, a CPU node) or no pynvml."""
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception as exc:  # noqa: BLE001 - NVMLError_LibraryNotFound, DriverNotLoaded, ImportError...
        log.info("no NVML here (%s): the worker's GPU metrics are absent", exc)
        return None
    return pynvml


class GpuCollector(Collector):
    """Reads NVML on every scrape. ``nvml`` is pynvml (initialised) or None; tests pass a fake.

    A device NVML cannot read (lost, or a metric not supported, as for a MIG instance) loses
    only the series it cannot give; the scrape still succeeds.
    """

    def __init__(self, hostname: str, nvml: Any | None) -> None:
        self.hostname = hostname
        self.nvml = nvml

    def describe(self) -> Iterator[GaugeMetricFamily]:
        yield GaugeMetricFamily("stylequeue_worker_gpus", "GPUs NVML lists on this node", labels=["hostname"])
        for name, text in GPU_METRICS.items():
            yield GaugeMetricFamily(name, text, labels=GPU_LABELS)

    def collect(self) -> Iterator[GaugeMetricFamily]:
        count = GaugeMetricFamily("stylequeue_worker_gpus", "GPUs NVML lists on this node", labels=["hostname"])
        if self.nvml is None:
            count.add_metric([self.hostname], 0)
            yield count
            return
        families = {name: GaugeMetricFamily(name, text, labels=GPU_LABELS) for name, text in GPU_METRICS.items()}
        try:
            devices = int(self.nvml.nvmlDeviceGetCount())
        except self.nvml.NVMLError as exc:
            log.warning("NVML cannot count the GPUs: %s", exc)
            devices = 0
        count.add_metric([self.hostname], devices)
        yield count
        for index in range(devices):
            self._add_device(index, families)
        yield from families.values()

    def _add_device(self, index: int, families: Mapping[str, GaugeMetricFamily]) -> None:
        nvml = self.nvml
        try:
            handle = nvml.nvmlDeviceGetHandleByIndex(index)
            labels = [self.hostname, str(index), _text(nvml.nvmlDeviceGetUUID(handle)),
                      _text(nvml.nvmlDeviceGetName(handle))]
        except nvml.NVMLError as exc:
            log.warning("NVML cannot read GPU %d: %s", index, exc)
            return
        try:
            families["stylequeue_gpu_utilization_ratio"].add_metric(
                labels, nvml.nvmlDeviceGetUtilizationRates(handle).gpu / 100)
        except nvml.NVMLError as exc:
            log.debug("no utilisation for GPU %d: %s", index, exc)
        try:
            memory = nvml.nvmlDeviceGetMemoryInfo(handle)
        except nvml.NVMLError as exc:
            log.debug("no memory figures for GPU %d: %s", index, exc)
            return
        families["stylequeue_gpu_memory_used_bytes"].add_metric(labels, memory.used)
        families["stylequeue_gpu_memory_total_bytes"].add_metric(labels, memory.total)


class ProcessCollector(Collector):
    """``stylequeue_worker_process_up{worker}`` from ``running()``: child name -> alive."""

    def __init__(self, hostname: str, running: Callable[[], Mapping[str, bool]]) -> None:
        self.hostname = hostname
        self.running = running

    def collect(self) -> Iterator[GaugeMetricFamily]:
        up = GaugeMetricFamily("stylequeue_worker_process_up", "1 while this `celery worker` child runs",
                               labels=["hostname", "worker"])
        for name, alive in self.running().items():
            up.add_metric([self.hostname, name], 1 if alive else 0)
        yield up


def worker_registry(running: Callable[[], Mapping[str, bool]], nvml: Any | None,
                    hostname: str | None = None) -> CollectorRegistry:
    """The node's collectors in a registry of their own (no default process metrics)."""
    hostname = hostname or socket.gethostname()  # Celery's %h: the part after @ in gpu0@host
    registry = CollectorRegistry()
    registry.register(GpuCollector(hostname, nvml))
    registry.register(ProcessCollector(hostname, running))
    return registry


def serve_worker_metrics(settings: Settings, running: Callable[[], Mapping[str, bool]]) -> Callable[[], None]:
    """Serve ``/metrics`` on ``worker_metrics_port`` in a thread; returns how to stop it."""
    from prometheus_client import start_http_server

    address, port = settings.worker_metrics_address, settings.worker_metrics_port
    nvml = load_nvml()
    try:
        server, thread = start_http_server(port, addr=address, registry=worker_registry(running, nvml))
    except OSError as exc:
        raise ConfigError(f"cannot serve worker metrics on {address}:{port} ({exc}); set "
                          "STYLEQUEUE_WORKER_METRICS_PORT to a free port, or to 0 for none") from None
    log.info("serving worker metrics on http://%s:%d/metrics", address, server.server_port)

    def stop() -> None:
        server.shutdown()
        thread.join(timeout=5)
        if nvml is not None:
            nvml.nvmlShutdown()

    return stop
