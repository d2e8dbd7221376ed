"""Security, tested against the real service (issue 4).

* JSON only: a pickled task message put on the queue is refused by the worker, whose payload
  never runs (it would create a file), and the worker stays up.
* Jobs touch only the deployment's buckets: a spec naming another bucket is refused by the
  scheduler, and a hand-made message that skips the scheduler is refused by the worker before any
  request to that bucket.
* Credentials (S3 keys, the Redis password) appear in no log (workers at DEBUG), no task argument,
  no result in the backend, no stored object.
* Results are shared through presigned URLs that expire.

Flower's authentication in the deployment files is checked by
``tests/test_deploy.py::test_flower_has_basic_auth_everywhere`` (and its network restriction by
``test_flower_and_metrics_are_cluster_internal_and_network_restricted``).
"""

from __future__ import annotations

import os
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest
from celery.result import AsyncResult

from stylequeue.exceptions import JobFailedError, JobSpecError
from stylequeue.scheduler import submit
from stylequeue.tasks.app import TASK_STYLIZE, TASK_VALIDATE
from tests.service.fault_stack import Stack, job_spec, start_stack, wait_for

pytestmark = pytest.mark.timeout(240)

REDIS_PASSWORD = f"redis-pw-{uuid.uuid4().hex}"


@pytest.fixture(scope="module")
def ss(s3_server, tmp_path_factory) -> Stack:
    # The GPU worker logs at DEBUG: the level that prints the most (task arguments, botocore's
    # requests with their Authorization headers) is where a leak would show first.
    with start_stack(s3_server, tmp_path_factory.mktemp("security"), redis_password=REDIS_PASSWORD,
                     gpu_args=["--loglevel", "DEBUG"]) as stack:
        stack.put_samples()
        yield stack


class _Evil:
    """Unpickling this runs ``touch <path>``: if the file appears, a worker ran our code."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


def test_a_pickled_message_is_refused_and_never_runs(ss: Stack, tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    job_id = f"pickle-{uuid.uuid4().hex[:8]}"
    task_id = f"{job_id}.validate"
    ss.app.send_task(TASK_VALIDATE, args=(_Evil(marker),), task_id=task_id, serializer="pickle")
    wait_for(lambda: "untrusted content of type pickle" in ss.light.log_text(), 30,
             "the worker to refuse the pickle", logs=ss.logs)
    time.sleep(1.0)
    assert not marker.exists(), "the pickled payload ran in a worker"
    assert AsyncResult(task_id, app=ss.app).state == "PENDING"  # never started
    assert ss.queued() == 0  # refused for good, not put back to be refused forever
    assert all(w.running for w in ss.workers)
    assert submit(job_spec(ss.content, ss.style), app=ss.app).wait(timeout=120)["status"] == "succeeded"


def test_another_bucket_is_refused_by_scheduler_and_worker(ss: Stack) -> None:
    other = ss.s3_server.make_bucket()
    try:
        ss.s3.put_object(Bucket=other, Key="secret.png", Body=b"not yours")
        spec = job_spec(f"s3://{other}/secret.png", ss.style)
        with pytest.raises(JobSpecError, match="outside the storage this deployment allows"):
            submit(spec, app=ss.app)
        for change in ({"output": f"s3://{other}/out"}, {"weights": f"s3://{other}/vgg19.pth"}):
            with pytest.raises(JobSpecError, match="outside the storage this deployment allows"):
                submit({**job_spec(ss.content, ss.style), **change}, app=ss.app)
        # A message put on the queue by hand, skipping the scheduler: the worker re-validates.
        for task, message in ((TASK_VALIDATE, spec), (TASK_STYLIZE, {**job_spec(ss.content, ss.style),
                                                                     "weights": f"s3://{other}/vgg19.pth"})):
            task_id = f"{message['job_id']}.{uuid.uuid4().hex[:4]}"
            result = ss.app.send_task(task, args=(message,), task_id=task_id)
            wait_for(lambda: result.state == "FAILURE", 60, f"{task} to refuse", logs=ss.logs)
            assert "outside the storage this deployment allows" in str(result.result)
        ss.s3.head_object(Bucket=other, Key="secret.png")  # untouched
    finally:
        ss.s3_server.remove_bucket(other)


def test_a_jobs_weights_uri_is_checked_against_the_allow_list_in_the_worker(ss: Stack) -> None:
    """The worker's model cache refuses a job's weights outside the allowed prefixes, before any
    request: the weights fetcher allows only the deployment's own weights URI."""
    from stylequeue.exceptions import AccessDeniedError
    from stylequeue.worker.resources import resources_for

    with pytest.raises(AccessDeniedError, match="outside the storage this deployment allows"):
        resources_for(ss.settings).model("max", "s3://someone-elses-bucket/vgg19.pth")


def test_credentials_never_appear_in_logs_args_results_or_objects(ss: Stack) -> None:
    secrets = [ss.s3_server.secret_key, ss.s3_server.access_key, REDIS_PASSWORD]
    job = submit(job_spec(ss.content, ss.style), app=ss.app)
    job.wait(timeout=120)
    failing = submit(job_spec(f"s3://{ss.bucket}/in/nothing-here.png", ss.style), app=ss.app)
    with pytest.raises(JobFailedError):
        failing.wait(timeout=60)

    places: dict[str, str] = {"worker logs": ss.all_logs()}
    assert "Task stylequeue.stylize" in places["worker logs"] and "botocore" in places["worker logs"]
    backend = ss.redis.client(1)
    places["result backend"] = "\n".join(repr(backend.get(k)) for k in backend.keys("*")
                                         if backend.type(k) == b"string")
    assert job.task_ids[1] in places["result backend"]  # task args and results are in there
    places["stored objects"] = "\n".join(ss.get(f"s3://{ss.bucket}/{key}").decode("latin-1")
                                         for key in ss.keys("stylequeue/"))
    assert '"result_uri"' in places["stored objects"]
    for where, text in places.items():
        for secret in secrets:
            assert secret not in text, f"a credential leaked into the {where}"
    assert "redis://:**@" in ss.light.log_text() or "redis://:***@" in ss.light.log_text()


def test_results_are_shared_by_presigned_urls_that_expire(ss: Stack) -> None:
    job = submit(job_spec(ss.content, ss.style), app=ss.app)
    job.wait(timeout=120)
    url = job.presigned_url(expires_s=2)
    assert ss.s3_server.secret_key not in url
    http = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with http.open(url, timeout=10) as response:
        assert response.read() == ss.get(job.result_uri)
    time.sleep(3.5)
    with pytest.raises(urllib.error.HTTPError) as info:
        http.open(url, timeout=10)
    assert info.value.code == 403
