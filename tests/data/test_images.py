"""Reading user images: refusing bad files with one clear line, converting modes, centre-cropping."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from attribution.data.images import MAX_PIXELS, image_to_pixels, load_image_pixels, open_image, to_mode
from attribution.errors import AttributionError, ImageError


def assert_one_line(exc_info) -> str:
    msg = str(exc_info.value)
    assert msg and "\n" not in msg, f"error message should be one line: {msg!r}"
    assert isinstance(exc_info.value, AttributionError)
    return msg


def encode(img: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def noise_image(size=(64, 64)) -> Image.Image:
    rng = np.random.default_rng(0)  # random pixels: the compressed data is long enough to cut in the middle
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def huge_bilevel_png(width: int, height: int) -> bytes:
    """A valid all-black 1-bit PNG, built chunk by chunk: about 50 KB for 20000 x 20000, no big buffer in RAM."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    comp = zlib.compressobj(9)
    row = bytes(1 + (width + 7) // 8)  # filter byte 0 + packed bits
    idat = b"".join(comp.compress(row) for _ in range(height)) + comp.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)  # bit depth 1, grayscale
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


# -- files that are not usable images ---------------------------------------------------------------------------------

def test_text_file_named_png(tmp_path):
    path = tmp_path / "notes.png"
    path.write_text("definitely not a picture\n")
    with pytest.raises(ImageError, match="notes.png is not an image file") as exc:
        open_image(path)
    assert_one_line(exc)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "BMP", "GIF", "WEBP", "TIFF"])
def test_truncated_file(tmp_path, fmt):
    data = encode(noise_image(), fmt)
    path = tmp_path / f"cut.{fmt.lower()}"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageError, match="cut") as exc:
        load_image_pixels(path, 16, 3)
    msg = assert_one_line(exc)
    assert "truncated or corrupt" in msg or "not an image file" in msg


@pytest.mark.parametrize("cut", [12, 30, 60])
def test_file_cut_inside_the_header(cut):
    data = encode(noise_image(), "JPEG")[:cut]  # PIL raises a bare OSError here, before decoding
    with pytest.raises(ImageError) as exc:
        open_image(data, "photo.jpg")
    assert_one_line(exc)


def test_huge_image_is_refused_before_decoding(tmp_path):
    path = tmp_path / "huge.png"
    path.write_bytes(huge_bilevel_png(20000, 20000))
    assert path.stat().st_size < 200_000
    with pytest.raises(ImageError, match="huge.png") as exc:
        open_image(path)  # 400M pixels: beyond PIL's own decompression-bomb limit, too
    assert_one_line(exc)


def test_large_image_over_our_limit(tmp_path):
    side = int(MAX_PIXELS ** 0.5) + 8  # just over MAX_PIXELS, under PIL's own limits
    with pytest.raises(ImageError, match=f"{side}x{side}") as exc:
        open_image(huge_bilevel_png(side, side), "big.png")
    assert_one_line(exc)


def test_missing_file(tmp_path):
    with pytest.raises(ImageError, match="not found") as exc:
        open_image(tmp_path / "nope.png")
    assert_one_line(exc)


# -- mode conversion --------------------------------------------------------------------------------------------------

def test_rgba_alpha_is_composited_on_black():
    rgba = np.zeros((2, 2, 4), dtype=np.uint8)
    rgba[0, 0] = (255, 100, 0, 0)  # fully transparent -> black
    rgba[0, 1] = (255, 100, 0, 255)  # opaque -> itself
    rgba[1, 0] = (200, 100, 50, 128)  # half -> about half
    img = Image.open(io.BytesIO(encode(Image.fromarray(rgba, "RGBA"))))
    out = image_to_pixels(img, 2, 3).astype(int)
    assert out.shape == (2, 2, 3)
    assert list(out[0, 0]) == [0, 0, 0]
    assert list(out[0, 1]) == [255, 100, 0]
    # c * 128/255 with PIL's integer rounding: allow 1 grey level.
    assert np.abs(out[1, 0] - np.array([200, 100, 50]) * 128 / 255).max() <= 1


def test_la_alpha_is_composited_on_black():
    img = Image.new("LA", (3, 3), (200, 128))
    out = image_to_pixels(img, 3, 1).astype(int)
    assert out.shape == (3, 3, 1)
    assert np.abs(out - 200 * 128 / 255).max() <= 1  # 1 grey level of integer rounding
    rgb = image_to_pixels(img, 3, 3)
    assert np.array_equal(rgb[..., 0], rgb[..., 1]) and np.array_equal(rgb[..., 0], out[..., 0])


def test_palette_with_and_without_transparency():
    pal = Image.new("P", (2, 2))
    pal.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0] + [0] * (256 * 3 - 9))
    pal.putdata([1, 2, 1, 0])
    opaque = image_to_pixels(Image.open(io.BytesIO(encode(pal))), 2, 3).reshape(-1, 3)
    assert opaque.tolist() == [[255, 0, 0], [0, 255, 0], [255, 0, 0], [0, 0, 0]]
    pal.info["transparency"] = 1  # palette entry 1 (red) is transparent -> black
    reread = Image.open(io.BytesIO(encode(pal)))
    assert reread.mode == "P" and reread.info.get("transparency") == 1
    clear = image_to_pixels(reread, 2, 3).reshape(-1, 3)
    assert clear.tolist() == [[0, 0, 0], [0, 255, 0], [0, 0, 0], [0, 0, 0]]


def test_16_bit_grayscale():
    img = Image.new("I;16", (2, 2))
    img.putdata([0, 1000, 30000, 65535])
    img = Image.open(io.BytesIO(encode(img)))
    assert img.mode == "I;16"
    out = image_to_pixels(img, 2, 1)[..., 0].astype(int)
    # Stretched from the image's own range to 0..255 and truncated: 1000/65535*255 = 3.9 -> 3.
    assert out.tolist() == [[0, 3], [116, 255]]


def test_bilevel_image():
    img = Image.new("1", (4, 4), 0)
    img.putpixel((1, 2), 1)
    out = image_to_pixels(img, 4, 1)[..., 0]
    assert out[2, 1] == 255 and out.sum() == 255


def test_to_mode_rejects_other_channel_counts():
    with pytest.raises(ImageError, match="1 or 3") as exc:
        to_mode(Image.new("RGB", (2, 2)), 4)
    assert_one_line(exc)


# -- centre crop and resize -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("landscape", [True, False])
def test_centre_crop_then_resize(landscape):
    # A 40 x 20 image: white 10-pixel bands on both sides of a black 20 x 20 centre (or the transpose).
    arr = np.full((20, 40), 255, dtype=np.uint8)
    arr[:, 10:30] = 0
    if not landscape:
        arr = arr.T.copy()
    img = Image.fromarray(arr)
    native = image_to_pixels(img, 20, 1)[..., 0]
    assert native.shape == (20, 20) and native.max() == 0  # exactly the centre square, no resampling
    # Cropping happens before resizing, so no white from the bands leaks into the downscaled image.
    small = image_to_pixels(img, 8, 1)[..., 0]
    assert small.shape == (8, 8) and small.max() == 0


def test_resize_keeps_an_off_centre_feature_in_place():
    arr = np.zeros((30, 50), dtype=np.uint8)  # the centre square is columns 10..39
    arr[:, 10:25] = 255  # left half of the centre square bright, right half dark
    out = image_to_pixels(Image.fromarray(arr), 6, 1)[..., 0].astype(int)
    assert out[:, :2].min() > 200 and out[:, 4:].max() < 55  # bicubic ringing stays within ~20% near the edge


def test_load_image_pixels_from_bytes_and_path(tmp_path):
    img = noise_image((10, 10))
    path = tmp_path / "n.png"
    img.save(path)
    from_path = load_image_pixels(path, 10, 3)
    from_bytes = load_image_pixels(path.read_bytes(), 10, 3, name="upload.png")
    assert from_path.dtype == np.uint8 and from_path.shape == (10, 10, 3)
    assert np.array_equal(from_path, np.asarray(img)) and np.array_equal(from_bytes, from_path)
