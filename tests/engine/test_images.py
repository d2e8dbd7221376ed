"""Image decoding and encoding edge cases, on a corpus each test writes into tmp_path."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from stylequeue.engine.images import (
    encode_image,
    format_for_path,
    load_image,
    resize_longest,
    save_image,
)
from stylequeue.exceptions import ConfigError, ImageError, ImageTooLargeError

LIMIT = 4096 * 4096


def _noise(width: int, height: int, mode: str = "RGB", seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    channels = len(mode)
    arr = rng.integers(0, 256, size=(height, width, channels), dtype=np.uint8)
    return Image.fromarray(arr[..., 0] if channels == 1 else arr)


def _write(img: Image.Image, path: Path, **kwargs: object) -> Path:
    img.save(path, **kwargs)
    return path


def _png_with_header_size(path: Path, width: int, height: int) -> Path:
    """A valid 1x1 1-bit PNG whose IHDR claims ``width`` x ``height``: a bomb made for free."""
    buf = io.BytesIO()
    Image.new("1", (1, 1)).save(buf, "PNG")
    data = bytearray(buf.getvalue())
    ihdr = 8  # after the signature: length(4) type(4) data(13) crc(4)
    assert data[ihdr + 4 : ihdr + 8] == b"IHDR"
    data[ihdr + 8 : ihdr + 16] = struct.pack(">II", width, height)
    crc = zlib.crc32(bytes(data[ihdr + 4 : ihdr + 8 + 13]))
    data[ihdr + 21 : ihdr + 25] = struct.pack(">I", crc)
    path.write_bytes(bytes(data))
    return path


# --- files that must be refused, each with a message naming the file -------------------------


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nowhere.png"
    with pytest.raises(ImageError, match="nowhere.png.*no such file"):
        load_image(path, max_pixels=LIMIT)


def test_zero_byte_file(tmp_path: Path) -> None:
    path = tmp_path / "empty.png"
    path.write_bytes(b"")
    with pytest.raises(ImageError, match=r"empty\.png.*empty \(0 bytes\)"):
        load_image(path, max_pixels=LIMIT)


def test_zero_bytes_in_memory_named() -> None:
    with pytest.raises(ImageError, match="upload.jpg.*empty"):
        load_image(b"", name="upload.jpg", max_pixels=LIMIT)


def test_text_renamed_png(tmp_path: Path) -> None:
    path = tmp_path / "notes.png"
    path.write_text("this is not a picture\n" * 20)
    with pytest.raises(ImageError, match="notes.png.*not an image stylequeue reads") as info:
        load_image(path, max_pixels=LIMIT)
    assert not isinstance(info.value, ImageTooLargeError)


def test_formats_outside_the_allow_list_are_refused(tmp_path: Path) -> None:
    # EPS would be rendered by Ghostscript: never opened, whatever the extension says.
    path = tmp_path / "page.png"
    path.write_bytes(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n")
    with pytest.raises(ImageError, match="page.png.*not an image stylequeue reads"):
        load_image(path, max_pixels=LIMIT)
    bmp = _write(Image.new("RGB", (3, 2), (9, 8, 7)), tmp_path / "old.bmp")
    assert load_image(bmp, max_pixels=LIMIT).getpixel((2, 1)) == (9, 8, 7)


@pytest.mark.parametrize("fmt,ext", [("PNG", "png"), ("JPEG", "jpg")])
def test_truncated_file(tmp_path: Path, fmt: str, ext: str) -> None:
    whole = io.BytesIO()
    _noise(64, 64).save(whole, fmt)
    path = tmp_path / f"cut.{ext}"
    path.write_bytes(whole.getvalue()[: len(whole.getvalue()) // 2])
    with pytest.raises(ImageError, match=rf"cut\.{ext}.*(damaged|truncated)"):
        load_image(path, max_pixels=LIMIT)


def test_decompression_bomb_is_refused_before_decoding(tmp_path: Path) -> None:
    # 20000 x 20000 = 400 M pixels, over 2x Pillow's MAX_IMAGE_PIXELS: DecompressionBombError.
    path = _png_with_header_size(tmp_path / "bomb.png", 20000, 20000)
    assert path.stat().st_size < 100
    with pytest.raises(ImageTooLargeError, match="bomb.png.*decompression bomb"):
        load_image(path, max_pixels=10**9)


def test_decompression_bomb_warning_range_is_refused(tmp_path: Path) -> None:
    # Between 1x and 2x MAX_IMAGE_PIXELS Pillow only warns; we refuse it all the same.
    assert Image.MAX_IMAGE_PIXELS is not None
    side = int((Image.MAX_IMAGE_PIXELS * 1.5) ** 0.5)
    path = _png_with_header_size(tmp_path / "warn.png", side, side)
    with pytest.raises(ImageTooLargeError, match="warn.png"):
        load_image(path, max_pixels=10**9)


def test_our_limit_is_checked_from_the_header(tmp_path: Path) -> None:
    # The header claims 3000x2000 but the data is 1 pixel: decoding would fail as truncated, so an
    # ImageTooLargeError proves the limit was checked before any decoding.
    path = _png_with_header_size(tmp_path / "big.png", 3000, 2000)
    with pytest.raises(ImageTooLargeError) as info:
        load_image(path, max_pixels=1_000_000)
    message = str(info.value)
    assert "big.png" in message and "3000x2000" in message and "1,000,000" in message
    assert "STYLEQUEUE_MAX_PIXELS" in message and "--max-pixels" in message


def test_real_image_over_limit(tmp_path: Path) -> None:
    path = _write(_noise(100, 100), tmp_path / "photo.png")
    with pytest.raises(ImageTooLargeError, match="photo.png.*100x100"):
        load_image(path, max_pixels=5000)
    assert load_image(path, max_pixels=10000).size == (100, 100)


def test_bad_max_pixels() -> None:
    with pytest.raises(ConfigError):
        load_image(b"x", max_pixels=0)


# --- sizes --------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [(1, 1), (1, 64), (64, 1)])
def test_tiny_and_thin_images(tmp_path: Path, size: tuple[int, int]) -> None:
    path = _write(_noise(*size), tmp_path / "thin.png")
    img = load_image(path, max_pixels=LIMIT)
    assert img.size == size and img.mode == "RGB"
    resized = resize_longest(img, 32)
    assert max(resized.size) == 32 and min(resized.size) >= 1


def test_resize_never_makes_a_zero_side() -> None:
    assert resize_longest(Image.new("RGB", (4000, 1)), 32).size == (32, 1)
    assert resize_longest(Image.new("RGB", (1, 4000)), 32).size == (1, 32)
    assert resize_longest(Image.new("RGB", (60, 40)), 30).size == (30, 20)
    assert resize_longest(Image.new("RGB", (30, 20)), 60).size == (60, 40)
    with pytest.raises(ConfigError):
        resize_longest(Image.new("RGB", (4, 4)), 0)


# --- modes --------------------------------------------------------------------------------


def test_cmyk_jpeg(tmp_path: Path) -> None:
    path = _write(Image.new("CMYK", (16, 16), (0, 255, 255, 0)), tmp_path / "cmyk.jpg", quality=100)
    img = load_image(path, max_pixels=LIMIT)
    r, g, b = img.getpixel((8, 8))
    assert img.mode == "RGB" and r > 240 and g < 15 and b < 15  # pure red survives


def test_16_bit_png_keeps_its_values(tmp_path: Path) -> None:
    eight = (np.arange(32 * 16).reshape(16, 32) % 256).astype(np.uint16)
    path = _write(Image.fromarray(eight * 257), tmp_path / "deep.png")  # 0..65535 full range
    assert Image.open(path).mode.startswith("I")
    img = load_image(path, max_pixels=LIMIT)
    arr = np.asarray(img)
    assert img.mode == "RGB"
    np.testing.assert_array_equal(arr[..., 0], eight.astype(np.uint8))
    np.testing.assert_array_equal(arr[..., 0], arr[..., 2])
    assert arr.mean() < 200  # not the all-white result of clipping


def test_32_bit_and_float_grayscale() -> None:
    ints = Image.fromarray(np.full((4, 4), 40000, dtype=np.int32))
    assert load_image(_png_bytes_or_tiff(ints), max_pixels=LIMIT).getpixel((0, 0)) == (156,) * 3
    floats = Image.fromarray(np.full((4, 4), 0.5, dtype=np.float32))
    assert load_image(_png_bytes_or_tiff(floats), max_pixels=LIMIT).getpixel((0, 0)) == (128,) * 3


def _png_bytes_or_tiff(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "TIFF")  # TIFF keeps I and F modes as they are
    return buf.getvalue()


def test_palette_png(tmp_path: Path) -> None:
    src = Image.new("RGB", (8, 8), (10, 200, 30))
    src.paste((250, 5, 90), (0, 0, 4, 8))
    path = _write(src.convert("P", palette=Image.Palette.ADAPTIVE, colors=4), tmp_path / "pal.png")
    img = load_image(path, max_pixels=LIMIT)
    assert img.getpixel((0, 0)) == (250, 5, 90) and img.getpixel((7, 7)) == (10, 200, 30)


def test_palette_with_transparency_goes_over_white(tmp_path: Path) -> None:
    pal = Image.new("P", (4, 4), 0)
    pal.putpalette([0, 0, 0, 255, 0, 0])
    pal.paste(1, (0, 0, 2, 4))
    path = _write(pal, tmp_path / "palt.png", transparency=0)
    img = load_image(path, max_pixels=LIMIT)
    assert img.getpixel((0, 0)) == (255, 0, 0) and img.getpixel((3, 3)) == (255, 255, 255)


def test_grayscale(tmp_path: Path) -> None:
    path = _write(Image.new("L", (8, 8), 77), tmp_path / "gray.png")
    assert load_image(path, max_pixels=LIMIT).getpixel((3, 3)) == (77, 77, 77)
    one_bit = _write(Image.new("1", (8, 8), 1), tmp_path / "bw.png")
    assert load_image(one_bit, max_pixels=LIMIT).getpixel((0, 0)) == (255, 255, 255)


def test_rgba_is_composited_over_white(tmp_path: Path) -> None:
    rgba = Image.new("RGBA", (3, 1))
    rgba.putdata([(255, 0, 0, 0), (0, 0, 255, 255), (0, 0, 0, 128)])
    img = load_image(_write(rgba, tmp_path / "alpha.png"), max_pixels=LIMIT)
    assert img.getpixel((0, 0)) == (255, 255, 255)  # transparent -> white, not red
    assert img.getpixel((1, 0)) == (0, 0, 255)
    assert all(abs(v - 127) <= 1 for v in img.getpixel((2, 0)))
    la = Image.new("LA", (1, 1), (0, 0))
    assert load_image(_write(la, tmp_path / "la.png"), max_pixels=LIMIT).getpixel((0, 0)) == (
        255,
        255,
        255,
    )


def test_exif_orientation_is_applied(tmp_path: Path) -> None:
    src = Image.new("RGB", (40, 20), (0, 0, 0))
    src.paste((255, 255, 255), (0, 0, 10, 20))  # white stripe on the left edge
    exif = src.getexif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    path = _write(src, tmp_path / "phone.jpg", exif=exif.tobytes(), quality=95)
    img = load_image(path, max_pixels=LIMIT)
    assert img.size == (20, 40)
    assert img.getpixel((10, 3))[0] > 200 and img.getpixel((10, 36))[0] < 50  # stripe now on top


def test_animated_gif_and_apng_use_the_first_frame(tmp_path: Path) -> None:
    frames = [Image.new("RGB", (8, 8), c) for c in ((255, 0, 0), (0, 0, 255), (0, 255, 0))]
    gif = tmp_path / "anim.gif"
    frames[0].save(gif, save_all=True, append_images=frames[1:], duration=50, loop=0)
    apng = tmp_path / "anim.png"
    frames[0].save(apng, save_all=True, append_images=frames[1:], duration=50)
    assert Image.open(gif).n_frames == 3 and Image.open(apng).n_frames == 3
    for path in (gif, apng):
        r, g, b = load_image(path, max_pixels=LIMIT).getpixel((4, 4))
        assert r > 240 and g < 15 and b < 15


def test_sources_bytes_and_stream(tmp_path: Path) -> None:
    data = encode_image(Image.new("RGB", (5, 3), (1, 2, 3)), "png")
    assert load_image(data, max_pixels=LIMIT).size == (5, 3)
    assert load_image(io.BytesIO(data), max_pixels=LIMIT).getpixel((0, 0)) == (1, 2, 3)
    with pytest.raises(ImageError, match="s3://bucket/style.png"):
        load_image(data[:30], name="s3://bucket/style.png", max_pixels=LIMIT)


# --- encoding and saving ------------------------------------------------------------------


@pytest.mark.parametrize("ext,tolerance", [("png", 0), ("jpg", 12), ("jpeg", 12), ("webp", 12)])
def test_round_trip(tmp_path: Path, ext: str, tolerance: int) -> None:
    src = Image.new("RGB", (24, 16), (200, 30, 60))
    src.paste((20, 180, 90), (0, 0, 12, 16))
    path = save_image(src, tmp_path / f"out.{ext}")
    back = load_image(path, max_pixels=LIMIT)
    assert back.size == src.size
    diff = np.abs(np.asarray(back, dtype=int) - np.asarray(src, dtype=int))
    assert diff[:, 2:10].max() <= tolerance and diff[:, 14:22].max() <= tolerance


def test_encode_formats_and_magic_bytes() -> None:
    img = Image.new("RGB", (4, 4))
    assert encode_image(img, "PNG").startswith(b"\x89PNG")
    assert encode_image(img, "jpeg").startswith(b"\xff\xd8")
    assert encode_image(img, ".webp")[8:12] == b"WEBP"
    assert encode_image(img.convert("RGBA"), "jpg").startswith(b"\xff\xd8")
    with pytest.raises(ConfigError, match="tiff"):
        encode_image(img, "tiff")


def test_unknown_extension(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"\.bmp.*\.png"):
        save_image(Image.new("RGB", (2, 2)), tmp_path / "out.bmp")
    with pytest.raises(ConfigError, match="none"):
        format_for_path(tmp_path / "out")
    assert not list(tmp_path.iterdir())


def test_output_pixel_limit(tmp_path: Path) -> None:
    with pytest.raises(ImageTooLargeError, match="100x100"):
        save_image(Image.new("RGB", (100, 100)), tmp_path / "big.png", max_pixels=9999)
    assert not list(tmp_path.iterdir())


def test_save_is_atomic_and_replaces(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "result.png"
    save_image(Image.new("RGB", (4, 4), (255, 0, 0)), path)
    save_image(Image.new("RGB", (6, 6), (0, 255, 0)), path)
    assert load_image(path, max_pixels=LIMIT).getpixel((0, 0)) == (0, 255, 0)
    assert [p.name for p in path.parent.iterdir()] == ["result.png"]  # no temp files left


def test_failed_save_leaves_old_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = save_image(Image.new("RGB", (4, 4), (255, 0, 0)), tmp_path / "keep.png")

    def broken_replace(src: str, dst: str) -> None:
        raise OSError("disk full")

    monkeypatch.setattr("stylequeue.fileio.os.replace", broken_replace)
    with pytest.raises(OSError, match="disk full"):
        save_image(Image.new("RGB", (4, 4), (0, 0, 255)), path)
    monkeypatch.undo()
    assert load_image(path, max_pixels=LIMIT).getpixel((0, 0)) == (255, 0, 0)
    assert [p.name for p in tmp_path.iterdir()] == ["keep.png"]


def test_mpo_phone_jpeg_loads(tmp_path: Path) -> None:
    # Many phone cameras write MPO (a JPEG with extra pictures); Pillow opens it as JPEG's sibling.
    path = tmp_path / "phone.jpg"
    first, second = Image.new("RGB", (8, 6), (0, 255, 0)), Image.new("RGB", (8, 6), (255, 0, 0))
    first.save(path, format="MPO", save_all=True, append_images=[second], quality=100)
    assert Image.open(path).format == "MPO"
    r, g, b = load_image(path, max_pixels=LIMIT).getpixel((4, 3))
    assert g > 240 and r < 15 and b < 15
