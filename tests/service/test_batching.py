"""Worker-side batching end to end: a real `celery worker` started as `stylequeue worker --batch 3`
starts it (threads pool, three threads, STYLEQUEUE_BATCH_MAX=3), real Redis and S3."""

from __future__ import annotations

import io
import json
import uuid
from pathlib import Path
from typing import Iterator

import pytest
from PIL import Image

from stylequeue.scheduler import submit
from stylequeue.settings import load_settings
from stylequeue.tasks.app import make_app
from stylequeue.worker.launcher import plan_workers
from testbed.workers import CeleryWorker, start_all, stop_all
from tests.service.conftest import ServiceWorkers, module_service_env

pytestmark = pytest.mark.timeout(300)
BATCH = 3


def _launcher_args(env: dict[str, str]) -> tuple[int, str, dict[str, str]]:
    """Concurrency, pool and environment `stylequeue worker --batch 3` gives its GPU worker."""
    gpu = plan_workers(load_settings(environ=env), [], queues=["gpu"], batch=BATCH)[0]
    argv = gpu.argv
    return int(argv[argv.index("--concurrency") + 1]), argv[argv.index("--pool") + 1], gpu.env


@pytest.fixture(scope="module")
def batched(redis_server, s3_server, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceWorkers]:
    if not redis_server.running:
        redis_server.start()
    for db in (2, 3):
        redis_server.client(db).flushdb()
    bucket = s3_server.make_bucket()
    env = module_service_env(redis_server, s3_server, bucket, Path(tmp_path_factory.mktemp("batched")))
    # A wide window: the three stylize messages arrive as the light worker validates each job.
    env["STYLEQUEUE_BATCH_WINDOW_S"] = "3"
    concurrency, pool, gpu_env = _launcher_args(env)
    gpu = CeleryWorker({**env, **gpu_env}, "gpu", name="gpu0", concurrency=concurrency, pool=pool)
    light = CeleryWorker(env, "light", name="light", concurrency=3)
    start_all([gpu, light])
    settings = load_settings(environ=env)
    try:
        yield ServiceWorkers(env, settings, make_app(settings), bucket, s3_server.client(), gpu, light)
    finally:
        stop_all([gpu, light])
        s3_server.remove_bucket(bucket)


def test_launcher_maps_batch_to_a_threads_pool(batched: ServiceWorkers) -> None:
    concurrency, pool, env = _launcher_args(batched.env)
    assert (concurrency, pool, env["STYLEQUEUE_BATCH_MAX"]) == (BATCH, "threads", str(BATCH))
    plain = plan_workers(batched.settings, [], queues=["gpu"])[0].argv
    assert plain[plain.index("--pool") + 1] == "prefork"


def test_three_jobs_of_one_size_run_as_one_batch(batched: ServiceWorkers) -> None:
    style = batched.put_png("in/style.png", (40, 40), 2)
    contents = [batched.put_png(f"in/content{i}.png", (48, 32), 10 + i) for i in range(BATCH)]
    jobs = [
        submit({"job_id": f"b-{uuid.uuid4().hex[:8]}", "content": content, "styles": [style],
                "params": {"size": 32, "iterations": 6, "seed": i}}, app=batched.app)
        for i, content in enumerate(contents)
    ]
    summaries = [job.wait(timeout=180) for job in jobs]
    for summary in summaries:
        assert summary["status"] == "succeeded", batched.logs()
        image = Image.open(io.BytesIO(batched.get(summary["result_uri"])))
        assert image.size == (32, 21)
        meta = json.loads(batched.get(summary["metadata_uri"]))
        assert [step["batch_size"] for step in meta["steps"]] == [BATCH], batched.logs()
        assert meta["steps"][0]["iterations_done"] == 6
    # The style's Gram matrices were computed once and stored for the fleet.
    cached = batched.s3.list_objects_v2(Bucket=batched.bucket, Prefix="stylequeue/cache/style-targets/")
    assert cached.get("KeyCount") == 1
