"""The worker node's GPU and process metrics, as Prometheus would read them.

There is no GPU and no NVML library on this machine, so the per-GPU series are checked with a
fake NVML object standing in for pynvml (``FakeNVML``: the five pynvml calls the collector makes,
with pynvml's shapes); its formatting, labels and the handling of devices NVML cannot read are
what is tested here. That pynvml itself finds no NVML here, and that the real launcher's endpoint
then serves no GPU series, is tested for real (``test_load_nvml_is_none_without_a_driver`` below,
and ``test_worker_endpoint_serves_process_metrics_and_no_gpu_on_a_cpu_node`` in
tests/service/test_flower.py).
"""

from __future__ import annotations

import ctypes.util
from types import SimpleNamespace
from typing import Any

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from stylequeue.worker.metrics import GPU_METRICS, GpuCollector, load_nvml, worker_registry

GIB = 1024 ** 3


class FakeNVML:
    """pynvml's calls the collector makes; a device is a dict, a missing key raises NVMLError."""

    class NVMLError(Exception):
        pass

    def __init__(self, devices: list[dict[str, Any]]) -> None:
        self.devices = devices

    def nvmlDeviceGetCount(self) -> int:
        return len(self.devices)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> dict[str, Any]:
        if self.devices[index].get("lost"):
            raise self.NVMLError("GPU is lost")
        return self.devices[index]

    def _get(self, handle: dict[str, Any], key: str) -> Any:
        if key not in handle:
            raise self.NVMLError("Not Supported")
        return handle[key]

    def nvmlDeviceGetUUID(self, handle: dict[str, Any]) -> Any:
        return self._get(handle, "uuid")

    def nvmlDeviceGetName(self, handle: dict[str, Any]) -> Any:
        return self._get(handle, "name")

    def nvmlDeviceGetUtilizationRates(self, handle: dict[str, Any]) -> SimpleNamespace:
        return SimpleNamespace(gpu=self._get(handle, "util"), memory=0)

    def nvmlDeviceGetMemoryInfo(self, handle: dict[str, Any]) -> SimpleNamespace:
        used, total = self._get(handle, "memory")
        return SimpleNamespace(used=used, total=total, free=total - used)


def scrape(collector_nvml: Any, running: dict[str, bool] | None = None) -> dict[tuple[str, tuple], float]:
    """What a scrape of the node's registry returns: (name, sorted labels) -> value."""
    registry = worker_registry(lambda: running or {}, collector_nvml, hostname="node-a")
    text = generate_latest(registry).decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def gpu_labels(index: int, uuid: str, model: str) -> tuple[tuple[str, str], ...]:
    return tuple(sorted({"hostname": "node-a", "gpu": str(index), "uuid": uuid, "model": model}.items()))


def test_each_gpu_is_a_labelled_series_of_utilisation_and_memory() -> None:
    nvml = FakeNVML([
        {"uuid": "GPU-aaaa", "name": "NVIDIA H100 80GB HBM3", "util": 87, "memory": (30 * GIB, 80 * GIB)},
        # Older pynvml returns bytes for strings.
        {"uuid": b"GPU-bbbb", "name": b"NVIDIA H100 80GB HBM3", "util": 0, "memory": (0, 80 * GIB)},
    ])
    samples = scrape(nvml, {"gpu0": True, "light": False})
    first, second = gpu_labels(0, "GPU-aaaa", "NVIDIA H100 80GB HBM3"), gpu_labels(1, "GPU-bbbb", "NVIDIA H100 80GB HBM3")
    assert samples[("stylequeue_worker_gpus", (("hostname", "node-a"),))] == 2
    assert samples[("stylequeue_gpu_utilization_ratio", first)] == 0.87
    assert samples[("stylequeue_gpu_memory_used_bytes", first)] == 30 * GIB
    assert samples[("stylequeue_gpu_memory_total_bytes", first)] == 80 * GIB
    assert samples[("stylequeue_gpu_utilization_ratio", second)] == 0.0
    assert samples[("stylequeue_gpu_memory_used_bytes", second)] == 0
    up = {dict(labels)["worker"]: v for (name, labels), v in samples.items() if name == "stylequeue_worker_process_up"}
    assert up == {"gpu0": 1, "light": 0}


def test_a_device_nvml_cannot_read_loses_only_what_it_cannot_give() -> None:
    nvml = FakeNVML([
        {"lost": True},  # fallen off the bus: no series at all, the scrape still succeeds
        {"uuid": "MIG-cccc", "name": "NVIDIA A100 MIG 1g.10gb", "memory": (GIB, 10 * GIB)},  # no utilisation
    ])
    samples = scrape(nvml)
    names = {(name, dict(labels).get("gpu")) for name, labels in samples}
    assert ("stylequeue_gpu_memory_used_bytes", "1") in names
    assert ("stylequeue_gpu_utilization_ratio", "1") not in names
    assert not any(gpu == "0" for _, gpu in names)
    assert samples[("stylequeue_worker_gpus", (("hostname", "node-a"),))] == 2


def test_without_nvml_the_gpu_series_are_absent_and_the_count_is_zero() -> None:
    samples = scrape(None, {"cpu0": True})
    assert samples[("stylequeue_worker_gpus", (("hostname", "node-a"),))] == 0
    assert not {name for name, _ in samples} & set(GPU_METRICS)
    assert samples[("stylequeue_worker_process_up", (("hostname", "node-a"), ("worker", "cpu0")))] == 1


def test_the_collector_declares_exactly_the_series_it_serves() -> None:
    """describe() is what the dashboard's GPU queries are checked against: it must not drift."""
    nvml = FakeNVML([{"uuid": "GPU-a", "name": "X", "util": 1, "memory": (1, 2)}])
    declared = {family.name for family in GpuCollector("node-a", nvml).describe()}
    served = {family.name for family in GpuCollector("node-a", nvml).collect()}
    assert declared == served == {"stylequeue_worker_gpus", *GPU_METRICS}


@pytest.mark.skipif(ctypes.util.find_library("nvidia-ml") is not None, reason="this machine has NVML")
def test_load_nvml_is_none_without_a_driver() -> None:
    """The real pynvml on a CPU machine: no libnvidia-ml, so no NVML and no GPU series."""
    assert load_nvml() is None
