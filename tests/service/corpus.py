"""The bad-input corpus (issue 4): files and job specs a stranger might send, and what each must do.

Files are generated, not checked in: each is a few hundred bytes made with Pillow (or by cutting
or patching Pillow's output), so the corpus documents itself. Every case says what the service
must answer: ``fails`` with a message containing ``expect``, or ``works`` (the job succeeds).

* :func:`file_cases`: uploaded as a job's content image; the job runs through the real workers.
* :func:`spec_cases`: job specs the scheduler must refuse before anything is queued.
"""

from __future__ import annotations

import io
import math
import struct
import zlib
from dataclasses import dataclass, field
from typing import Any, Callable, Literal

import numpy as np
from PIL import Image

from tests.conftest import make_image

# The bad-input stack runs with this pixel limit, so "past the limit" needs no huge file.
MAX_PIXELS = 256 * 256


@dataclass(frozen=True)
class FileCase:
    """One input file, uploaded under ``in/corpus/<name>``."""

    name: str
    data: bytes
    outcome: Literal["fails", "works"]
    expect: str = ""  # a part of the error message (fails) or of nothing (works)
    why: str = ""
    params: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class SpecCase:
    """A job spec change (applied to a good spec) the scheduler must refuse, and why."""

    name: str
    change: Callable[[dict[str, Any]], dict[str, Any]]
    expect: str


def _encode(image: Image.Image, fmt: str, **options: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def _png_with_size(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width`` x ``height`` but whose data is tiny: a bomb's header.

    Pillow reads the size from IHDR when it opens the file, so the refusal must come from the
    header, before a single pixel would be decoded.
    """
    data = bytearray(_encode(Image.new("L", (8, 8)), "PNG"))
    ihdr = data.index(b"IHDR")
    data[ihdr + 4:ihdr + 12] = struct.pack(">II", width, height)
    crc = zlib.crc32(bytes(data[ihdr:ihdr + 17])) & 0xFFFFFFFF
    data[ihdr + 17:ihdr + 21] = struct.pack(">I", crc)
    return bytes(data)


def _sixteen_bit_png() -> bytes:
    ramp = (np.linspace(0, 65535, 40 * 32).reshape(32, 40)).astype(np.uint16)
    return _encode(Image.fromarray(ramp), "PNG")  # uint16 -> mode I;16


def _animated_gif() -> bytes:
    frames = [make_image(40, 32, seed=s).convert("P") for s in range(3)]
    return _encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)


def _alpha_png() -> bytes:
    rgba = make_image(40, 32, seed=4).convert("RGBA")
    alpha = Image.linear_gradient("L").resize(rgba.size)
    rgba.putalpha(alpha)
    return _encode(rgba, "PNG")


def file_cases() -> list[FileCase]:
    good_png = _encode(make_image(48, 32, seed=1), "PNG")
    good_jpeg = _encode(make_image(48, 32, seed=1), "JPEG", quality=90)
    return [
        FileCase("zero-bytes.png", b"", "fails", "empty (0 bytes)"),
        FileCase("text-renamed.png", b"this is a text file, not a picture\n" * 4, "fails", "not an image"),
        FileCase("truncated.png", good_png[: len(good_png) // 2], "fails", "truncated"),
        FileCase("truncated.jpg", good_jpeg[: len(good_jpeg) // 2], "fails", "truncated"),
        FileCase("bomb.png", _png_with_size(40_000, 40_000), "fails", "decompression bomb",
                 why="1.6 Gpx in its header, 100 bytes on disk"),
        FileCase("past-pixel-limit.png", _encode(Image.new("RGB", (300, 300), "gray"), "PNG"), "fails",
                 "over the limit", why=f"90,000 px against STYLEQUEUE_MAX_PIXELS={MAX_PIXELS}"),
        FileCase("one-pixel.png", _encode(Image.new("RGB", (1, 1), "red"), "PNG"), "works",
                 why="scaled up to the job's size (32x32)"),
        FileCase("extreme-aspect-2000x4.png", _encode(make_image(2000, 4, seed=5), "PNG"), "fails",
                 "too small for VGG19 layer", why="the output would be 32x1 px"),
        FileCase("tall-aspect-4x600.png", _encode(make_image(4, 600, seed=6), "PNG"), "fails",
                 "too small for VGG19 layer", why="the output would be 1x32 px"),
        FileCase("cmyk.jpg", _encode(make_image(40, 32, seed=7).convert("CMYK"), "JPEG"), "works"),
        FileCase("sixteen-bit.png", _sixteen_bit_png(), "works"),
        FileCase("palette.png", _encode(make_image(40, 32, seed=8).convert("P"), "PNG"), "works"),
        FileCase("grayscale.png", _encode(make_image(40, 32, seed=9).convert("L"), "PNG"), "works"),
        FileCase("alpha.png", _alpha_png(), "works", why="composited over white"),
        FileCase("animated.gif", _animated_gif(), "works", why="the first frame is used"),
    ]


def _params(**changes: Any) -> Callable[[dict[str, Any]], dict[str, Any]]:
    return lambda spec: {**spec, "params": {**spec["params"], **changes}}


def _fields(**changes: Any) -> Callable[[dict[str, Any]], dict[str, Any]]:
    return lambda spec: {**spec, **changes}


def spec_cases(bucket: str) -> list[SpecCase]:
    """Specs refused at submit. ``bucket`` is the deployment's (allowed) bucket."""
    return [
        SpecCase("unknown-scheme", _fields(content="ftp://example.com/cat.png"),
                 "unsupported URI scheme 'ftp'"),
        SpecCase("no-scheme", _fields(content="cat.png"), "is not a storage URI"),
        SpecCase("file-dotdot", _fields(content="file:///tmp/stylequeue/../../etc/passwd"),
                 "outside the storage this deployment allows"),
        SpecCase("s3-dotdot", _fields(content=f"s3://{bucket}/in/../../secret.png"), "contains '..'"),
        SpecCase("other-bucket", _fields(content="s3://someone-elses-bucket/cat.png"),
                 "outside the storage this deployment allows"),
        SpecCase("other-bucket-output", _fields(output="s3://someone-elses-bucket/out"),
                 "outside the storage this deployment allows"),
        SpecCase("negative-weight", _params(style_weight=-1.0), "style_weight"),
        SpecCase("nan-weight", _params(content_weight=math.nan), "finite"),
        SpecCase("inf-weight", _params(style_weight=math.inf), "finite"),
        SpecCase("unknown-layer", _params(style_layers=["relu1_1", "relu9_9"]), "relu9_9"),
        SpecCase("zero-iterations", _params(iterations=0), "iterations"),
        SpecCase("absurd-iterations", _params(iterations=10**9), "iterations"),
        SpecCase("absurd-size", _params(size=10**6), "size"),
        SpecCase("unknown-field", _fields(colour="red"), "unknown field"),
        SpecCase("unknown-param", _params(flux_capacitor=1.21), "flux_capacitor"),
        SpecCase("styles-not-a-list", lambda s: {**s, "styles": s["styles"][0]}, "styles"),
        SpecCase("size-as-text", _params(size="big"), "size"),
        SpecCase("priority-as-text", _fields(priority="high"), "priority"),
        SpecCase("priority-out-of-range", _fields(priority=99), "priority"),
        SpecCase("no-styles", _fields(styles=[]), "styles"),
        SpecCase("bad-job-id", _fields(job_id="../../etc"), "not a valid job id"),
        SpecCase("missing-content", lambda s: {k: v for k, v in s.items() if k != "content"}, "content"),
        SpecCase("weights-local-path", _fields(weights="/etc/passwd"), "worker-local paths"),
        SpecCase("weights-other-bucket", _fields(weights="s3://someone-elses-bucket/vgg.pth"),
                 "outside the storage this deployment allows"),
        # Issue 13 and its relatives: ids that are not what they look like, inputs that name no
        # object, numbers float32 cannot carry, settings the GPU would only refuse later.
        SpecCase("job-id-trailing-newline", _fields(job_id="cat-1\n"), "not a valid job id"),
        SpecCase("job-id-tab", _fields(job_id="cat\t1"), "not a valid job id"),
        SpecCase("job-id-nul", _fields(job_id="cat\x001"), "not a valid job id"),
        SpecCase("job-id-cyrillic-o", _fields(job_id="j\u043eb-1"), "not a valid job id"),
        SpecCase("job-id-fullwidth-digit", _fields(job_id="job\uff11"), "not a valid job id"),
        SpecCase("job-id-too-long", _fields(job_id="x" * 129), "not a valid job id"),
        SpecCase("content-bucket-only", _fields(content=f"s3://{bucket}"), "names a bucket, not an object"),
        SpecCase("content-folder", _fields(content=f"s3://{bucket}/in/"), "names a folder, not an object"),
        SpecCase("style-bucket-only", lambda s: {**s, "styles": [f"s3://{bucket}"]}, "names a bucket"),
        SpecCase("weights-bucket-only", _fields(weights=f"s3://{bucket}"), "names a bucket"),
        SpecCase("huge-finite-weight", _params(style_weight=1e300), "at most 3.4e+38"),
        SpecCase("huge-finite-lr", _params(lr=1e300), "at most 3.4e+38"),
        SpecCase("random-seed-25-digits", _fields(weights="random:" + "9" * 25), "at most 9223372036854775807"),
        SpecCase("random-seed-superscript", _fields(weights="random:\u00b2"), "random weights are named"),
        SpecCase("random-unknown-network", _fields(weights="random:1:resnet50"), "random weights are named"),
        SpecCase("init-image-without-image", _params(init="image"), "needs an initial image"),
        SpecCase("blend-weights-mismatch", _params(style_blend_weights=[0.5, 0.5]), "one per style"),
        SpecCase("unknown-network", _params(network="resnet50"), "network must be one of"),
        SpecCase("vgg19-layer-on-vgg16", _params(network="vgg16", style_layers=["relu3_4"]), "unknown VGG16"),
        SpecCase("unknown-style-loss", _params(style_loss="histogram"), "style_loss must be one of"),
    ]
