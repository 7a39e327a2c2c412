"""How much an image changed: pixel L2, SSIM and CLIP cosine between a generated image and its regeneration.

Images are 8-bit pixels (H, W, C) uint8, the images people see (`targets.py`), read as values in [0, 1]:

- `pixel_l2(a, b)`: the Euclidean distance over all pixels and channels (D-TRAK's "pixel-wise l2-distance"); 0 for
  identical images, at most sqrt(H * W * C).
- `ssim(a, b)`: the structural similarity index of Wang et al. (2004) with their recommended settings: Gaussian
  weights (sigma 1.5, window 11: the filter truncated at 3.5 sigma), population (co)variances, K1 = 0.01,
  K2 = 0.03, data range 1; the SSIM map averaged over the pixels whose window fits inside the image (a 5-pixel
  border is left out, as scikit-image's `structural_similarity(..., gaussian_weights=True,
  use_sample_covariance=False)` does) and over channels. 1 for identical images. Implemented here on
  scipy.ndimage (no new dependency).
- `clip_cosine(embedder, a, b)`: cosine similarity of CLIP image embeddings (`features.embeddings.ClipEmbedder`,
  weights from a local file; none ship).
"""

from __future__ import annotations

import numpy as np

from ..errors import ConfigError

SSIM_SIGMA = 1.5
SSIM_TRUNCATE = 3.5
SSIM_K1, SSIM_K2 = 0.01, 0.03


def _unit(pixels: np.ndarray) -> np.ndarray:
    """uint8 (H, W[, C]) -> float64 (H, W, C) in [0, 1]."""
    x = np.asarray(pixels)
    if x.dtype != np.uint8:
        raise ConfigError(f"image metrics take 8-bit pixels, got dtype {x.dtype}")
    if x.ndim == 2:
        x = x[..., None]
    if x.ndim != 3:
        raise ConfigError(f"image metrics take (H, W) or (H, W, C) pixels, got shape {x.shape}")
    return x.astype(np.float64) / 255.0


def _pair(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    x, y = _unit(a), _unit(b)
    if x.shape != y.shape:
        raise ConfigError(f"cannot compare images of shapes {x.shape} and {y.shape}")
    return x, y


def pixel_l2(a: np.ndarray, b: np.ndarray) -> float:
    x, y = _pair(a, b)
    return float(np.sqrt(((x - y) ** 2).sum()))


def ssim_window() -> int:
    """The side of the Gaussian window: 2 * int(truncate * sigma + 0.5) + 1 = 11."""
    return 2 * int(SSIM_TRUNCATE * SSIM_SIGMA + 0.5) + 1


def ssim_map(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """The per-pixel SSIM (H, W, C) before cropping and averaging (reflect padding at the borders)."""
    from scipy.ndimage import gaussian_filter  # lazy: scipy submodules load slowly and only this step needs them

    x, y = _pair(a, b)
    c1, c2 = SSIM_K1 ** 2, SSIM_K2 ** 2

    def blur(z: np.ndarray) -> np.ndarray:
        return np.stack([gaussian_filter(z[..., c], SSIM_SIGMA, truncate=SSIM_TRUNCATE, mode="reflect")
                         for c in range(z.shape[-1])], axis=-1)

    mx, my = blur(x), blur(y)
    vx, vy, cxy = blur(x * x) - mx * mx, blur(y * y) - my * my, blur(x * y) - mx * my
    return ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))


def ssim(a: np.ndarray, b: np.ndarray) -> float:
    win = ssim_window()
    h, w = np.asarray(a).shape[:2]
    if min(h, w) < win:
        raise ConfigError(f"SSIM needs images of at least {win}x{win} pixels, got {h}x{w}")
    pad = (win - 1) // 2
    return float(ssim_map(a, b)[pad:h - pad, pad:w - pad].mean())


def to_tensor(pixels: np.ndarray):
    """uint8 (M, H, W, C) -> float32 (M, C, H, W) in [-1, 1] (the model's and the embedders' convention)."""
    import torch  # lazy: only the CLIP metric needs torch

    x = np.asarray(pixels)
    if x.ndim == 3:
        x = x[..., None]
    return torch.from_numpy(x.astype(np.float32) / 127.5 - 1.0).permute(0, 3, 1, 2).contiguous()


def clip_cosines(embedder, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine similarity of the CLIP embeddings of image pairs: a, b uint8 (M, H, W[, C]) -> (M,)."""
    ea = embedder.embed(to_tensor(a)).astype(np.float64)
    eb = embedder.embed(to_tensor(b)).astype(np.float64)
    return (ea * eb).sum(1) / (np.linalg.norm(ea, axis=1) * np.linalg.norm(eb, axis=1))
