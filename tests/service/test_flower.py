"""Flower for real: `stylequeue flower` and `stylequeue worker` processes on the test servers.

One stack for the module (a `stylequeue worker` launcher and a `stylequeue flower` process on the
session's Redis and S3), queues named for the module so no other test's worker takes its jobs, and
HTTP over loopback as a browser or Prometheus would use it.
"""

from __future__ import annotations

import base64
import ctypes.util
import html
import io
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pytest
from celery import Celery
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from stylequeue.exceptions import JobFailedError
from stylequeue.settings import load_settings
from stylequeue.tasks.app import TASK_PUBLISH, TASK_STYLIZE, TASK_VALIDATE, make_app
from testbed.net import free_port, wait_until
from testbed.redis import RedisServer
from testbed.s3 import S3Server
from testbed.workers import start_stylequeue, stop_process
from tests.service.conftest import module_service_env
from tests.service.fault_stack import wait_for
from tests.service.test_metrics import scrape

ROOT = Path(__file__).resolve().parents[2]
USER, PASSWORD = "ops", "flower-" + uuid.uuid4().hex[:12]
HOST = socket.gethostname()


@dataclass
class Stack:
    env: dict[str, str]
    app: Celery
    port: int
    bucket: str
    tmp: Path
    last_error: str = ""

    def get(self, path: str, auth: tuple[str, str] | None = (USER, PASSWORD)) -> tuple[int, bytes]:
        request = urllib.request.Request(f"http://127.0.0.1:{self.port}{path}")
        if auth:
            token = base64.b64encode(":".join(auth).encode()).decode()
            request.add_header("Authorization", f"Basic {token}")
        try:
            with urllib.request.urlopen(request, timeout=15) as resp:
                return resp.status, resp.read()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read()
        except OSError as exc:  # kept for the "not ready" message
            self.last_error = repr(exc)
            raise

    def json(self, path: str) -> Any:
        status, body = self.get(path)
        assert status == 200, (path, status, body[:300])
        return json.loads(body)

    def metrics(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        status, body = self.get("/metrics", auth=None)
        assert status == 200
        return {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(body.decode())
            for s in family.samples
        }


def png(seed: int, size: int = 40) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels, "RGB").save(buffer, "PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def stack(redis_server: RedisServer, s3_server: S3Server, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """One worker launcher and one Flower for the module: each takes ~20 s to start here.

    The environment is ``module_service_env``'s plus queues named for this module, progress on
    every iteration and Flower's credentials.
    """
    for server in (redis_server, s3_server):  # a fault test may have left one stopped
        if not server.running:
            server.start()
    tmp = tmp_path_factory.mktemp("flower")
    tag = uuid.uuid4().hex[:8]
    port = free_port()
    bucket = s3_server.make_bucket()
    env = {
        **os.environ,
        **module_service_env(redis_server, s3_server, bucket, tmp),
        # Databases of its own: other modules' fixtures flush theirs.
        "STYLEQUEUE_BROKER_URL": redis_server.url_for(4),
        "STYLEQUEUE_RESULT_BACKEND": redis_server.url_for(5),
        "STYLEQUEUE_GPU_QUEUE": f"gpu-{tag}",
        "STYLEQUEUE_LIGHT_QUEUE": f"light-{tag}",
        "STYLEQUEUE_PROGRESS_EVERY": "1",
        "STYLEQUEUE_FLOWER_BASIC_AUTH": f"{USER}:{PASSWORD}",
        # Where `stylequeue status` finds Flower (flower_url's default), and the launcher's metrics.
        "STYLEQUEUE_FLOWER_ADDRESS": "127.0.0.1",
        "STYLEQUEUE_FLOWER_PORT": str(port),
        "STYLEQUEUE_WORKER_METRICS_ADDRESS": "127.0.0.1",
        "STYLEQUEUE_WORKER_METRICS_PORT": str(free_port()),
        "OMP_NUM_THREADS": "1",
        "PYTHONUNBUFFERED": "1",
    }
    s3 = s3_server.client()
    for key, seed in (("in/content.png", 1), ("in/style.png", 2)):
        s3.put_object(Bucket=bucket, Key=key, Body=png(seed))
    app = make_app(load_settings(environ=env))
    worker = start_stylequeue(["worker", "--gpus", "0", "--concurrency-light", "1"], env, tmp / "worker.log")
    flower = start_stylequeue(["flower"], env, tmp / "flower.log")
    stack = Stack(env, app, port, bucket, tmp)
    try:
        wait_until(lambda: stack.get("/healthcheck", auth=None)[0] == 200, 120, "flower",
                   lambda: f"last error: {stack.last_error}\n" + (tmp / "flower.log").read_text(errors="replace"))
        yield stack
    finally:
        stop_process(flower, 20)
        stop_process(worker)
        app.close()
        s3_server.remove_bucket(bucket)


@pytest.fixture
def logs_on_failure(stack: Stack) -> Iterator[None]:
    """Print the worker's and Flower's logs, which pytest shows when the test fails."""
    yield
    for name in ("flower.log", "worker.log"):
        print(f"--- {name} ---\n{(stack.tmp / name).read_text(errors='replace')[-3000:]}")


def submit(stack: Stack, job_id: str, iterations: int, content: str = "in/content.png") -> Any:
    from stylequeue.scheduler import submit as submit_job

    return submit_job({
        "job_id": job_id,
        "content": f"s3://{stack.bucket}/{content}",
        "styles": [f"s3://{stack.bucket}/in/style.png"],
        "params": {"size": 32, "iterations": iterations},
    }, app=stack.app)


def test_flower_requires_basic_auth_but_serves_metrics_without_it(stack: Stack, logs_on_failure: None) -> None:
    for path in ("/", "/tasks", "/api/workers", "/api/tasks"):
        assert stack.get(path, auth=None)[0] == 401, path
        assert stack.get(path, auth=(USER, "wrong"))[0] == 401, path
    status, page = stack.get("/tasks")
    assert status == 200
    # The columns run_flower asks for (TASKS_COLUMNS), by their Flower labels.
    for label in (b"Name", b"State", b"Received", b"Started", b"Runtime", b"Worker", b"args", b"Result"):
        assert label in page, label
    # The documented truth (docs/monitoring.md): Flower 2.x checks no auth on these two.
    assert stack.get("/metrics", auth=None)[0] == 200
    assert stack.get("/healthcheck", auth=None)[0] == 200


def test_flower_shows_workers_tasks_progress_and_metrics(stack: Stack, logs_on_failure: None) -> None:
    gpu_node, light_node = f"cpu0@{HOST}", f"light@{HOST}"
    wait_until(lambda: {gpu_node, light_node} <= set(stack.json("/api/workers?refresh=1")), 60,
               "workers in Flower")

    job_id = f"flower-{uuid.uuid4().hex[:8]}"
    result = submit(stack, job_id, iterations=4).wait(timeout=180)
    assert result["status"] == "succeeded", result

    expected = {
        f"{job_id}.validate": (TASK_VALIDATE, light_node),
        f"{job_id}.stylize.0": (TASK_STYLIZE, gpu_node),
        f"{job_id}.publish": (TASK_PUBLISH, light_node),
    }

    def tasks_done() -> bool:
        tasks = stack.json("/api/tasks")
        return all(tasks.get(tid, {}).get("state") == "SUCCESS" for tid in expected)

    wait_until(tasks_done, 30, "task-succeeded events in Flower")
    tasks = stack.json("/api/tasks")
    for task_id, (name, node) in expected.items():
        assert (tasks[task_id]["name"], tasks[task_id]["worker"]) == (name, node)
    # Each row tells the job and its step (tasks/labels.py), and a finished step its real result.
    for task_id, step in zip(expected, ("step 1 of 3 · validate", "step 2 of 3 · stylize, scale 1 of 1",
                                        "step 3 of 3 · publish")):
        assert tasks[task_id]["args"] == f"job {job_id} · {step} · content.png styled as style.png"
    assert "'started_from': 'fresh'" in tasks[f"{job_id}.stylize.0"]["result"]

    samples = stack.metrics()
    progress = samples.get(("flower_events_total", (("task", TASK_STYLIZE), ("type", "task-progress"),
                                                    ("worker", gpu_node))), 0)
    assert progress >= 1, "no task-progress events counted for stylequeue.stylize"
    for name, node in set(expected.values()):
        key = ("flower_events_total", (("task", name), ("type", "task-succeeded"), ("worker", node)))
        assert samples.get(key, 0) >= 1, key
    assert samples[("flower_worker_online", (("worker", gpu_node),))] == 1
    assert samples[("flower_task_runtime_seconds_count", (("task", TASK_STYLIZE), ("worker", gpu_node)))] >= 1


def wait_for_progress(stack: Stack, task_id: str) -> dict[str, Any]:
    """Flower's /api/task/info of ``task_id`` once task-progress events have made it PROGRESS."""
    def in_progress() -> dict[str, Any] | None:
        status, body = stack.get(f"/api/task/info/{task_id}")
        info = json.loads(body) if status == 200 else {}
        return info if info.get("state") == "PROGRESS" else None

    return wait_for(in_progress, 120, f"PROGRESS state of {task_id} in Flower")


def datatable_rows(stack: Stack, search: str) -> dict[str, dict[str, Any]]:
    """The rows Flower's /tasks page asks for (/tasks/datatable, through format_task), by task id."""
    query = urllib.parse.urlencode({"draw": 1, "start": 0, "length": 50, "search[value]": search,
                                    "order[0][column]": 0, "order[0][dir]": "desc", "columns[0][data]": "received"})
    return {row["uuid"]: row for row in stack.json(f"/tasks/datatable?{query}")["data"]}


def cancel_and_wait(job: Any) -> None:
    job.cancel()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and job.status().value not in ("cancelled", "failed"):
        time.sleep(0.25)
    assert job.status().value == "cancelled"


def test_flower_shows_a_running_job_step_percentage_and_link(stack: Stack, logs_on_failure: None) -> None:
    """A long job: its stylize row says job, step, percentage and ETA while it runs; `stylequeue
    status` links to it; once cancelled, the page shows where it stopped."""
    job = submit(stack, f"flower-long-{uuid.uuid4().hex[:8]}", iterations=5000)
    task_id = f"{job.job_id}.stylize.0"
    label = f"job {job.job_id} · step 2 of 3 · stylize, scale 1 of 1 · content.png styled as style.png"
    try:
        info = wait_for_progress(stack, task_id)
        assert (info["name"], info["args"]) == (TASK_STYLIZE, label)
        shown = re.fullmatch(r"(\d+)% · iteration (\d+) of 5000 · ETA .+", info["result"])
        assert shown and int(shown[1]) == 100 * int(shown[2]) // 5000, info["result"]
        # Flower's search finds every task of the job by its id, each row labelled.
        tasks = stack.json(f"/api/tasks?search={job.job_id}")
        assert {f"{job.job_id}.validate", task_id} <= set(tasks)
        assert all(t["args"].startswith(f"job {job.job_id} · step ") for t in tasks.values())

        out = subprocess.run([sys.executable, "-m", "stylequeue", "status", job.job_id, "--json"],
                             env=stack.env, capture_output=True, text=True, timeout=60)
        link = json.loads(out.stdout)["flower_url"]
        assert link == f"http://127.0.0.1:{stack.port}/task/{task_id}", out.stderr
        status, page = stack.get(urllib.parse.urlsplit(link).path)
        assert status == 200 and label.encode() in page and b"% \xc2\xb7 iteration " in page
    finally:
        cancel_and_wait(job)
    row = wait_for(lambda: (r := datatable_rows(stack, job.job_id).get(task_id)) and r["revoked"] and r, 30,
                   "the revoke in Flower")
    assert row["state"] == "REVOKED" and re.fullmatch(r"stopped at \d+% · iteration \d+ of 5000", row["result"])
    assert row["args"] == label


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def chromium(stack: Stack, path: str, profile: Path, *args: str) -> str:
    """Headless chromium on a Flower page as a user sees it (JavaScript run, the table filled by
    /tasks/datatable), logged in by the URL's credentials; its stdout (``--dump-dom``: the DOM)."""
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={profile}", "--window-size=1600,700", "--virtual-time-budget=5000"]
    url = f"http://{USER}:{PASSWORD}@127.0.0.1:{stack.port}{path}"
    done = subprocess.run([CHROMIUM, *flags, *args, url], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


@pytest.mark.skipif(CHROMIUM is None, reason="no chromium to render Flower's page: apt-get install -y chromium "
                    "(.ci/run installs it)")
def test_tasks_page_shows_the_job_in_a_browser(stack: Stack, tmp_path: Path, logs_on_failure: None) -> None:
    """Flower's /tasks page, rendered: the running job's row reads job, step, percentage and ETA.

    With STYLEQUEUE_TEST_SCREENSHOT=<file.png> it also saves a screenshot (docs/images/flower_jobs.png).
    """
    job = submit(stack, f"flower-page-{uuid.uuid4().hex[:8]}", iterations=5000)
    task_id = f"{job.job_id}.stylize.0"
    try:
        wait_for_progress(stack, task_id)
        dom = chromium(stack, "/tasks", tmp_path / "profile", "--dump-dom")
        if os.environ.get("STYLEQUEUE_TEST_SCREENSHOT"):
            chromium(stack, "/tasks", tmp_path / "shot", f"--screenshot={os.environ['STYLEQUEUE_TEST_SCREENSHOT']}")
    finally:
        cancel_and_wait(job)
    headers = re.findall(r'<th[^>]*data-column="(\w+)"', dom)
    assert headers[:3] == ["args", "state", "result"], headers  # the job first
    row = re.search(rf'<tr id="{re.escape(task_id)}".*?</tr>', dom, re.S)
    assert row, f"no row for {task_id} in the rendered page:\n{dom[-3000:]}"
    cells = [html.unescape(re.sub(r"<[^>]+>", "", cell)) for cell in re.findall(r"<td[^>]*>(.*?)</td>", row[0], re.S)]
    assert cells[0] == f"job {job.job_id} · step 2 of 3 · stylize, scale 1 of 1 · content.png styled as style.png"
    assert cells[1] == "PROGRESS"
    assert re.fullmatch(r"\d+% · iteration \d+ of 5000 · ETA .+", cells[2]), cells


def test_worker_endpoint_serves_process_metrics_and_no_gpu_on_a_cpu_node(stack: Stack) -> None:
    """The real `stylequeue worker` launcher's /metrics (worker_metrics_port) on this CPU machine."""
    from stylequeue.worker.metrics import GPU_METRICS

    samples = scrape(int(stack.env["STYLEQUEUE_WORKER_METRICS_PORT"]))
    up = {dict(labels)["worker"]: value for (name, labels), value in samples.items()
          if name == "stylequeue_worker_process_up" and dict(labels)["hostname"] == HOST}
    assert up == {"cpu0": 1, "light": 1}
    if ctypes.util.find_library("nvidia-ml") is None:  # no NVML: the GPU series are absent, not 0
        assert samples[("stylequeue_worker_gpus", (("hostname", HOST),))] == 0
        assert not {name for name, _ in samples} & set(GPU_METRICS)


DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "stylequeue.json"


def dashboard_selectors() -> list[tuple[str, str, list[Any]]]:
    """(panel, metric, label matchers) of every series the dashboard's PromQL reads; a query
    promql-parser cannot parse fails here."""
    import promql_parser

    panels = json.loads(DASHBOARD.read_text())["panels"]
    panels += [inner for panel in panels for inner in panel.get("panels", [])]
    found: list[tuple[str, str, list[Any]]] = []
    for panel in panels:
        for target in panel.get("targets", []):
            tree = promql_parser.parse(target["expr"].replace("$__rate_interval", "1m"))

            def visit(node: Any, title: str = panel["title"]) -> bool:
                if isinstance(node, promql_parser.VectorSelector):
                    found.append((title, node.name, list(node.matchers.matchers)))
                return True

            promql_parser.walk(tree, visit)
    return found


def selects(matchers: list[Any], labels: dict[str, str]) -> bool:
    """Whether a series with ``labels`` passes the ``=`` and ``=~`` matchers (the ones that pick)."""
    from promql_parser import MatchOp

    value = labels.get
    return all(value(m.name, "") == m.value if m.op == MatchOp.Equal
               else re.fullmatch(m.value, value(m.name, "")) is not None if m.op == MatchOp.Re
               else True for m in matchers)


def test_dashboard_reads_only_series_the_exporters_serve(stack: Stack, tmp_path: Path, logs_on_failure: None) -> None:
    """Every metric the Grafana dashboard queries is served by a real exporter, with series its
    label matchers select (after a job that succeeded and one that failed); the GPU metrics,
    absent here, must be exactly the ones the GPU collector declares."""
    from stylequeue.worker.metrics import GPU_METRICS

    done, failing = submit(stack, f"dash-{uuid.uuid4().hex[:8]}", 4), submit(
        stack, f"dash-missing-{uuid.uuid4().hex[:8]}", 4, content="in/missing.png")
    assert done.wait(timeout=120)["status"] == "succeeded"
    with pytest.raises(JobFailedError):
        failing.wait(timeout=60)
    port = free_port()
    exporter = start_stylequeue(["metrics", "--port", str(port), "--address", "127.0.0.1"], stack.env,
                                tmp_path / "metrics.log")
    try:
        wait_for(lambda: any(n == "stylequeue_broker_up" and v == 1 for (n, _), v in _try_scrape(port).items()),
                 60, "stylequeue metrics", logs=lambda: (tmp_path / "metrics.log").read_text(errors="replace"))
        wait_for(lambda: any(n == "flower_events_total" and ("type", "task-failed") in labels
                             for n, labels in scrape(stack.port)), 30, "the failure in Flower's metrics")
        served = {**scrape(port), **scrape(stack.port), **scrape(int(stack.env["STYLEQUEUE_WORKER_METRICS_PORT"]))}
    finally:
        stop_process(exporter, 20)
    selectors = dashboard_selectors()
    assert len(selectors) >= 15, selectors
    used_gpu = set()
    for panel, name, matchers in selectors:
        if name in GPU_METRICS or name.startswith("stylequeue_gpu"):
            assert name in GPU_METRICS, f"panel {panel!r} reads {name}, which the GPU collector does not declare"
            used_gpu.add(name)
            continue
        series = [dict(labels) for n, labels in served if n == name]
        assert series, f"panel {panel!r} reads {name}, which no exporter serves"
        assert any(selects(matchers, labels) for labels in series), \
            f"panel {panel!r}: no served {name} series matches {[str(m) for m in matchers]}: {series}"
    assert used_gpu == set(GPU_METRICS), "every per-GPU series the worker serves has a panel"


def _try_scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    try:
        return scrape(port)
    except OSError:
        return {}


def test_healthcheck_script_pings_the_workers_of_this_host(stack: Stack, logs_on_failure: None) -> None:
    wait_until(lambda: {f"cpu0@{HOST}", f"light@{HOST}"} <= set(stack.json("/api/workers?refresh=1")),
               60, "workers")
    env = {**stack.env, "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}"}
    script = str(ROOT / "deploy" / "healthcheck.sh")
    ok = subprocess.run(["sh", script], env={**env, "HEALTHCHECK_NODES": "cpu0 light"},
                        capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    missing = subprocess.run(["sh", script],
                             env={**env, "HEALTHCHECK_NODES": "cpu0 gpu7", "HEALTHCHECK_TIMEOUT": "2"},
                             capture_output=True, text=True, timeout=120)
    assert missing.returncode == 1 and f"gpu7@{HOST}" in missing.stderr


@pytest.mark.parametrize(
    ("auth", "expected"),
    [
        ("", ("STYLEQUEUE_FLOWER_BASIC_AUTH=user:password", "STYLEQUEUE_FLOWER_INSECURE_NO_AUTH=1")),
        ("admin", ("'user:password' pairs",)),
    ],
)
def test_flower_refuses_to_start_without_valid_auth(
    tmp_path: Path, auth: str, expected: tuple[str, ...]
) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("STYLEQUEUE_", "FLOWER_"))}
    env.update(STYLEQUEUE_DATA_DIR=str(tmp_path), STYLEQUEUE_FLOWER_BASIC_AUTH=auth)
    result = subprocess.run([sys.executable, "-m", "stylequeue", "flower", "--port", str(free_port())],
                            env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    for text in expected:
        assert text in result.stderr


def test_format_task_truncates_long_fields_for_the_tasks_page() -> None:
    from types import SimpleNamespace

    from stylequeue.monitoring.flower import MAX_FIELD_CHARS, format_task

    task = SimpleNamespace(args="x" * 5000, kwargs="{'step': 0}", result=None)
    shown = format_task(task)
    assert len(shown.args) == MAX_FIELD_CHARS and shown.args.endswith("...")
    assert (shown.kwargs, shown.result) == ("{'step': 0}", None)

