"""Decode and encode images with Pillow, safely.

Inputs come from strangers (job submitters), so decoding is defensive:

* our own pixel limit (``max_pixels``) is checked from the header, *before* any pixel is decoded;
* Pillow's decompression-bomb guard (``Image.MAX_IMAGE_PIXELS``) stays on, and both its error and
  its warning become :class:`ImageTooLargeError`;
* truncated files are an error (``ImageFile.LOAD_TRUNCATED_IMAGES`` is never set): a half-decoded
  content image would silently produce a half-grey result;
* every error names the file it is about.

Whatever the input's mode, :func:`load_image` returns 8-bit RGB, which is what VGG19 expects.
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from stylequeue.exceptions import ConfigError, ImageError, ImageTooLargeError
from stylequeue.fileio import atomic_write_bytes

# Output formats by lower-case extension (without the dot) -> Pillow format name.
FORMATS: dict[str, str] = {"png": "PNG", "jpg": "JPEG", "jpeg": "JPEG", "webp": "WEBP"}
CONTENT_TYPES: dict[str, str] = {"PNG": "image/png", "JPEG": "image/jpeg", "WEBP": "image/webp"}
# High but not lossless: the result is a painting-like texture, where 95 is visually exact.
_SAVE_OPTIONS: dict[str, dict[str, object]] = {
    "PNG": {},
    "JPEG": {"quality": 95, "subsampling": 0},
    "WEBP": {"quality": 95, "method": 4},
}
# What we decode: common raster formats only. Image.open's default tries every plugin Pillow has,
# including EPS (which runs Ghostscript) - too much attack surface for files from strangers.
# (Phone JPEGs that Pillow opens as MPO come through the JPEG plugin.)
INPUT_FORMATS: tuple[str, ...] = ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF", "PPM")
_LIMIT_HINT = "raise it with STYLEQUEUE_MAX_PIXELS or --max-pixels, or send a smaller image"
# Decoder failures Pillow raises for broken or truncated data.
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, IndexError, TypeError, KeyError)

ImageSource = str | Path | bytes | bytearray | BinaryIO


def load_image(
    source: ImageSource, *, name: str | None = None, max_pixels: int
) -> Image.Image:
    """Decode ``source`` (path, bytes or binary file) into an 8-bit RGB image.

    * EXIF orientation is applied, so a phone photo comes out the way it is shown.
    * Transparent images (RGBA, LA, PA, palette with transparency) are composited over white:
      VGG has no alpha channel, and white is what a viewer shows behind them.
    * Grayscale, palette, CMYK and 16-bit images are converted to RGB; 16-bit values are scaled by
      1/256 (not clipped, which would turn nearly every pixel white).
    * Animated GIF/APNG/WebP: only the first frame is used.

    ``name`` is what error messages call the image (default: the path, or the file object's name).
    Raises :class:`ImageTooLargeError` past ``max_pixels`` or Pillow's bomb guard, and
    :class:`ImageError` for missing, empty, non-image or truncated input.
    """
    if max_pixels <= 0:
        raise ConfigError(f"max_pixels must be positive, got {max_pixels}")
    label = name or _source_name(source)
    with _open(source, label) as opened:
        _check_pixels(opened.size, max_pixels, label, what="image")
        try:
            opened.load()  # force the full decode now, so truncation is caught here
            upright = ImageOps.exif_transpose(opened)
        except _DECODE_ERRORS as exc:
            raise ImageError(f"{label}: the image data is damaged or truncated ({exc})") from None
        return to_rgb(upright, label)


def _source_name(source: ImageSource) -> str:
    if isinstance(source, (str, Path)):
        return str(source)
    if isinstance(source, (bytes, bytearray)):
        return "<image bytes>"
    return str(getattr(source, "name", "<image stream>"))


def _open(source: ImageSource, label: str) -> Image.Image:
    """``Image.open`` with every failure turned into a message that names ``label``."""
    if isinstance(source, (str, Path)):
        path = Path(source)
        if not path.is_file():
            raise ImageError(f"{label}: no such file")
        if path.stat().st_size == 0:
            raise ImageError(f"{label}: the file is empty (0 bytes)")
        fp: str | Path | BinaryIO = path
    elif isinstance(source, (bytes, bytearray)):
        if not source:
            raise ImageError(f"{label}: the image is empty (0 bytes)")
        fp = io.BytesIO(bytes(source))
    else:
        fp = source
    try:
        with warnings.catch_warnings():
            # Pillow warns between 1x and 2x MAX_IMAGE_PIXELS and raises above; both are refused.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(fp, formats=INPUT_FORMATS)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageTooLargeError(
            f"{label}: refused as a possible decompression bomb ({exc}); send a smaller image"
        ) from None
    except UnidentifiedImageError:
        raise ImageError(
            f"{label}: not an image stylequeue reads (expected {', '.join(INPUT_FORMATS)})"
        ) from None
    except _DECODE_ERRORS as exc:
        raise ImageError(f"{label}: cannot read the image header ({exc})") from None
    # Backstop for the warning filter above, which another thread may have reset meanwhile.
    bomb_limit = Image.MAX_IMAGE_PIXELS
    if bomb_limit and img.width * img.height > bomb_limit:
        img.close()
        raise ImageTooLargeError(
            f"{label}: refused as a possible decompression bomb ({img.width}x{img.height} is over "
            f"Pillow's limit of {bomb_limit:,} pixels); send a smaller image"
        )
    return img


def _check_pixels(size: tuple[int, int], max_pixels: int, label: str, *, what: str) -> None:
    width, height = size
    if width * height > max_pixels:
        raise ImageTooLargeError(
            f"{label}: the {what} is {width}x{height} = {width * height:,} pixels, over the limit "
            f"of {max_pixels:,}; {_LIMIT_HINT}"
        )


def to_rgb(img: Image.Image, label: str = "image") -> Image.Image:
    """Any Pillow mode -> 8-bit RGB (see :func:`load_image` for the rules)."""
    if img.mode == "RGB":
        return img.copy()
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    if img.mode in ("I", "I;16", "I;16L", "I;16B", "I;16N", "F"):
        img = _wide_gray_to_l(img)
    if img.mode in ("RGBa", "La", "PA"):
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA"):
        background = Image.new("RGBA", img.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, img.convert("RGBA")).convert("RGB")
    try:
        return img.convert("RGB")
    except ValueError as exc:
        raise ImageError(f"{label}: cannot convert {img.mode} to RGB ({exc})") from None


def _wide_gray_to_l(img: Image.Image) -> Image.Image:
    """16/32-bit integer or float grayscale -> 8-bit 'L'.

    ``I;16*`` is 16-bit by definition: divide by 256. ``I`` (32-bit, which some Pillow versions use
    for 16-bit PNGs) is judged by its range: values up to 255 are kept, up to 65535 are treated as
    16-bit, anything larger is scaled to its maximum. ``F`` up to 1.0 is taken as 0..1, else 0..255.
    """
    values = np.asarray(img, dtype=np.float64)  # (H, W)
    high = float(values.max()) if values.size else 0.0
    if img.mode == "F":
        scale = 255.0 if high <= 1.0 else 1.0
    elif img.mode.startswith("I;16") or 255 < high <= 65535:
        scale = 1 / 256
    elif high > 65535:
        scale = 255.0 / high
    else:
        scale = 1.0
    # Floor, not round: for integers it is ``v >> 8``, which maps the usual 8->16-bit expansion
    # (v * 257) back to exactly v.
    rounded = np.rint(values * scale) if img.mode == "F" else np.floor(values * scale)
    return Image.fromarray(np.clip(rounded, 0, 255).astype(np.uint8))


def resize_longest(img: Image.Image, size: int) -> Image.Image:
    """Scale ``img`` so its longest side is ``size``, keeping the aspect ratio.

    Neither side drops below 1 pixel, so a 1x4000 strip still resizes. LANCZOS when shrinking
    (it anti-aliases), BICUBIC when enlarging (LANCZOS rings on upscales).
    """
    new_size = fit_longest(img.size, size)
    if new_size == img.size:
        return img
    shrinking = new_size[0] * new_size[1] < img.size[0] * img.size[1]
    resample = Image.Resampling.LANCZOS if shrinking else Image.Resampling.BICUBIC
    return img.resize(new_size, resample)


def fit_longest(size: tuple[int, int], longest: int) -> tuple[int, int]:
    """(width, height) scaled so the longer side is ``longest``; no side below 1."""
    if longest < 1:
        raise ConfigError(f"size must be at least 1 pixel, got {longest}")
    width, height = size
    scale = longest / max(width, height)
    return (max(1, round(width * scale)), max(1, round(height * scale)))


def check_output_pixels(size: tuple[int, int], max_pixels: int) -> None:
    """:class:`ImageTooLargeError` if an output of ``size`` would pass the limit (check early)."""
    _check_pixels(size, max_pixels, "output", what="output image")


def format_for_path(path: str | Path) -> str:
    """The Pillow format for an output path's extension; :class:`ConfigError` if unsupported."""
    ext = Path(path).suffix.lower().lstrip(".")
    if ext not in FORMATS:
        raise ConfigError(
            f"{path}: cannot tell the output format from extension {ext or '(none)'!r}; "
            f"use one of {', '.join('.' + e for e in FORMATS)}"
        )
    return FORMATS[ext]


def _pillow_format(fmt: str) -> str:
    key = fmt.lower().lstrip(".")
    if key in FORMATS:
        return FORMATS[key]
    if fmt.upper() in CONTENT_TYPES:
        return fmt.upper()
    raise ConfigError(f"unsupported output format {fmt!r}; use png, jpeg or webp")


def encode_image(img: Image.Image, fmt: str, *, max_pixels: int | None = None) -> bytes:
    """Encode ``img`` as PNG, JPEG or WebP (``fmt`` is a name or extension, any case)."""
    pillow_fmt = _pillow_format(fmt)
    if max_pixels is not None:
        check_output_pixels(img.size, max_pixels)
    if img.mode != "RGB":
        img = to_rgb(img)
    buf = io.BytesIO()
    img.save(buf, format=pillow_fmt, **_SAVE_OPTIONS[pillow_fmt])
    return buf.getvalue()


def save_image(img: Image.Image, path: str | Path, *, max_pixels: int | None = None) -> Path:
    """Write ``img`` to ``path`` atomically, in the format its extension names.

    The bytes go to a temporary file in the same directory, which then replaces ``path`` in one
    rename: a reader (or a crash) never sees a half-written image.
    """
    path = Path(path)
    data = encode_image(img, format_for_path(path), max_pixels=max_pixels)
    atomic_write_bytes(path, data)
    return path


