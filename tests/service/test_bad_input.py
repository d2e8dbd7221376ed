"""The bad-input corpus (tests/service/corpus.py) through the real service (issue 4).

Specs that can be judged without storage are refused by the scheduler before anything is queued
(the broker's queues are measured before and after). Files are uploaded and submitted as real jobs:
each bad one ends FAILED with a message that names the file and the problem, each odd-but-valid
one (CMYK, 16-bit, palette, grayscale, alpha, animated GIF, 1x1) succeeds, and the workers are
still up afterwards, serving the next good job.
"""

from __future__ import annotations

import io
import uuid

import pytest
from PIL import Image

from stylequeue.exceptions import JobFailedError, JobSpecError
from stylequeue.job import JobStatus
from stylequeue.scheduler import submit
from stylequeue.tasks.control import JobControl
from tests.service.corpus import MAX_PIXELS, file_cases, spec_cases
from tests.service.fault_stack import Stack, job_spec, start_stack

pytestmark = pytest.mark.timeout(300)

MISSING_BUCKET = f"sq-missing-{uuid.uuid4().hex[:12]}"


@pytest.fixture(scope="module")
def bs(s3_server, tmp_path_factory) -> Stack:
    env = {
        "STYLEQUEUE_MAX_PIXELS": str(MAX_PIXELS),
        # A bucket the deployment allows but that does not exist: "missing bucket" is then a
        # storage answer, not an allow-list refusal.
        "STYLEQUEUE_ALLOWED_PREFIXES": f"s3://{{bucket}}/,s3://{MISSING_BUCKET}/",
    }
    with start_stack(s3_server, tmp_path_factory.mktemp("bad-input"), extra_env=env) as stack:
        stack.put_samples()
        yield stack


@pytest.mark.parametrize("name", [c.name for c in spec_cases("any-bucket")])
def test_bad_specs_are_refused_before_anything_is_queued(bs: Stack, name: str) -> None:
    case = {c.name: c for c in spec_cases(bs.bucket)}[name]
    good = job_spec(bs.content, bs.style)
    spec = case.change(good)
    before = bs.queued()
    with pytest.raises(JobSpecError) as info:
        submit(spec, app=bs.app)
    assert case.expect in str(info.value), str(info.value)
    assert bs.queued() == before == 0
    assert JobControl(bs.app).record(good["job_id"]) is None  # the id was not even claimed


def test_bad_files_fail_clearly_good_odd_files_work_and_the_workers_stay_up(bs: Stack) -> None:
    cases = file_cases()
    jobs = {}
    for case in cases:
        uri = bs.put(f"in/corpus/{case.name}", case.data)
        jobs[case.name] = submit(job_spec(uri, bs.style), app=bs.app)
    missing_key = submit(job_spec(f"s3://{bs.bucket}/in/corpus/never-uploaded.png", bs.style), app=bs.app)
    missing_bucket = submit(job_spec(f"s3://{MISSING_BUCKET}/cat.png", bs.style), app=bs.app)

    problems = []
    for case in cases:
        job = jobs[case.name]
        try:
            summary = job.wait(timeout=180)
        except JobFailedError as exc:
            if case.outcome == "works" or case.expect not in str(exc) or case.name not in str(exc):
                problems.append(f"{case.name}: {case.outcome} expected, got {exc}")
            continue
        if case.outcome == "fails":
            problems.append(f"{case.name}: should have failed with {case.expect!r}, succeeded")
            continue
        image = Image.open(io.BytesIO(bs.get(summary["result_uri"])))
        if max(image.size) != 32 or image.mode != "RGB":
            problems.append(f"{case.name}: result is {image.size} {image.mode}")
    assert not problems, "\n".join(problems) + "\n" + bs.logs()

    missing = ((missing_key, "no object at"), (missing_bucket, f"bucket {MISSING_BUCKET!r} does not exist"))
    for job, expect in missing:
        with pytest.raises(JobFailedError, match="ObjectNotFoundError") as info:
            job.wait(timeout=60)
        assert expect in str(info.value) and job.status() is JobStatus.FAILED

    # Decoding errors are the job's fault: never retried, never a worker crash.
    logs = bs.all_logs()
    assert "WorkerLostError" not in logs and "Retry in" not in logs
    assert all(w.running for w in bs.workers)
    assert submit(job_spec(bs.content, bs.style), app=bs.app).wait(timeout=120)["status"] == "succeeded"
