"""The tasks, end to end: real Celery workers, real Redis, real S3 (moto or MinIO).

Jobs are submitted from Python with the producer API and checked where a user would look: the
result image and result.json in S3 (read with boto3), task states in the result backend, and
the workers' own logs.
"""

from __future__ import annotations

import io
import json
import time
import uuid

import pytest
from celery.result import AsyncResult
from PIL import Image

from stylequeue.exceptions import JobFailedError
from stylequeue.job import JobStatus
from stylequeue.scheduler import submit
from tests.conftest import make_image

pytestmark = pytest.mark.timeout(240)


def _put_png(service, key: str, size: tuple[int, int], seed: int) -> str:
    buffer = io.BytesIO()
    make_image(*size, seed=seed).save(buffer, "PNG")
    service.s3.put_object(Bucket=service.bucket, Key=key, Body=buffer.getvalue())
    return f"s3://{service.bucket}/{key}"


@pytest.fixture(scope="module")
def inputs(service_workers) -> dict[str, str]:
    return {
        "content": _put_png(service_workers, "in/content.png", (48, 32), 1),
        "style": _put_png(service_workers, "in/style.png", (40, 40), 2),
    }


def _spec(inputs: dict[str, str], job_id: str | None = None, **params) -> dict:
    return {
        "job_id": job_id or f"t-{uuid.uuid4().hex[:10]}",
        "content": inputs["content"],
        "styles": [inputs["style"]],
        "params": {"size": 32, "iterations": 4, **params},
    }


def _key(uri: str) -> tuple[str, str]:
    bucket, key = uri[len("s3://"):].split("/", 1)
    return bucket, key


def _get(service, uri: str) -> bytes:
    bucket, key = _key(uri)
    return service.s3.get_object(Bucket=bucket, Key=key)["Body"].read()


def _exists(service, uri: str) -> bool:
    bucket, key = _key(uri)
    return service.s3.list_objects_v2(Bucket=bucket, Prefix=key).get("KeyCount", 0) > 0


def _wait_for(check, timeout: float, what: str, interval: float = 0.1):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"{what} did not happen within {timeout} s")


def test_job_result_and_metadata_land_in_s3(service, inputs) -> None:
    job = submit(_spec(inputs), app=service.app)
    summary = job.wait(timeout=120)
    assert summary["status"] == "succeeded" and summary["random_weights"] is True
    assert job.status() is JobStatus.SUCCEEDED

    image = Image.open(io.BytesIO(_get(service, summary["result_uri"])))
    assert max(image.size) == 32 and image.size == (32, 21)  # 48x32 content, longest side 32
    meta = json.loads(_get(service, summary["metadata_uri"]))
    assert meta["random_weights"] is True and meta["weights"]["source"] == "random:0"
    assert meta["spec"]["job_id"] == job.job_id and meta["spec"]["content"] == inputs["content"]
    assert meta["settings"]["weights"] == "random:0"
    assert len(meta["steps"]) == 1 and meta["steps"][0]["iterations_done"] == 4
    text = json.dumps(meta)
    assert service.settings.s3_secret_access_key not in text  # no credentials in results
    # Previews every 2 iterations; the working files are gone once the result is published.
    prefix = summary["result_uri"].rsplit("/", 1)[0]
    keys = [o["Key"] for o in service.s3.list_objects_v2(
        Bucket=service.bucket, Prefix=_key(prefix)[1])["Contents"]]
    assert sum("/previews/" in k for k in keys) >= 2
    assert not any(k.endswith("checkpoint.pt") for k in keys)


def test_progress_is_reported_while_the_job_runs(service, inputs) -> None:
    job = submit(_spec(inputs, size=64, iterations=100_000), app=service.app)
    try:
        progress = _wait_for(job.progress, 90, "a PROGRESS state")
        assert progress["total"] == 100_000 and progress["iteration"] >= 1
        assert set(progress["losses"]) == {"total", "content", "style", "tv"}
        assert progress["eta_s"] is None or progress["eta_s"] > 0
        stylize_task = AsyncResult(job.task_ids[1], app=service.app)
        assert stylize_task.state == "PROGRESS" and stylize_task.info["iteration"] >= 1
        later = _wait_for(lambda: (p := job.progress()) and p["iteration"] > progress["iteration"] and p,
                          30, "progress moving on")
        assert later["iteration"] > progress["iteration"]
        assert job.status() is JobStatus.RUNNING
    finally:
        job.cancel()


def test_cancel_stops_a_running_job_within_seconds(service, inputs) -> None:
    job = submit(_spec(inputs, size=64, iterations=100_000), app=service.app)
    _wait_for(job.progress, 90, "the job to start")
    started = time.monotonic()
    job.cancel()
    _wait_for(lambda: job.status() is JobStatus.CANCELLED, 10, "CANCELLED")
    assert time.monotonic() - started < 10
    assert AsyncResult(job.task_ids[1], app=service.app).state == "REVOKED"
    with pytest.raises(JobFailedError, match="cancelled"):
        job.wait(timeout=5)
    time.sleep(1.0)  # publish must never run for a cancelled job
    assert not _exists(service, job.metadata_uri) and not _exists(service, job.result_uri)
    assert AsyncResult(job.task_ids[-1], app=service.app).state == "PENDING"
    # The worker is free again: the next job runs.
    assert submit(_spec(inputs), app=service.app).wait(timeout=120)["status"] == "succeeded"


def test_same_job_id_twice_does_the_work_once(service, inputs) -> None:
    job_id = f"twice-{uuid.uuid4().hex[:8]}"
    first = submit(_spec(inputs, job_id=job_id), app=service.app)
    second = submit(_spec(inputs, job_id=job_id), app=service.app)  # while queued or running
    assert second.task_ids == first.task_ids
    result = first.wait(timeout=120)
    assert second.wait(timeout=30) == result
    bucket, key = _key(result["metadata_uri"])
    stamp = service.s3.head_object(Bucket=bucket, Key=key)["LastModified"]
    third = submit(_spec(inputs, job_id=job_id), app=service.app)  # after it finished
    assert third.wait(timeout=30) == result
    time.sleep(1.0)
    assert service.s3.head_object(Bucket=bucket, Key=key)["LastModified"] == stamp
    stylize_id = first.task_ids[1]
    assert service.gpu.log_text().count(f"stylequeue.stylize[{stylize_id}] received") == 1
    counter = service_counter(service, f"stylequeue-deliveries-{stylize_id}-0")
    assert counter == 1


def service_counter(service, key: str) -> int:
    import redis

    client = redis.Redis.from_url(service.settings.result_backend)
    return int(client.get(key) or 0)


def test_missing_input_fails_clearly_and_the_worker_serves_the_next_job(service, inputs) -> None:
    missing = f"s3://{service.bucket}/in/no-such-image.png"
    bad = submit({**_spec(inputs), "content": missing}, app=service.app)
    with pytest.raises(JobFailedError) as info:
        bad.wait(timeout=60)
    assert bad.status() is JobStatus.FAILED
    message = str(info.value)
    assert "no-such-image.png" in message and "ObjectNotFoundError" in message
    # Failed on the light queue at validation: it never took the GPU (Celery marks the rest of
    # the chain failed too, without running it).
    assert f"stylequeue.stylize[{bad.task_ids[1]}] received" not in service.gpu.log_text()
    assert submit(_spec(inputs), app=service.app).wait(timeout=120)["status"] == "succeeded"


def test_multiscale_job_is_a_chain_of_stylize_steps(service, inputs) -> None:
    job = submit(_spec(inputs, size=48, iterations=3, scales=2, min_size=24), app=service.app)
    assert len(job.task_ids) == 4  # validate, stylize at 24 px, stylize at 48 px, publish
    summary = job.wait(timeout=180)
    image = Image.open(io.BytesIO(_get(service, summary["result_uri"])))
    assert image.size == (48, 32)
    meta = json.loads(_get(service, summary["metadata_uri"]))
    assert [s["size"] for s in meta["steps"]] == [24, 48]
    assert [s["started_from"] for s in meta["steps"]] == ["fresh", "carried"]
    assert all(s["iterations_done"] == 3 for s in meta["steps"])
    for task_id in job.task_ids[1:3]:
        assert AsyncResult(task_id, app=service.app).state == "SUCCESS"
