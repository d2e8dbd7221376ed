"""``stylequeue worker``: the plan of processes, GPU counting, and the real launcher.

The launcher test starts ``stylequeue worker --gpus 0`` as a real process against the real
servers, sends it a job, and stops it with SIGTERM as Kubernetes and Compose do.
"""

from __future__ import annotations

import io
import os
import signal
import socket
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from stylequeue.exceptions import ConfigError
from stylequeue.settings import Settings
from stylequeue.worker import count_gpus, parse_gpus, plan_workers
from tests.conftest import make_image


def _png(seed: int, size: tuple[int, int] = (40, 32)) -> bytes:
    buffer = io.BytesIO()
    make_image(*size, seed=seed).save(buffer, "PNG")
    return buffer.getvalue()


def test_parse_gpus_forms() -> None:
    assert parse_gpus("auto", available=3, environ={}) == ["0", "1", "2"]
    # A container or scheduler that already chose the GPUs is obeyed, UUIDs included.
    assert parse_gpus("auto", environ={"CUDA_VISIBLE_DEVICES": "2,3"}) == ["2", "3"]
    assert parse_gpus("auto", environ={"CUDA_VISIBLE_DEVICES": "GPU-a1b2"}) == ["GPU-a1b2"]
    assert parse_gpus("auto", available=2, environ={"CUDA_VISIBLE_DEVICES": ""}) == []
    assert parse_gpus("2") == ["0", "1"]
    assert parse_gpus("0") == []
    assert parse_gpus("1,3") == ["1", "3"]
    assert parse_gpus("2,") == ["2"]
    for bad in ("two", "1,1", "-1,"):
        with pytest.raises(ConfigError):
            parse_gpus(bad)


def test_plan_one_process_per_gpu_with_its_own_device() -> None:
    procs = plan_workers(Settings(), ["0", "3"], concurrency_light=2)
    assert [p.name for p in procs] == ["gpu0", "gpu3", "light"]
    gpu0, gpu3, light = procs
    assert gpu0.env == {"CUDA_VISIBLE_DEVICES": "0", "STYLEQUEUE_BATCH_MAX": "1"}
    assert gpu3.env["CUDA_VISIBLE_DEVICES"] == "3"
    for proc, host in ((gpu0, "gpu0@%h"), (gpu3, "gpu3@%h")):
        argv = proc.argv
        assert argv[argv.index("-Q") + 1] == "gpu"
        assert argv[argv.index("-n") + 1] == host
        assert argv[argv.index("--concurrency") + 1] == "1"
        assert argv[argv.index("--prefetch-multiplier") + 1] == "1"
    assert light.argv[light.argv.index("-Q") + 1] == "light"
    assert light.argv[light.argv.index("--concurrency") + 1] == "2"
    assert light.env["CUDA_VISIBLE_DEVICES"] == ""  # the light worker never sees a GPU


def test_plan_without_gpus_is_one_cpu_worker_and_queues_can_be_chosen() -> None:
    procs = plan_workers(Settings(), [], queues=["gpu"])
    assert [p.name for p in procs] == ["cpu0"]
    assert procs[0].argv[procs[0].argv.index("-n") + 1] == "cpu0@%h"
    uuid_worker = plan_workers(Settings(), ["GPU-a1b2"], queues=["gpu"])[0]
    assert uuid_worker.name == "gpu0" and uuid_worker.env["CUDA_VISIBLE_DEVICES"] == "GPU-a1b2"
    batched = plan_workers(Settings(), ["0"], queues=["gpu"], batch=4)[0]
    assert batched.argv[batched.argv.index("--pool") + 1] == "threads"
    assert batched.argv[batched.argv.index("--concurrency") + 1] == "4"
    assert batched.env["STYLEQUEUE_BATCH_MAX"] == "4"
    with pytest.raises(ConfigError, match="--batch"):
        plan_workers(Settings(), ["0"], batch=0)
    with pytest.raises(ConfigError, match="unknown queue"):
        plan_workers(Settings(), [], queues=["gpu", "video"])


def test_count_gpus_reads_nvidia_smi_without_touching_cuda(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake = tmp_path / "nvidia-smi"  # stands in for the GPU driver's tool (the only mock: a GPU)
    fake.write_text("#!/bin/sh\necho 'GPU 0: NVIDIA H200 (UUID: GPU-a)'\necho 'GPU 1: NVIDIA H200 (UUID: GPU-b)'\n")
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    monkeypatch.delenv("STYLEQUEUE_GPU_COUNT", raising=False)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    assert count_gpus() == 2
    monkeypatch.setenv("STYLEQUEUE_GPU_COUNT", "3")
    assert count_gpus() == 3
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    monkeypatch.delenv("STYLEQUEUE_GPU_COUNT")
    assert count_gpus() == 0
    # The launcher module itself imports no torch, so the parent can never initialise CUDA.
    out = subprocess.run(
        [sys.executable, "-c", "import sys, stylequeue.worker.launcher; print('torch' in sys.modules)"],
        capture_output=True, text=True, check=True,
    ).stdout.strip()
    assert out == "False"


def test_launcher_runs_a_cpu_worker_that_takes_a_job_and_stops_on_sigterm(tmp_path: Path) -> None:
    """`stylequeue worker --gpus 0` with the zero-server defaults (filesystem broker, file results,
    file:// storage): a cpu0 worker and a light worker serve a job; SIGTERM ends them all."""
    from stylequeue.scheduler import submit
    from stylequeue.settings import load_settings
    from stylequeue.tasks.app import make_app

    data = tmp_path / "data"
    env = {"STYLEQUEUE_DATA_DIR": str(data), "STYLEQUEUE_WEIGHTS": "random:0", "STYLEQUEUE_DEVICE": "cpu",
           "OMP_NUM_THREADS": "1"}
    settings = load_settings(environ=env)
    inputs = data / "objects" / "in"
    inputs.mkdir(parents=True)
    (inputs / "content.png").write_bytes(_png(1))
    (inputs / "style.png").write_bytes(_png(2))
    log_path = tmp_path / "launcher.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "stylequeue", "worker", "--gpus", "0", "--concurrency-light", "1"],
            env={**os.environ, **env}, stdout=log, stderr=subprocess.STDOUT,
        )
    try:
        job = submit({"job_id": "launcher-job", "content": f"file://{inputs}/content.png",
                      "styles": [f"file://{inputs}/style.png"], "params": {"size": 32, "iterations": 3}},
                     app=make_app(settings))
        result = job.wait(timeout=150)
        assert result["status"] == "succeeded"
        assert (data / "objects" / "jobs" / "launcher-job" / "result.json").exists()
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise AssertionError("stylequeue worker did not stop within 60 s of SIGTERM")
    text = log_path.read_text(errors="replace")
    assert code == 0, text[-4000:]
    host = socket.gethostname()
    assert f"cpu0@{host} ready." in text and f"light@{host} ready." in text
    assert "stylequeue.stylize[launcher-job.stylize.0] received" in text
    assert text.count("Warm shutdown") == 2  # SIGTERM reached both children
