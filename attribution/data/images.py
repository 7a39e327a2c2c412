"""Reading user images and image files safely, and converting them to what a model sees.

Model tensors are float32 in [-1, 1], shape (C, R, R). Pixels are uint8 arrays of shape (H, W, C).
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from ..errors import ImageError
from ..fileio import reason

# Larger images are refused before decoding (a 20000 x 20000 PNG would need 1.2 GB as RGB).
MAX_PIXELS = 4096 * 4096
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
# The modes `to_mode` turns into both grayscale and RGB (a TIFF can also hold LAB, which PIL makes no grayscale of).
MODES = {"1", "L", "P", "RGB", "RGBA", "RGBX", "LA", "PA", "CMYK", "YCbCr", "HSV", "I", "I;16", "I;16B", "I;16L",
         "I;16N", "F"}
READABLE = "give a PNG, JPEG, BMP, GIF, WebP or TIFF image"


def open_image(source: str | os.PathLike | bytes, name: str | None = None) -> Image.Image:
    """Open and fully decode an image from a path or bytes; raise `ImageError` with one clear line otherwise."""
    label = name or (Path(source).name if not isinstance(source, bytes) else "upload")
    if not isinstance(source, bytes):
        path = Path(source)
        if not path.is_file():
            raise ImageError(f"image file not found: {path}")
        source = path.read_bytes()
    if not source:
        raise ImageError(f"{label} is empty (0 bytes); {READABLE}")
    try:
        img = Image.open(io.BytesIO(source))
    except UnidentifiedImageError:
        raise ImageError(f"{label} is not an image file PIL can read (PNG, JPEG, BMP, GIF, WebP, TIFF)") from None
    except Image.DecompressionBombError:  # PIL refuses > 2 x Image.MAX_IMAGE_PIXELS (about 179M pixels) itself
        raise ImageError(f"{label} is far larger than {MAX_PIXELS:,} pixels; images that large are refused") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:  # a header cut short (JPEG, BMP, WebP)
        raise ImageError(f"{label} is truncated or corrupt ({reason(exc)})") from None
    w, h = img.size
    if w * h > MAX_PIXELS:
        raise ImageError(f"{label} is {w}x{h} pixels; images larger than {MAX_PIXELS:,} pixels are refused")
    if img.mode not in MODES:
        raise ImageError(f"{label} is a {img.mode} image, which cannot be made grayscale or RGB; save it as an RGB "
                         "or grayscale PNG or JPEG")
    try:
        img.load()
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageError(f"{label} is truncated or corrupt ({reason(exc)})") from None
    return img


def to_mode(img: Image.Image, channels: int) -> Image.Image:
    """Convert to 'L' (1 channel) or 'RGB' (3 channels); transparency is composited onto black."""
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        img = Image.alpha_composite(background, rgba)
    if img.mode.startswith("I") or img.mode == "F":
        arr = np.asarray(img, dtype=np.float64)
        lo, hi = float(arr.min()), float(arr.max())
        if hi > lo:
            arr = (arr - lo) / (hi - lo) * 255
        else:  # a constant image keeps its level relative to the type's range (16-bit: 0..65535)
            arr = np.full_like(arr, 255.0 * min(1.0, max(0.0, lo / (65535.0 if img.mode.startswith("I") else 1.0))))
        img = Image.fromarray(arr.astype(np.uint8))
    if channels == 1:
        return img.convert("L")
    if channels == 3:
        return img.convert("RGB")
    raise ImageError(f"models with {channels} channels are not supported (1 or 3)")


def resize_square(img: Image.Image, resolution: int) -> Image.Image:
    """Centre-crop to a square, then resize to resolution x resolution (bicubic, antialiased)."""
    w, h = img.size
    side = min(w, h)
    if w != h:
        left, top = (w - side) // 2, (h - side) // 2
        img = img.crop((left, top, left + side, top + side))
    if side != resolution:
        img = img.resize((resolution, resolution), Image.Resampling.BICUBIC)
    return img


def enlarged_note(name: str, size: tuple[int, int], resolution: int) -> str | None:
    """A warning for an image whose centre square (its shorter side) is smaller than the model's resolution: it is
    enlarged, so the target holds only that much detail (a 1x1 image is one flat colour). None otherwise."""
    w, h = size
    side = min(w, h)
    if side >= resolution:
        return None
    return (f"{name} is {w}x{h} pixels, smaller than the {resolution}x{resolution} the model sees: it is enlarged, "
            f"so the target holds only the detail of a {side}x{side} image.")


def image_to_pixels(img: Image.Image, resolution: int, channels: int) -> np.ndarray:
    """PIL image -> uint8 (R, R, C) as the model sees it."""
    arr = np.asarray(resize_square(to_mode(img, channels), resolution), dtype=np.uint8)
    return arr[:, :, None] if arr.ndim == 2 else arr


def pixels_to_tensor(pixels: np.ndarray) -> torch.Tensor:
    """uint8 (..., H, W, C) -> float32 (..., C, H, W) in [-1, 1]."""
    arr = np.ascontiguousarray(pixels)
    if not arr.flags.writeable:  # datasets keep read-only pixels; torch warns on wrapping those, so copy
        arr = arr.copy()
    t = torch.from_numpy(arr).float().div(127.5).sub(1.0)
    return t.movedim(-1, -3)


def tensor_to_pixels(x: torch.Tensor) -> np.ndarray:
    """float (..., C, H, W) in [-1, 1] -> uint8 (..., H, W, C), clipped."""
    x = x.detach().float().cpu().clamp(-1, 1).add(1).mul(127.5).round().to(torch.uint8)
    return x.movedim(-3, -1).numpy()


def pixels_to_pil(pixels: np.ndarray, display_size: int | None = None) -> Image.Image:
    """uint8 (H, W, C) -> PIL, optionally enlarged (nearest neighbour, so pixels stay visible)."""
    arr = pixels[:, :, 0] if pixels.shape[-1] == 1 else pixels
    img = Image.fromarray(arr)
    if display_size and display_size != img.width:
        img = img.resize((display_size, display_size), Image.Resampling.NEAREST)
    return img


def load_image_pixels(source: str | os.PathLike | bytes, resolution: int, channels: int,
                      name: str | None = None) -> np.ndarray:
    """Read one image file and return it as the model sees it: uint8 (R, R, C)."""
    return image_to_pixels(open_image(source, name), resolution, channels)


def load_npz_images(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray | None]:
    """Read an .npz with `images` (uint8, N x H x W or N x H x W x C) and optional `labels` (N,).

    Returns (images as N x H x W x C uint8, labels or None). No pickles are read.
    """
    path = Path(path)
    if not path.is_file():
        raise ImageError(f"npz file not found: {path}")
    try:
        with np.load(path, allow_pickle=False) as data:
            if "images" not in data.files:
                raise ImageError(f"{path.name} has no 'images' array (found: {', '.join(data.files) or 'nothing'})")
            images = data["images"]
            labels = data["labels"] if "labels" in data.files else None
    except ImageError:
        raise
    except Exception as exc:  # zipfile.BadZipFile, ValueError (pickled object arrays), OSError
        raise ImageError(f"{path.name} is not a readable .npz file ({type(exc).__name__}: {exc})") from None
    if images.dtype != np.uint8:
        raise ImageError(f"{path.name}: 'images' must be uint8 in 0..255, got {images.dtype}")
    if images.ndim == 3:
        images = images[..., None]
    if images.ndim != 4 or images.shape[-1] not in (1, 3) or images.shape[0] == 0:
        raise ImageError(f"{path.name}: 'images' must be N x H x W or N x H x W x C with C in (1, 3), "
                         f"got shape {tuple(images.shape)}")
    if labels is not None:
        labels = np.asarray(labels)
        if labels.shape != (images.shape[0],) or not np.issubdtype(labels.dtype, np.integer):
            raise ImageError(f"{path.name}: 'labels' must be N integers, got {labels.dtype} {tuple(labels.shape)}")
    return images, labels


def convert_pixels(images: np.ndarray, resolution: int, channels: int) -> np.ndarray:
    """Bring a uint8 (N, H, W, C) array to (N, R, R, channels), resizing and converting mode as needed."""
    n, h, w, c = images.shape
    if h == w == resolution and c == channels:
        return images
    out = np.empty((n, resolution, resolution, channels), dtype=np.uint8)
    for i in range(n):
        arr = images[i, :, :, 0] if c == 1 else images[i]
        out[i] = image_to_pixels(Image.fromarray(arr), resolution, channels)
    return out


def grid_image(pixels: np.ndarray, columns: int | None = None, scale: int = 4, pad: int = 1) -> Image.Image:
    """uint8 (N, H, W, C) -> one PIL grid (columns default to ceil(sqrt(N))), enlarged `scale` times."""
    n, h, w, c = pixels.shape
    cols = columns or int(np.ceil(np.sqrt(n)))
    rows = int(np.ceil(n / cols))
    canvas = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad, c), 255, dtype=np.uint8)
    for i in range(n):
        r, q = divmod(i, cols)
        canvas[pad + r * (h + pad):pad + r * (h + pad) + h, pad + q * (w + pad):pad + q * (w + pad) + w] = pixels[i]
    img = pixels_to_pil(canvas)
    return img.resize((img.width * scale, img.height * scale), Image.Resampling.NEAREST)
