"""A job's id means one job (issue 13): ids, specs, outputs and checkpoints, against real Redis,
S3 and celery workers. Each test here failed before its fix (the issue says how)."""

from __future__ import annotations

import io
import json
import uuid
from typing import Any

import numpy as np
import pytest
from PIL import Image

from stylequeue.engine import OptimState, preset
from stylequeue.exceptions import JobFailedError, JobSpecError
from stylequeue.job import JobPaths, JobSpec, JobStatus
from stylequeue.scheduler import submit
from stylequeue.tasks.chain import starting_state
from stylequeue.tasks.control import KEY_PREFIX, JobControl
from tests.service.fault_stack import Stack, job_spec, start_stack, wait_for

pytestmark = pytest.mark.timeout(240)


@pytest.fixture(scope="module")
def ist(s3_server, tmp_path_factory) -> Stack:
    with start_stack(s3_server, tmp_path_factory.mktemp("integrity")) as stack:
        stack.content = stack.put_png("in/content.png", (48, 32), 1)
        stack.other_content = stack.put_png("in/other.png", (48, 32), 77)
        stack.square = stack.put_png("in/square.png", (40, 40), 3)
        stack.style = stack.put_png("in/style.png", (40, 40), 2)
        yield stack


def _strict(data: bytes) -> Any:
    """json.loads that refuses NaN and Infinity, as JavaScript's and Go's parsers do."""
    def refuse(name: str) -> Any:
        raise ValueError(f"not JSON: {name}")

    return json.loads(data, parse_constant=refuse)


def _pixels(ist: Stack, uri: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(ist.get(uri))).convert("RGB").resize((48, 32)), dtype=np.float32)


def _cancel_after_checkpoint(ist: Stack, spec: dict[str, Any]) -> Any:
    job = submit(spec, app=ist.app)
    paths = JobPaths.for_spec(JobSpec.parse(spec), ist.settings)
    wait_for(lambda: paths.checkpoint.split("/", 3)[3] in ist.keys(), 120, "a checkpoint", logs=ist.logs)
    job.cancel()
    with pytest.raises(JobFailedError, match="cancelled"):
        job.wait(timeout=60)
    return job


def test_a_resubmitted_id_never_resumes_another_specs_checkpoint(ist: Stack) -> None:
    """Case 1: cancel a job after a checkpoint, submit its id with another content. Before, the
    new job "succeeded" by resuming the old checkpoint, with the old content's picture."""
    spec = job_spec(ist.content, ist.style, iterations=400, lr=0.001)
    _cancel_after_checkpoint(ist, spec)
    other = {**spec, "content": ist.other_content, "params": {**spec["params"], "iterations": 4}}
    with pytest.raises(JobSpecError, match=rf"job id {spec['job_id']} was submitted before with another spec.*replace=True"):
        submit(other, app=ist.app)
    summary = submit(other, app=ist.app, replace=True).wait(timeout=120)
    meta = _strict(ist.get(summary["metadata_uri"]))
    assert meta["steps"][0]["started_from"] == "fresh" and meta["steps"][0]["iterations_done"] == 4
    result = _pixels(ist, summary["result_uri"])  # 4 tiny steps from the content: still its picture
    assert np.abs(result - _pixels(ist, ist.other_content)).mean() < np.abs(result - _pixels(ist, ist.content)).mean()


def test_a_checkpoint_of_other_inputs_is_never_resumed(ist: Stack) -> None:
    """The checkpoint names its owner (the spec's digest and the inputs' bytes): one planted under
    a job's prefix by another run, or left by an input that was overwritten since, is ignored,
    whatever its shape (before: "cannot resume" failed every resubmission of the id)."""
    spec = job_spec(ist.content, ist.style, iterations=3)
    paths = JobPaths.for_spec(JobSpec.parse(spec), ist.settings)
    config = preset("default", size=32, iterations=3)
    foreign = OptimState(image=np.zeros(1), optimizer_state={}, iteration=2, scale_index=0,  # type: ignore[arg-type]
                         config=config.to_dict(), owner="someone-else")
    assert starting_state(foreign, config, 0, owner="me") == (None, "fresh")
    import torch

    planted = OptimState(torch.rand(1, 3, 40, 40), {}, 2, 0, config.to_dict(), owner="another-job")
    ist.put(paths.checkpoint.split("/", 3)[3], planted.to_bytes())
    summary = submit(spec, app=ist.app).wait(timeout=120)
    assert _strict(ist.get(summary["metadata_uri"]))["steps"][0]["started_from"] == "fresh"


def test_the_same_id_with_another_spec_is_refused(ist: Stack) -> None:
    """Case 2: before, the same id with other parameters silently returned the old result."""
    spec = job_spec(ist.content, ist.style)
    first = submit(spec, app=ist.app)
    first.wait(timeout=120)
    assert submit(spec, app=ist.app).job_id == first.job_id  # the same spec: the same job, run once
    assert submit({**spec, "priority": 1}, app=ist.app).job_id == first.job_id  # priority is no new job
    for change in ({"params": {**spec["params"], "style_weight": 5.0}}, {"styles": [ist.square]}):
        with pytest.raises(JobSpecError, match=rf"job id {spec['job_id']}.*another spec.*succeeded"):
            submit({**spec, **change}, app=ist.app, replace=True)  # a result exists: never replaced


def test_an_output_prefix_belongs_to_one_job(ist: Stack) -> None:
    """Case 3: an output pointing at another job's prefix "succeeded" with that job's result."""
    first = submit(job_spec(ist.content, ist.style), app=ist.app)
    first.wait(timeout=120)
    prefix = first.result_uri.rsplit("/", 1)[0]
    for output in (prefix, prefix + "/"):
        with pytest.raises(JobSpecError, match=rf"output {prefix} belongs to job {first.job_id}"):
            submit({**job_spec(ist.square, ist.style), "output": output}, app=ist.app)
    # Claims expire with the results: even then another job's result.json is never taken as ours.
    control = JobControl(ist.app)
    for key in ist.redis.client(1).keys(f"{KEY_PREFIX}output-*"):
        ist.redis.client(1).delete(key)
    before = ist.get(first.metadata_uri)
    late = submit({**job_spec(ist.square, ist.style), "output": prefix}, app=ist.app)
    with pytest.raises(JobFailedError, match=rf"OutputTakenError.*holds the result of job '{first.job_id}'"):
        late.wait(timeout=60)
    assert ist.get(first.metadata_uri) == before  # untouched
    assert control.record(late.job_id) is not None and late.status() is JobStatus.FAILED


def test_an_overflowing_loss_fails_clearly_and_no_metadata_holds_nan(ist: Stack) -> None:
    """Case 5: 1e300 is refused at submit (float32 ends at 3.4e38); settings that fit float32 but
    overflow the loss (here a step of 1e30 in the seed's unclamped space) end with
    NonFiniteLossError naming the iteration; every metadata file is strict JSON (before: bare NaN
    in result.json, and a black image that "succeeded")."""
    with pytest.raises(JobSpecError, match="at most 3.4e"):
        submit(job_spec(ist.content, ist.style, style_weight=1e300), app=ist.app)
    job = submit({**job_spec(ist.content, ist.style, iterations=4, lr=1e30), "preset": "seed"}, app=ist.app)
    with pytest.raises(JobFailedError, match=r"NonFiniteLossError: the loss became (inf|nan) by iteration \d.*lr 1e\+30"):
        job.wait(timeout=120)
    assert not [k for k in ist.keys(f"stylequeue/jobs/{job.job_id}/") if k.endswith("result.json")]
    good = submit(job_spec(ist.content, ist.style), app=ist.app).wait(timeout=120)
    _strict(ist.get(good["metadata_uri"]))
    for key in ist.keys("stylequeue/jobs/"):
        if key.endswith(".json"):
            _strict(ist.get(f"s3://{ist.bucket}/{key}"))


def test_spec_as_json_text_and_problems_found_before_a_gpu_is_taken(ist: Stack) -> None:
    """Case 7: submit() of JSON text was a raw ValueError from dict(); and a style image too small
    for the deepest layer failed on the GPU queue without naming the image."""
    spec = job_spec(ist.content, ist.style)
    assert submit(json.dumps(spec), app=ist.app).wait(timeout=120)["status"] == "succeeded"
    with pytest.raises(JobSpecError, match="not valid JSON"):
        submit("{not json", app=ist.app)
    thin = ist.put_png("in/thin-style.png", (2000, 4), 9)
    job = submit(job_spec(ist.content, thin), app=ist.app)
    with pytest.raises(JobFailedError, match=rf"style image {thin}: .*too small for VGG19 layer relu5_1"):
        job.wait(timeout=60)
    assert f"[{job.task_ids[1]}] received" not in ist.gpu[0].log_text()  # refused by validate


def test_storage_says_a_bucket_is_not_an_object(ist: Stack) -> None:
    from stylequeue.exceptions import UnsupportedURIError
    from stylequeue.worker.resources import resources_for

    with pytest.raises(UnsupportedURIError, match=rf"'s3://{ist.bucket}' names a bucket, not an object"):
        resources_for(ist.settings).storage.get_bytes(f"s3://{ist.bucket}")
    assert resources_for(ist.settings).storage.list(f"s3://{ist.bucket}/in/")  # prefixes still list


def test_a_job_id_of_unicode_look_alikes_is_refused_here_too() -> None:
    """Case 4 at the JobSpec level (the corpus sends these through submit)."""
    for bad in ("cat\n", "ca\u0442", "cat\u200b", "\u0441at", "cat\r", " cat"):
        with pytest.raises(JobSpecError, match="not a valid job id"):
            JobSpec.parse({"job_id": bad, "content": "s3://b/c.png", "styles": ["s3://b/s.png"]})
    assert JobSpec.parse({"job_id": "Cat_1-" + uuid.uuid4().hex, "content": "s3://b/c.png",
                          "styles": ["s3://b/s.png"]}).job_id.startswith("Cat_1-")
