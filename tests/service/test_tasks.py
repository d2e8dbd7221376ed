"""The tasks, end to end: real Celery workers, real Redis, real S3 (moto or MinIO).

Jobs are submitted from Python with the producer API and checked where a user would look: the
result image and result.json in S3 (read with boto3), task states in the result backend, and
the workers' own logs.
"""

from __future__ import annotations

import io
import json
import threading
import time
import uuid

import pytest
from celery.result import AsyncResult
from PIL import Image

from stylequeue.exceptions import ConfigError, JobFailedError
from stylequeue.job import JobStatus
from stylequeue.scheduler import submit
from stylequeue.tasks.control import JobControl
from tests.conftest import make_image
from tests.service.fault_stack import wait_for

pytestmark = pytest.mark.timeout(240)


@pytest.fixture(scope="module")
def inputs(service_workers) -> dict[str, str]:
    return {
        "content": service_workers.put_png("in/content.png", (48, 32), 1),
        "style": service_workers.put_png("in/style.png", (40, 40), 2),
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


def _exists(service, uri: str) -> bool:
    bucket, key = _key(uri)
    return service.s3.list_objects_v2(Bucket=bucket, Prefix=key).get("KeyCount", 0) > 0


# --- configuration and helpers, without workers -------------------------------------------------

def test_app_config_is_made_for_long_gpu_jobs(redis_server) -> None:
    from stylequeue.settings import Settings
    from stylequeue.tasks.app import TASK_STYLIZE, TASK_VALIDATE, make_app

    settings = Settings(broker_url=redis_server.url_for(4), result_backend=redis_server.url_for(5),
                        visibility_timeout=9000, job_time_limit=4000, job_soft_time_limit=3900)
    conf = make_app(settings).conf
    assert conf.accept_content == ["json"] and conf.result_accept_content == ["json"]
    assert conf.task_serializer == conf.result_serializer == conf.event_serializer == "json"
    assert conf.task_acks_late and conf.task_reject_on_worker_lost and conf.worker_prefetch_multiplier == 1
    assert conf.broker_transport_options["visibility_timeout"] == 9000
    assert conf.result_backend_transport_options["visibility_timeout"] == 9000
    assert conf.broker_transport_options["queue_order_strategy"] == "priority"
    assert (conf.task_time_limit, conf.task_soft_time_limit) == (4000, 3900)
    assert conf.task_routes[TASK_STYLIZE]["queue"] == "gpu" and conf.task_routes[TASK_VALIDATE]["queue"] == "light"
    assert conf.worker_send_task_events and conf.task_send_sent_event and conf.task_track_started
    with pytest.raises(ConfigError, match="visibility_timeout"):
        make_app(settings.replace(visibility_timeout=4000))
    with pytest.raises(ConfigError, match="soft_time_limit"):
        make_app(settings.replace(job_soft_time_limit=4000))


def test_control_flags_on_redis_and_on_files(redis_server, tmp_path) -> None:
    from stylequeue.settings import Settings
    from stylequeue.tasks.app import make_app

    apps = [make_app(Settings(data_dir=str(tmp_path), broker_url=redis_server.url_for(4),
                              result_backend=redis_server.url_for(5))),
            make_app(Settings(data_dir=str(tmp_path)))]  # zero-server: file result backend
    for app in apps:
        control = JobControl(app)
        job_id = f"c-{uuid.uuid4().hex[:8]}"
        assert control.claim(job_id, {"task_ids": ["a"]}) and not control.claim(job_id, {"task_ids": ["b"]})
        assert control.record(job_id) == {"task_ids": ["a"]}
        assert [control.count_delivery("a", 0) for _ in range(3)] == [1, 2, 3]
        assert control.count_delivery("a", 1) == 1  # a retry is a new message, counted apart
        assert not control.is_cancelled(job_id)
        control.request_cancel(job_id)
        assert control.is_cancelled(job_id)
        control.release(job_id, ["a"], max_retries=1)
        assert control.record(job_id) is None and not control.is_cancelled(job_id)
        assert control.count_delivery("a", 0) == 1


def test_chain_steps_start_fresh_resume_or_carry_up() -> None:
    import dataclasses

    import torch

    from stylequeue.engine import OptimState, preset
    from stylequeue.tasks.chain import starting_state

    job = preset("default", size=48, min_size=24, scales=2, iterations=4)
    assert job.scale_sizes == [24, 48]
    assert starting_state(None, job, 0) == (None, "fresh")
    image = torch.rand(1, 3, 16, 24, requires_grad=True)
    optimizer = torch.optim.Adam([image], lr=job.lr)
    image.grad = torch.rand_like(image)
    optimizer.step()
    mid = OptimState(image.detach(), optimizer.state_dict(), 2, 0, job.to_dict())
    done = OptimState(image.detach(), optimizer.state_dict(), 4, 0, job.to_dict())
    assert starting_state(mid, job, 0) == (mid, "resumed")
    assert starting_state(done, job, 1) == (done, "carried")  # the engine carries it up to 48 px
    # Cadence and device may differ; a checkpoint of other settings is never continued.
    assert starting_state(mid, job.replace(progress_every=1, checkpoint_every=1), 0)[1] == "resumed"
    other = dataclasses.replace(mid, config=job.replace(lr=0.5).to_dict())
    assert starting_state(other, job, 0) == (None, "fresh")
    for saved in (None, mid):  # nothing saved, or scale 0 unfinished: step 1 has nothing to carry
        with pytest.raises(RuntimeError, match="no final state of step 0"):
            starting_state(saved, job, 1)


# --- end to end, on the workers ------------------------------------------------------------------

def test_job_result_and_metadata_land_in_s3(service, inputs) -> None:
    job = submit(_spec(inputs), app=service.app)
    summary = job.wait(timeout=120)
    assert summary["status"] == "succeeded" and summary["random_weights"] is True
    assert job.status() is JobStatus.SUCCEEDED

    image = Image.open(io.BytesIO(service.get(summary["result_uri"])))
    assert max(image.size) == 32 and image.size == (32, 21)  # 48x32 content, longest side 32
    meta = json.loads(service.get(summary["metadata_uri"]))
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


class _EventListener:
    """Collects ``kind`` task events (what Flower reads) in a thread until ``stop()``."""

    def __init__(self, app, kind: str) -> None:
        self.seen: list[dict] = []
        self.receiver = None
        self.app, self.kind = app, kind
        self.thread = threading.Thread(target=self._listen, daemon=True)
        self.thread.start()
        wait_for(lambda: self.receiver is not None, 10, "the event receiver")
        time.sleep(0.5)  # its queue is bound before the job starts sending

    def _listen(self) -> None:
        self.stopped = False
        with self.app.connection() as connection:
            self.receiver = self.app.events.Receiver(connection, handlers={self.kind: self.seen.append})
            while not self.stopped:
                try:
                    self.receiver.capture(limit=None, timeout=0.5)
                except TimeoutError:  # a quiet half second: look at the stop flag, listen again
                    continue

    def stop(self) -> None:
        self.stopped = True
        self.receiver.should_stop = True
        self.thread.join(timeout=10)


def test_progress_is_reported_while_the_job_runs(service, inputs) -> None:
    events = _EventListener(service.app, "task-progress")
    job = submit(_spec(inputs, size=64, iterations=100_000), app=service.app)
    try:
        progress = wait_for(job.progress, 90, "a PROGRESS state")
        assert progress["total"] == 100_000 and progress["iteration"] >= 1
        assert set(progress["losses"]) == {"total", "content", "style", "tv"}
        assert progress["eta_s"] is None or progress["eta_s"] > 0
        stylize_task = AsyncResult(job.task_ids[1], app=service.app)
        assert stylize_task.state == "PROGRESS" and stylize_task.info["iteration"] >= 1
        later = wait_for(lambda: (p := job.progress()) and p["iteration"] > progress["iteration"] and p,
                          30, "progress moving on")
        assert later["iteration"] > progress["iteration"]
        assert job.status() is JobStatus.RUNNING
        wait_for(lambda: len(events.seen) >= 3, 30, "three task-progress events")
        event = events.seen[-1]
        assert event["uuid"] == job.task_ids[1] and event["job_id"] == job.job_id
        assert event["total"] == 100_000 and event["iteration"] >= 1 and event["hostname"] == service.gpu.hostname
    finally:
        job.cancel()
        events.stop()


def test_cancel_stops_a_running_job_within_seconds(service, inputs) -> None:
    job = submit(_spec(inputs, size=64, iterations=100_000), app=service.app)
    wait_for(job.progress, 90, "the job to start")
    started = time.monotonic()
    job.cancel()
    wait_for(lambda: job.status() is JobStatus.CANCELLED, 10, "CANCELLED")
    assert time.monotonic() - started < 10
    assert AsyncResult(job.task_ids[1], app=service.app).state == "REVOKED"
    with pytest.raises(JobFailedError, match="cancelled"):
        job.wait(timeout=5)
    time.sleep(1.0)  # publish must never run for a cancelled job
    assert not _exists(service, job.metadata_uri) and not _exists(service, job.result_uri)
    assert AsyncResult(job.task_ids[-1], app=service.app).state == "PENDING"
    # The worker is free again: the next job runs.
    assert submit(_spec(inputs), app=service.app).wait(timeout=120)["status"] == "succeeded"


def test_a_cancelled_job_submitted_again_resumes_from_its_checkpoint(service, inputs) -> None:
    spec = _spec(inputs, size=64, iterations=100_000)
    job = submit(spec, app=service.app)
    wait_for(lambda: (p := job.progress()) and p["iteration"] >= 6, 90, "six iterations")
    job.cancel()
    wait_for(lambda: job.status() is JobStatus.CANCELLED, 10, "CANCELLED")
    again = submit(spec, app=service.app)  # same id: allowed, because it was cancelled
    assert again.status() is not JobStatus.CANCELLED
    first = wait_for(again.progress, 90, "the resubmitted job to run")
    try:
        # Checkpoints every 2 iterations: it went on from one, not from iteration 0.
        assert first["iteration"] > 2
        assert f"job {job.job_id} step 1/1 at 64 px: resumed" in service.gpu.log_text()
    finally:
        again.cancel()
        wait_for(lambda: again.status() is JobStatus.CANCELLED, 10, "CANCELLED again")


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
    image = Image.open(io.BytesIO(service.get(summary["result_uri"])))
    assert image.size == (48, 32)
    meta = json.loads(service.get(summary["metadata_uri"]))
    assert [s["size"] for s in meta["steps"]] == [24, 48]
    assert [s["started_from"] for s in meta["steps"]] == ["fresh", "carried"]
    assert all(s["iterations_done"] == 3 for s in meta["steps"])
    for task_id in job.task_ids[1:3]:
        assert AsyncResult(task_id, app=service.app).state == "SUCCESS"
