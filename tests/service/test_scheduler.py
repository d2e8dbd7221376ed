"""The producer API beyond single jobs: batches with a contact sheet, manifests, beat's periodic work.

Pure functions (layout, manifest parsing) are tested directly; everything that queues runs on
real workers, Redis and S3.
"""

from __future__ import annotations

import io
import json
import time
import uuid

import pytest
from PIL import Image

from stylequeue.exceptions import ConfigError, JobSpecError
from stylequeue.scheduler import get_job, parse_manifest, submit, submit_batch, submit_manifest
from stylequeue.contact_sheet import make_contact_sheet, plan_layout
from stylequeue.tasks.app import TASK_EXPIRE_PREVIEWS, TASK_SCAN_MANIFESTS
from testbed.workers import Beat
from tests.conftest import make_image

pytestmark = pytest.mark.timeout(240)


def _keys(service, prefix: str) -> list[str]:
    key_prefix = prefix[len(f"s3://{service.bucket}/"):]
    page = service.s3.list_objects_v2(Bucket=service.bucket, Prefix=key_prefix)
    return [o["Key"] for o in page.get("Contents", [])]


@pytest.fixture(scope="module")
def images(service_workers) -> dict[str, str]:
    return {
        "content": service_workers.put_png("in/content.png", (40, 32), 1),
        "content2": service_workers.put_png("in/content2.png", (32, 40), 4),
        "styles": [service_workers.put_png(f"in/style{i}.png", (32, 32), 10 + i) for i in range(3)],
    }


# --- pure parts --------------------------------------------------------------------------------

def test_contact_sheet_layout_is_a_near_square_grid() -> None:
    assert (plan_layout(3, tile=64).columns, plan_layout(3, tile=64).rows) == (2, 2)
    assert (plan_layout(4, tile=64).columns, plan_layout(4, tile=64).rows) == (2, 2)
    layout = plan_layout(5, tile=50, padding=2, labels=False)
    assert (layout.columns, layout.rows) == (3, 2) and layout.size == (3 * 52 + 2, 2 * 52 + 2)
    sheet = make_contact_sheet([make_image(30, 20, seed=i) for i in range(5)], tile=50, padding=2,
                               labels=[str(i) for i in range(5)])
    assert sheet.size == (3 * 52 + 2, 2 * (50 + 12 + 2) + 2)
    with pytest.raises(ValueError):
        plan_layout(0, tile=10)


def test_manifest_parsing_validates_every_job_first() -> None:
    text = """
defaults: {params: {size: 32, iterations: 2}}
jobs:
  - {job_id: a, content: "s3://b/c.png", styles: ["s3://b/s.png"]}
  - {job_id: b, content: "s3://b/c.png", styles: ["s3://b/s.png"], params: {size: 48}}
"""
    specs = parse_manifest(text, "m.yaml")
    assert [s.job_id for s in specs] == ["a", "b"]
    as_json = json.dumps([{"job_id": "j", "content": "s3://b/c.png", "styles": ["s3://b/s.png"]}])
    assert [s.job_id for s in parse_manifest(as_json, "m.json")] == ["j"]
    with pytest.raises(JobSpecError, match="job #2"):
        parse_manifest('[{"job_id": "x", "content": "s3://b/c.png", "styles": ["s3://b/s.png"]},'
                       ' {"job_id": "y", "content": "s3://b/c.png"}]', "m.json")
    with pytest.raises(JobSpecError, match="more than once"):
        parse_manifest('[{"job_id": "x", "content": "s3://b/c", "styles": ["s3://b/s"]},'
                       ' {"job_id": "x", "content": "s3://b/c", "styles": ["s3://b/s"]}]', "m.json")
    with pytest.raises(JobSpecError, match="not valid YAML"):
        parse_manifest("jobs: [unclosed", "m.yaml")


# --- against the workers -----------------------------------------------------------------------

def test_invalid_spec_is_refused_before_anything_is_queued(service, images) -> None:
    import redis

    broker = redis.Redis.from_url(service.settings.broker_url)
    before = {q: broker.llen(q) for q in ("gpu", "light")}
    with pytest.raises(JobSpecError):
        submit({"job_id": "bad-1", "content": images["content"], "styles": [], "bogus": 1}, app=service.app)
    with pytest.raises(ConfigError):
        submit({"job_id": "bad-2", "content": images["content"], "styles": images["styles"][:1],
                "params": {"style_weight": float("nan")}}, app=service.app)
    with pytest.raises(JobSpecError, match="content"):  # another bucket: outside the allow-list
        submit({"job_id": "bad-3", "content": "s3://someone-elses-bucket/c.png",
                "styles": images["styles"][:1]}, app=service.app)
    assert {q: broker.llen(q) for q in ("gpu", "light")} == before
    with pytest.raises(JobSpecError, match="no job with id"):
        get_job("bad-1", app=service.app)


def test_chain_carries_the_job_priority_and_derived_task_ids(service, images) -> None:
    from stylequeue.job import JobSpec
    from stylequeue.scheduler.jobs import build_chain, task_ids

    spec = JobSpec.parse({"job_id": "prio", "content": images["content"], "styles": images["styles"][:1],
                          "priority": 1, "params": {"scales": 3, "size": 64, "min_size": 16}})
    ids = task_ids("prio", 3)
    assert ids == ["prio.validate", "prio.stylize.0", "prio.stylize.1", "prio.stylize.2", "prio.publish"]
    tasks = build_chain(service.app, spec, ids).tasks
    assert [t.task for t in tasks] == ["stylequeue.validate", *["stylequeue.stylize"] * 3, "stylequeue.publish"]
    assert all(t.options["priority"] == 1 and t.immutable for t in tasks)
    assert [t.kwargs.get("step") for t in tasks] == [None, 0, 1, 2, None]
    assert [t.options["task_id"] for t in tasks] == ids


def test_batch_one_content_many_styles_with_a_contact_sheet(service, images) -> None:
    batch = submit_batch([images["content"]], images["styles"], batch_id=f"b-{uuid.uuid4().hex[:6]}",
                         tile=64, params={"size": 32, "iterations": 2}, app=service.app)
    assert len(batch.jobs) == 3
    sheet_info = batch.wait(timeout=180)
    assert sheet_info["jobs"] == [j.job_id for j in batch.jobs]
    sheet = Image.open(io.BytesIO(service.get(batch.sheet_uri)))
    layout = plan_layout(3, tile=64)
    assert sheet.size == layout.size == (sheet_info["width"], sheet_info["height"])
    assert batch.sheet_uri.endswith(f"/batches/{batch.batch_id}/contact_sheet.png")
    for job in batch.jobs:
        assert job.result()["status"] == "succeeded"


def test_batch_many_contents_one_style(service, images) -> None:
    batch = submit_batch([images["content"], images["content2"]], images["styles"][:1],
                         tile=32, params={"size": 32, "iterations": 2}, app=service.app)
    info = batch.wait(timeout=180)
    assert Image.open(io.BytesIO(service.get(batch.sheet_uri))).size == plan_layout(2, tile=32).size
    assert len(info["jobs"]) == 2
    with pytest.raises(JobSpecError, match="one content with many styles"):
        submit_batch([images["content"], images["content2"]], images["styles"][:2], app=service.app)


def test_manifest_keeps_to_its_limit_in_flight(service, images, tmp_path) -> None:
    tag = uuid.uuid4().hex[:6]
    manifest = tmp_path / "jobs.yaml"
    jobs = [{"job_id": f"m-{tag}-{i}", "content": images["content"], "styles": [images["styles"][i]]}
            for i in range(3)]
    manifest.write_text(json.dumps({"defaults": {"params": {"size": 32, "iterations": 2}}, "jobs": jobs}))
    report = submit_manifest(manifest, max_in_flight=1, app=service.app, poll_s=0.1)
    assert report.ok and list(report.statuses) == [j["job_id"] for j in jobs]
    assert report.max_seen_in_flight == 1
    # With one in flight, each job was submitted only after the one before it had published.
    from stylequeue.tasks.control import JobControl

    control = JobControl(service.app)
    published = [json.loads(service.get(report.results[j["job_id"]]["metadata_uri"]))["published_at"]
                 for j in jobs]
    submitted = [control.record(j["job_id"])["submitted_at"] for j in jobs]
    assert submitted[1] >= published[0] and submitted[2] >= published[1]


def test_scan_manifests_picks_up_dropped_manifests(service, images) -> None:
    root = f"{service.settings.resolved_storage_root}/manifests"
    key_root = root[len(f"s3://{service.bucket}/"):]
    job_id = f"drop-{uuid.uuid4().hex[:6]}"
    good = {"jobs": [{"job_id": job_id, "content": images["content"], "styles": images["styles"][:1],
                      "params": {"size": 32, "iterations": 2}}]}
    service.s3.put_object(Bucket=service.bucket, Key=f"{key_root}/incoming/good.json", Body=json.dumps(good))
    service.s3.put_object(Bucket=service.bucket, Key=f"{key_root}/incoming/bad.yaml", Body=b"jobs: [{job_id: 1")
    outcome = service.app.send_task(TASK_SCAN_MANIFESTS).get(timeout=60)
    assert outcome["submitted"] == {"good.json": [job_id]} and list(outcome["failed"]) == ["bad.yaml"]
    assert _keys(service, f"{root}/incoming/") == []
    assert f"{key_root}/processed/good.json" in _keys(service, f"{root}/processed/")
    assert f"{key_root}/failed/bad.yaml.error.txt" in _keys(service, f"{root}/failed/")
    assert get_job(job_id, app=service.app).wait(timeout=120)["status"] == "succeeded"


def test_expire_previews_deletes_only_old_previews(service) -> None:
    root = service.settings.resolved_storage_root[len(f"s3://{service.bucket}/"):]
    now = int(time.time())
    old = f"{root}/jobs/expiry-test/previews/it000002-t{now - 30 * 86400}.png"
    new = f"{root}/jobs/expiry-test/previews/it000004-t{now}.png"
    for key in (old, new):
        service.s3.put_object(Bucket=service.bucket, Key=key, Body=b"png")
    outcome = service.app.send_task(TASK_EXPIRE_PREVIEWS).get(timeout=60)
    assert outcome["deleted"] >= 1
    keys = _keys(service, f"s3://{service.bucket}/{root}/jobs/expiry-test/")
    assert keys == [new]


def test_beat_sends_the_periodic_tasks(service, images, tmp_path) -> None:
    """`stylequeue beat` with a 1 s manifest scan: a dropped manifest's job gets done."""
    key_root = f"{service.settings.resolved_storage_root}/manifests"[len(f"s3://{service.bucket}/"):]
    job_id = f"beat-{uuid.uuid4().hex[:6]}"
    manifest = [{"job_id": job_id, "content": images["content"], "styles": images["styles"][:1],
                 "params": {"size": 32, "iterations": 2}}]
    with Beat({**service.env, "STYLEQUEUE_SCAN_MANIFESTS_EVERY_S": "1"}, tmp_path / "beat") as beat:
        service.s3.put_object(Bucket=service.bucket, Key=f"{key_root}/incoming/beat.json",
                              Body=json.dumps(manifest))
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                handle = get_job(job_id, app=service.app)
                break
            except JobSpecError:
                time.sleep(0.3)
        else:
            raise AssertionError(beat.log_text()[-3000:])
        assert handle.wait(timeout=120)["status"] == "succeeded"
    assert "stylequeue.scan_manifests" in beat.log_text()


def test_chain_steps_carry_the_default_priority_unless_the_spec_sets_one(tmp_path) -> None:
    """A producer's send_task does not apply task_default_priority by itself (a worker's does):
    without an explicit priority the job would jump every queue at priority 0."""
    from stylequeue.job import JobSpec
    from stylequeue.scheduler.jobs import build_chain, task_ids
    from stylequeue.settings import load_settings
    from stylequeue.tasks.app import make_app

    app = make_app(load_settings(environ={"STYLEQUEUE_DATA_DIR": str(tmp_path)}))
    base = {"content": "s3://b/c.png", "styles": ["s3://b/s.png"], "job_id": "prio"}
    default = build_chain(app, JobSpec.parse(base), task_ids("prio", 1))
    assert [sig.options["priority"] for sig in default.tasks] == [app.conf.task_default_priority] * 3
    urgent = build_chain(app, JobSpec.parse({**base, "priority": 0}), task_ids("prio", 1))
    assert [sig.options["priority"] for sig in urgent.tasks] == [0, 0, 0]
