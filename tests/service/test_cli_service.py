"""``stylequeue submit / status / cancel / recover / manifest`` as real subprocesses against real workers."""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from stylequeue.cli.submit import parse_params
from stylequeue.exceptions import ConfigError
from stylequeue.tasks.control import JobControl
from tests.conftest import make_image

pytestmark = pytest.mark.timeout(240)


def _cli(service, *args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, **service.env, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "stylequeue", *args], env=env, capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture(scope="module")
def local_images(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("cli-images")
    paths = {"content": folder / "content.png", "style": folder / "style.jpg"}
    make_image(40, 32, seed=1).save(paths["content"])
    make_image(32, 32, seed=2).save(paths["style"], quality=95)
    return paths


def test_parse_params_reads_json_values() -> None:
    assert parse_params(["size=64", "original_colors=true", "lr=0.5", "optimizer=lbfgs",
                         "style_layers=[\"relu1_1\"]"]) == {
        "size": 64, "original_colors": True, "lr": 0.5, "optimizer": "lbfgs", "style_layers": ["relu1_1"]}
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        parse_params(["size"])


def test_submit_wait_uploads_local_files_and_prints_the_result(service, local_images) -> None:
    job_id = f"cli-{uuid.uuid4().hex[:8]}"
    run = _cli(service, "submit", str(local_images["content"]), str(local_images["style"]),
               "--job-id", job_id, "--param", "size=32", "--param", "iterations=3", "--wait", "--json")
    assert run.returncode == 0, run.stderr + service.logs()
    result = json.loads(run.stdout)
    assert result["job_id"] == job_id and result["status"] == "succeeded" and result["random_weights"]
    bucket, key = result["result_uri"][len("s3://"):].split("/", 1)
    assert service.s3.head_object(Bucket=bucket, Key=key)["ContentLength"] > 0
    # Local inputs were uploaded content-addressed under <storage_root>/inputs/.
    digest = hashlib.sha256(local_images["content"].read_bytes()).hexdigest()
    root_key = service.settings.resolved_storage_root[len(f"s3://{service.bucket}/"):]
    service.s3.head_object(Bucket=service.bucket, Key=f"{root_key}/inputs/{digest}.png")

    status = _cli(service, "status", job_id, "--json")
    assert status.returncode == 0, status.stderr
    info = json.loads(status.stdout)
    assert info["status"] == "succeeded" and info["result"]["result_uri"] == result["result_uri"]
    assert info["flower_url"] == f"{service.settings.resolved_flower_url}/task/{job_id}.publish"  # the last task
    plain = _cli(service, "status", job_id)
    assert plain.stdout.startswith(f"{job_id}: succeeded") and "result: s3://" in plain.stdout
    assert f"  flower: {info['flower_url']}\n" in plain.stdout


def test_submit_refuses_a_bad_spec_and_status_an_unknown_id(service, local_images) -> None:
    bad = _cli(service, "submit", str(local_images["content"]), str(local_images["style"]),
               "--param", "iterations=0")
    assert bad.returncode == 2 and "iterations" in bad.stderr and "Traceback" not in bad.stderr
    unknown = _cli(service, "status", f"nope-{uuid.uuid4().hex[:6]}")
    assert unknown.returncode == 2 and "no job with id" in unknown.stderr


def test_cancel_from_the_command_line(service, local_images) -> None:
    from stylequeue.scheduler import get_job

    job_id = f"cli-cancel-{uuid.uuid4().hex[:6]}"
    sub = _cli(service, "submit", str(local_images["content"]), str(local_images["style"]),
               "--job-id", job_id, "--param", "size=64", "--param", "iterations=100000")
    assert sub.returncode == 0 and sub.stdout.strip() == job_id, sub.stderr
    job = get_job(job_id, app=service.app)
    deadline = time.monotonic() + 90
    while job.progress() is None:
        assert time.monotonic() < deadline, "the job never started"
        time.sleep(0.2)
    cancel = _cli(service, "cancel", job_id)
    assert cancel.returncode == 0 and "cancel requested" in cancel.stdout
    deadline = time.monotonic() + 15
    while job.status().value != "cancelled":
        assert time.monotonic() < deadline, job.status()
        time.sleep(0.2)
    info = json.loads(_cli(service, "status", job_id, "--json").stdout)
    assert info["status"] == "cancelled" and info["result"] is None and "cancelled" in info["error"]
    assert info["flower_url"].endswith(f"/task/{job_id}.stylize.0")  # where it stopped, not publish
    # `stylequeue recover` sweeps once: the cancelled job has ended and is no longer watched.
    assert job_id in JobControl(service.app).active_jobs()
    sweep = _cli(service, "recover")
    assert sweep.returncode == 0, sweep.stderr
    report = json.loads(sweep.stdout)
    assert report["ended"] >= 1 and report["resent"] == [] and report["skipped"] == ""
    assert job_id not in JobControl(service.app).active_jobs()


def test_manifest_command(service, tmp_path) -> None:
    for name, seed in (("m-content.png", 5), ("m-style.png", 6)):
        buffer = io.BytesIO()
        make_image(32, 32, seed=seed).save(buffer, "PNG")
        service.s3.put_object(Bucket=service.bucket, Key=f"in/{name}", Body=buffer.getvalue())
    tag = uuid.uuid4().hex[:6]
    manifest = tmp_path / "m.yaml"
    manifest.write_text(
        "defaults:\n  params: {size: 32, iterations: 2}\njobs:\n"
        + "".join(f"  - {{job_id: man-{tag}-{i}, content: \"s3://{service.bucket}/in/m-content.png\", "
                  f"styles: [\"s3://{service.bucket}/in/m-style.png\"]}}\n" for i in range(2))
    )
    run = _cli(service, "manifest", str(manifest), "--max-in-flight", "1", "--json")
    assert run.returncode == 0, run.stderr
    report = json.loads(run.stdout)
    assert report["statuses"] == {f"man-{tag}-0": "succeeded", f"man-{tag}-1": "succeeded"}
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"job_id": "x", "content": "ftp://nowhere/c.png", "styles": ["s3://b/s"]}]))
    refused = _cli(service, "manifest", str(bad))
    assert refused.returncode == 2 and "job #1" in refused.stderr
