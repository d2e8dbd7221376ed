"""``scripts/demo.sh`` as a new user runs it, and ``stylequeue demo``'s ways of ending.

The first two tests run the script from a fresh copy of the tree (the files git tracks, as they are
in this checkout) with HOME and the XDG folders in a temporary folder, no ``STYLEQUEUE_*`` server
settings (the embedded default: filesystem broker and results, ``file://`` storage), no Redis or
S3, and ``STYLEQUEUE_WEIGHTS=random:0``: once in service mode from another working directory, once
``--local`` from the copy's root.

What they cover: scripts/setup.sh end to end (it makes the virtual environment, pip resolves
requirements.txt, the copy is installed editable, the import check runs, the stamp is written and
skips the second run), demo.sh's two modes, the worker started, followed and stopped, the result
and its metadata, the console. What they do not cover: downloading torch and the rest from PyPI
(5.5 GB, minutes). The new environment finds the packages of the one running the tests through
PYTHONPATH (a folder of links to them that leaves out stylequeue, pip and setuptools, so the new
environment's own pip installs the copy), and setup.sh is given this interpreter's base Python
(``PYTHON``, which setup.sh reads) so the compiled packages match; pip still fetches setuptools
(the build backend, and a dependency of torch) from the index it is configured with, as for a new
user. The default size (256 px) is not run here: README gives its time, measured by hand.

The last two run ``stylequeue demo`` with this interpreter: a job that fails (exit 3, its error
printed; a stale message left in the broker is not run) and Ctrl-C while the job runs (the job
cancelled, exit 130; a second demo on the same folder refused meanwhile). Every test that starts a
worker checks with ``ps`` that no process of it is left.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import sysconfig
import time
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from tests.conftest import make_image

ROOT = Path(__file__).resolve().parents[1]
OUT = "out/chelsea_starry_night.png"
# Not the project, nor the packaging tools: the new environment's own pip must install the copy.
NOT_LINKED = ("stylequeue", "__editable__", "pip", "setuptools", "_distutils_hack", "pkg_resources",
              "distutils-precedence.pth", "__pycache__")


def _copy_tracked_tree(dest: Path) -> None:
    files = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    for name in filter(None, files.decode().split("\0")):
        source = ROOT / name
        if source.is_file():  # a tracked file deleted in this checkout is not part of it
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, dest / name)


def _package_links(dest: Path) -> Path:
    dest.mkdir()
    for folder in {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}:
        for entry in Path(folder).iterdir():
            if not entry.name.startswith(NOT_LINKED) and not (dest / entry.name).exists():
                (dest / entry.name).symlink_to(entry)
    return dest


def _workers_left(marker: str) -> list[str]:
    """Processes whose command line or environment holds ``marker`` (what ``ps e`` shows)."""
    listing = subprocess.run(["ps", "-e", "-ww", "e", "-o", "pid=,args="], capture_output=True, text=True,
                             check=True).stdout
    return [line.strip()[:300] for line in listing.splitlines()
            if marker in line and not line.split(None, 1)[1].startswith("ps ")]


@pytest.fixture(scope="module")
def new_user(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A copy of the tree, a new user's environment, and the service-mode run from another folder."""
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("needs a git checkout to copy the tracked tree from")
    tmp = tmp_path_factory.mktemp("new-user")
    clone, home, elsewhere = tmp / "stylequeue", tmp / "home", tmp / "elsewhere"
    _copy_tracked_tree(clone)
    elsewhere.mkdir()
    venv = tmp / "venv"
    env = {"PATH": os.environ["PATH"], "HOME": str(home), "XDG_DATA_HOME": str(home / ".local/share"),
           "XDG_CACHE_HOME": str(home / ".cache"), "XDG_CONFIG_HOME": str(home / ".config"), "LANG": "C.UTF-8",
           "PYTHONPATH": str(_package_links(tmp / "packages")), "PYTHON": sys._base_executable,
           "STYLEQUEUE_VENV": str(venv), "STYLEQUEUE_WEIGHTS": "random:0", "OMP_NUM_THREADS": "1"}
    started = time.monotonic()
    run = subprocess.run([str(clone / "scripts/demo.sh"), "--size", "48", "--iterations", "60", "--device", "cpu",
                          "--progress-every", "2"], cwd=elsewhere, env=env, capture_output=True, text=True, timeout=240)
    return {"clone": clone, "env": env, "venv": venv, "run": run, "seconds": time.monotonic() - started}


def test_demo_runs_the_sample_job_on_the_service_and_stops_its_worker(new_user: dict[str, Any]) -> None:
    run, clone = new_user["run"], new_user["clone"]
    assert run.returncode == 0, run.stdout + run.stderr
    # The copy's own code ran, from its new environment (not this checkout's).
    assert not _workers_left(str(new_user["venv"]))
    assert not _workers_left(f"STYLEQUEUE_DATA_DIR={clone}")
    assert "stylequeue demo: worker stopped" in run.stderr and "nothing of it is left running" in run.stderr
    job_id = run.stdout.split(":", 1)[0]
    assert job_id.startswith("demo-")
    # The line `stylequeue status` prints, then where the result and its metadata are.
    lines = dict(line.split(None, 1) for line in run.stdout.splitlines() if line.startswith(("result:", "metadata:")))
    assert run.stdout.startswith(f"{job_id}: succeeded\n  result: file://{clone}/out/.stylequeue-demo/objects/jobs/")
    result, metadata = Path(lines["result:"]), Path(lines["metadata:"])
    assert result.parent == clone / "out/.stylequeue-demo/objects/jobs" / job_id
    with Image.open(result) as image, Image.open(clone / OUT) as copied:
        assert max(image.size) == 48 and copied.tobytes() == image.tobytes()
    record = json.loads(metadata.read_text())
    assert json.loads((clone / (OUT + ".json")).read_text()) == record
    assert record["job_id"] == job_id and record["random_weights"] is True
    assert record["spec"]["params"] == {"size": 48, "iterations": 60}
    assert record["settings"]["device"] == "cpu" and record["settings"]["progress_every"] == 2
    assert "RANDOM VGG19 weights" in run.stderr
    # The bar was drawn from JobHandle.progress() while the job ran, not only filled in at the end.
    seen = {int(n) for n in re.findall(rf"{job_id} running: .*?(\d+)/60 \[", run.stderr)}
    assert any(0 < n < 60 for n in seen), run.stderr
    assert re.search(rf"{job_id} succeeded: 100%.*? 60/60 \[", run.stderr)


def test_local_mode_from_the_root_skips_the_set_up_it_has_done(new_user: dict[str, Any]) -> None:
    venv, clone = new_user["venv"], new_user["clone"]
    stamps = list(venv.glob(".stylequeue-*-requirements.txt"))
    assert len(stamps) == 1
    installed = sorted(p.name for p in (venv / "lib").rglob("site-packages/*"))
    before = stamps[0].stat().st_mtime_ns
    started = time.monotonic()
    run = subprocess.run(["scripts/demo.sh", "--local", "--size", "40", "--iterations", "3"], cwd=clone,
                         env=new_user["env"], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr
    assert stamps[0].stat().st_mtime_ns == before  # setup.sh found its stamp and installed nothing
    assert sorted(p.name for p in (venv / "lib").rglob("site-packages/*")) == installed
    record = json.loads((clone / (OUT + ".json")).read_text())
    assert "job_id" not in record and record["random_weights"] is True and record["output"] == OUT
    with Image.open(clone / OUT) as image:
        assert max(image.size) == 40
    assert "stylequeue demo" not in run.stderr and "RANDOM VGG19 weights" in run.stderr
    print(f"service mode with a new environment {new_user['seconds']:.0f} s; local again {time.monotonic() - started:.0f} s")


def _demo(tmp_path: Path, *args: str) -> subprocess.Popen[bytes]:
    content, style = tmp_path / "content.png", tmp_path / "style.png"
    make_image(48, 32, seed=1).save(content)
    make_image(32, 32, seed=2).save(style)
    env = {**os.environ, "STYLEQUEUE_WEIGHTS": "random:0", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "stylequeue", "demo", str(content), str(style), "-o",
                             str(tmp_path / "out.png"), "--device", "cpu", "--data-dir", str(tmp_path / "service"),
                             *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def test_a_failed_job_exits_3_with_its_error_and_stops_the_worker(tmp_path: Path) -> None:
    from stylequeue.settings import load_settings
    from stylequeue.tasks.app import make_app

    # A message an interrupted demo left in the broker: the next demo must not run it.
    stale = make_app(load_settings(environ={"STYLEQUEUE_DATA_DIR": str(tmp_path / "service")}))
    stale.send_task("stylequeue.validate", args=[{"job_id": "stale"}], task_id="stale-message")
    assert list((tmp_path / "service/broker/queue").iterdir())
    proc = _demo(tmp_path, "--weights", str(tmp_path / "missing.pth"), "--size", "32", "--iterations", "2")
    out, err = (text.decode() for text in proc.communicate(timeout=180))
    assert proc.returncode == 3, out + err
    assert " failed: " in err and "missing.pth" in err
    assert "worker stopped" in err and not (tmp_path / "out.png").exists()
    assert not _workers_left(f"STYLEQUEUE_DATA_DIR={tmp_path / 'service'}")
    log = (tmp_path / "service/worker.log").read_text()
    assert "stylequeue.stylize" in log and "stale-message" not in log


def test_ctrl_c_cancels_the_job_and_stops_the_worker(tmp_path: Path) -> None:
    proc = _demo(tmp_path, "--size", "48", "--iterations", "2000", "--progress-every", "1")
    assert proc.stderr is not None
    seen = b""
    while b" running:" not in seen:  # the bar says the job runs: the worker is in the optimisation
        chunk = proc.stderr.read1(4096)  # type: ignore[attr-defined]
        assert chunk, f"the demo ended before its job ran: {seen.decode()}"
        seen += chunk
    marker = f"STYLEQUEUE_DATA_DIR={tmp_path / 'service'}"
    assert len(_workers_left(marker)) >= 3  # the check below sees the launcher and its celery workers
    second = _demo(tmp_path, "--size", "32")  # the same data dir: refused, the running demo untouched
    assert second.wait(timeout=60) == 2
    assert second.stderr is not None and b"another `stylequeue demo` is running in" in second.stderr.read()
    proc.send_signal(signal.SIGINT)
    out, err = (text.decode() for text in proc.communicate(timeout=120))
    err = seen.decode() + err
    assert proc.returncode == 130, out + err
    assert "cancelling job demo-" in err and "worker stopped" in err
    assert "cancelled; stylequeue.stylize stops" in (tmp_path / "service/worker.log").read_text()
    assert not _workers_left(marker)
