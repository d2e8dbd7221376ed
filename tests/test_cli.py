"""The ``stylequeue`` command, run as a real subprocess (``python -m stylequeue``)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image

from stylequeue.cli import main
from stylequeue.engine import preset
from stylequeue.engine.weights import file_sha256, load_weights
from testbed.s3 import S3Server
from tests.conftest import make_image

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("inputs")
    paths = {
        "content": folder / "content.png",
        "style": folder / "style.jpg",
        "style2": folder / "style2.webp",
        "text": folder / "notes.png",
    }
    make_image(48, 32, seed=1).save(paths["content"])
    make_image(40, 40, seed=2).save(paths["style"], quality=95)
    make_image(32, 48, seed=3).save(paths["style2"])
    paths["text"].write_text("not an image\n")
    return paths


def _env(tmp_path: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        OMP_NUM_THREADS="2",
        TORCH_HOME=str(tmp_path / "torch"),  # empty: imagenet is never there
        XDG_DATA_HOME=str(tmp_path / "data"),
        PYTHONPATH=str(REPO),
    )
    for var in [v for v in env if v.startswith("STYLEQUEUE_")]:
        env.pop(var)  # only the defaults and what each test sets
    return env


def stylequeue(tmp_path: Path, *args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "stylequeue", *args],
        cwd=tmp_path,
        env=_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _assert_one_line_error(proc: subprocess.CompletedProcess, *needles: str) -> str:
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("stylequeue: error: ")]
    assert len(errors) == 1, proc.stderr
    for needle in needles:
        assert needle in errors[0]
    return errors[0]


def test_run_writes_image_metadata_and_previews(tmp_path: Path, images: dict[str, Path]) -> None:
    out = tmp_path / "result.png"
    proc = stylequeue(
        tmp_path, "run", str(images["content"]), str(images["style"]), str(images["style2"]),
        "-o", str(out), "--weights", "random:0", "--size", "32", "--iterations", "3",
        "--style-blend", "1", "3", "--tv-weight", "0.5", "--seed", "4", "--save-every", "2",
        "--init", str(images["style"]),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr

    with Image.open(out) as img:
        assert img.format == "PNG" and img.size == (32, 21)  # 48x32 content, longest side 32
    with Image.open(tmp_path / "result_iter0002.png") as preview:
        assert preview.size == (32, 21)

    meta = json.loads((tmp_path / "result.png.json").read_text())
    cfg, default = meta["config"], preset("default")
    assert (cfg["size"], cfg["iterations"], cfg["seed"], cfg["tv_weight"]) == (32, 3, 4, 0.5)
    assert cfg["style_blend_weights"] == [1.0, 3.0] and cfg["init"] == "image"
    assert cfg["content_weight"] == default.content_weight  # not set: the preset's value
    assert cfg["optimizer"] == default.optimizer and cfg["pooling"] == default.pooling
    assert meta["random_weights"] is True and meta["stopped"] is False
    assert meta["weights"] == {"source": "random:0", "sha256": None, "random": True, "seed": 0,
                               "network": "vgg19", "convention": "torchvision"}
    assert [h["iteration"] for h in meta["history"]][-1] == 3
    assert all("loss" in h for h in meta["history"])
    assert meta["device"] == "cpu" and "torch" in meta["versions"]
    assert meta["inputs"]["content"] == str(images["content"])
    assert meta["inputs"]["styles"] == [str(images["style"]), str(images["style2"])]
    assert meta["inputs"]["init"] == str(images["style"])
    assert meta["timings"]["command_s"] > 0

    # The progress bar: iterations, loss and a rate; and the loud random-weights warning.
    assert "3/3" in proc.stderr and "loss=" in proc.stderr and "it/s" in proc.stderr
    assert "RANDOM VGG19 WEIGHTS" in proc.stderr and "not a real style transfer" in proc.stderr


def test_missing_content_file(tmp_path: Path, images: dict[str, Path]) -> None:
    proc = stylequeue(
        tmp_path, "run", "nowhere.png", str(images["style"]), "-o", "out.png",
        "--weights", "random:0", "--size", "32", "--iterations", "1",
    )  # fmt: skip
    _assert_one_line_error(proc, "nowhere.png", "no such file")
    assert not (tmp_path / "out.png").exists()


def test_bad_style_image(tmp_path: Path, images: dict[str, Path]) -> None:
    proc = stylequeue(
        tmp_path, "run", str(images["content"]), str(images["text"]), "-o", "out.png",
        "--weights", "random:0", "--size", "32", "--iterations", "1",
    )  # fmt: skip
    _assert_one_line_error(proc, "notes.png", "not an image")


def test_missing_weights(tmp_path: Path, images: dict[str, Path]) -> None:
    proc = stylequeue(
        tmp_path, "run", str(images["content"]), str(images["style"]), "-o", "out.png",
        "--weights", str(tmp_path / "vgg19.pth"), "--size", "32", "--iterations", "1",
    )  # fmt: skip
    _assert_one_line_error(proc, "vgg19.pth", "does not exist")
    assert not (tmp_path / "out.png").exists()


def test_imagenet_offline_says_how_to_give_weights(tmp_path: Path, images: dict[str, Path]) -> None:
    env_proxy = "http://127.0.0.1:9"  # a closed port: no download, on any host
    proc = subprocess.run(
        [sys.executable, "-m", "stylequeue", "run", str(images["content"]), str(images["style"]),
         "-o", "out.png", "--size", "32", "--iterations", "1"],
        cwd=tmp_path,
        env={**_env(tmp_path), "https_proxy": env_proxy, "HTTPS_PROXY": env_proxy,
             "NO_PROXY": "", "no_proxy": ""},
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    line = _assert_one_line_error(proc, "torch", "vgg19-dcbb9e9d.pth", "s3://", "weights export")
    assert str(tmp_path / "torch" / "hub" / "checkpoints") in line


def test_usage_errors_in_process(
    tmp_path: Path, images: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    common = [str(images["content"]), str(images["style"]), "--weights", "random:0"]
    assert main(["run", *common, "-o", str(tmp_path / "out.bmp")]) == 2
    assert main(["run", *common, "-o", str(tmp_path / "o.png"), "--preset", "fast"]) == 2
    assert main(["run", *common, "-o", str(tmp_path / "o.png"), "--size", "3"]) == 2
    assert main(["run", *common, "-o", str(tmp_path / "o.png"), "--max-pixels", "100"]) == 2
    # Inputs fit (48x32, 40x40) but a 256x171 output would not: refused before any work.
    big = ["--size", "256", "--max-pixels", "2000"]
    assert main(["run", *common, "-o", str(tmp_path / "o.png"), *big]) == 2
    assert main(["run", *common, "-o", str(tmp_path / "o.png"), "--save-every", "0"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 6 and all(line.startswith("stylequeue: error: ") for line in err)
    assert ".bmp" in err[0] and "fast" in err[1] and "size" in err[2]
    assert "content.png" in err[3] and "--max-pixels" in err[3]
    assert "output" in err[4] and "256x171" in err[4] and "save-every" in err[5]
    assert list(tmp_path.iterdir()) == []


def test_ctrl_c_writes_the_partial_result(tmp_path: Path, images: dict[str, Path]) -> None:
    out = tmp_path / "partial.jpg"
    proc = subprocess.Popen(
        [sys.executable, "-m", "stylequeue", "run", str(images["content"]), str(images["style"]),
         "-o", str(out), "--weights", "random:1", "--size", "32", "--iterations", "5000",
         "--save-every", "1", "-q"],
        cwd=tmp_path, env=_env(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while not (tmp_path / "partial_iter0002.jpg").exists():
            assert proc.poll() is None, proc.communicate()[1]
            assert time.monotonic() < deadline, "no preview appeared"
            time.sleep(0.1)
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr and "stopped early" in stderr
    meta = json.loads((tmp_path / "partial.jpg.json").read_text())
    assert meta["stopped"] is True and 2 <= meta["iterations_done"] < 5000
    with Image.open(out) as img:
        assert img.format == "JPEG" and img.size == (32, 21)


def test_weights_export_and_info_round_trip(tmp_path: Path) -> None:
    dest = tmp_path / "fleet" / "vgg19-features.pth"
    proc = stylequeue(tmp_path, "weights", "export", "--from", "random:3", "-o", str(dest))
    assert proc.returncode == 0, proc.stderr
    digest = file_sha256(dest)
    assert digest in proc.stdout
    assert (dest.parent / "vgg19-features.pth.sha256").read_text().split()[0] == digest

    info = stylequeue(tmp_path, "weights", "info", str(dest))
    assert info.returncode == 0, info.stderr
    assert digest in info.stdout and "features-only" in info.stdout and "shapes ok" in info.stdout

    exported, original = load_weights(dest, sha256=digest), load_weights("random:3")
    assert exported.state_dict.keys() == original.state_dict.keys()
    assert all(torch.equal(t, original.state_dict[k]) for k, t in exported.state_dict.items())
    # Random weights stay flagged through the file, so outputs made from it still say so.
    assert exported.info.random is True and exported.info.seed == 3
    assert "RANDOM" in info.stdout


def test_weights_info_json_in_process(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    dest = tmp_path / "w.pth"
    assert main(["weights", "export", "--from", "random:2", "-o", str(dest)]) == 0
    capsys.readouterr()
    assert main(["weights", "info", str(dest), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["sha256"] == file_sha256(dest) and info["keys_ok"] is True
    assert info["sidecar_sha256_matches"] is True and info["random_seed"] == 2
    (tmp_path / "w.pth.sha256").write_text("0" * 64 + "  w.pth\n")
    assert main(["weights", "info", str(dest)]) == 2  # a sidecar that disagrees fails the check
    assert "DOES NOT MATCH" in capsys.readouterr().out


def test_weights_info_on_a_bad_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"\x00" * 100)
    _assert_one_line_error(stylequeue(tmp_path, "weights", "info", str(bad)), "bad.pth")


def test_help_is_fast_and_lists_subcommands(tmp_path: Path) -> None:
    started = time.monotonic()
    proc = stylequeue(tmp_path, "--help")
    assert proc.returncode == 0 and "run" in proc.stdout and "weights" in proc.stdout
    assert time.monotonic() - started < 10
    probe = subprocess.run(
        [sys.executable, "-c", "import sys, stylequeue.cli as c; c.build_parser(); "
         "print(any(m in sys.modules for m in ('torch', 'celery')))"],
        env=_env(tmp_path), capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert probe.stdout.strip() == "False", probe.stderr


def test_weights_export_from_s3(tmp_path: Path) -> None:
    """``--from s3://...`` through the storage layer's fetcher, against a real S3 endpoint."""
    local = tmp_path / "upload.pth"
    assert main(["weights", "export", "--from", "random:4", "-o", str(local)]) == 0
    with S3Server() as server:
        bucket = server.make_bucket()
        server.client().upload_file(str(local), bucket, "models/vgg19.pth")
        env = {
            **_env(tmp_path),
            "STYLEQUEUE_S3_ENDPOINT_URL": server.endpoint_url,
            "STYLEQUEUE_S3_ACCESS_KEY_ID": server.access_key,
            "STYLEQUEUE_S3_SECRET_ACCESS_KEY": server.secret_key,
            "STYLEQUEUE_WEIGHTS_CACHE_DIR": str(tmp_path / "cache"),
        }
        dest = tmp_path / "pulled.pth"
        proc = subprocess.run(
            [sys.executable, "-m", "stylequeue", "weights", "export",
             "--from", f"s3://{bucket}/models/vgg19.pth", "-o", str(dest)],
            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert len(list((tmp_path / "cache").iterdir())) == 1  # fetched once, kept for the next load
    pulled, original = load_weights(dest), load_weights("random:4")
    assert all(torch.equal(t, original.state_dict[k]) for k, t in pulled.state_dict.items())
    assert pulled.info.random is True and pulled.info.seed == 4
