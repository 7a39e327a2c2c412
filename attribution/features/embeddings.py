"""Model-free image embeddings for the similarity baselines (D-TRAK paper, Sec. 4 and Table 7).

- `pixel_embeddings`: the flattened pixels in [-1, 1] (C x H x W values per image), scored by dot product or
  cosine (the paper's "raw pixel" baselines).
- `ClipEmbedder`: an open_clip image tower (ViT-B-32 by default, as the paper's CLIP ViT-B/32) on CLIP-preprocessed
  images: grey images repeated to 3 channels, resized bicubically to the tower's input size, normalised with the
  CLIP mean and standard deviation. No CLIP weights ship with any package and nothing is downloaded: the user names a
  local weights file (an open_clip checkpoint, `.pt`/`.bin` loaded with weights_only=True, or `.safetensors`).
  `ClipEmbedder.random(...)` builds a randomly initialised tower for tests only.

Their feature kinds (`featurizer.Featurizer`): `PixelFeatures` and `ClipFeatures`, one row per image (no gradients,
no projection).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import torch

from ..errors import ConfigError
from .featurizer import Featurizer

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
CLIP_HELP = ("a local open_clip checkpoint for --clip-model (default ViT-B-32), e.g. the OpenAI ViT-B/32 weights "
             "saved with torch.save(model.state_dict(), 'clip-vit-b-32.pt') or open_clip_pytorch_model.bin / "
             ".safetensors from a machine with internet access; none ship and nothing is downloaded")


class PixelEmbedder:
    """The flattened pixels as features: `embed(images)` -> (M, C*H*W) float32."""

    identity = "pixels"

    def __init__(self, channels: int, resolution: int):
        self.dim = channels * resolution * resolution

    def embed(self, images: torch.Tensor) -> np.ndarray:
        return pixel_embeddings(images)


def pixel_embeddings(images: torch.Tensor) -> np.ndarray:
    """(M, C, H, W) images in [-1, 1] -> (M, C*H*W) float32."""
    return images.detach().float().reshape(len(images), -1).cpu().numpy().astype(np.float32)


def file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()[:16]


class ClipEmbedder:
    """The image tower of an open_clip model; `embed(images)` -> (M, D) float32 image embeddings."""

    def __init__(self, model: torch.nn.Module, identity: str, device: torch.device | str = "cpu",
                 batch_size: int = 32):
        self.model = model.to(device).eval()
        self.identity, self.device, self.batch_size = identity, torch.device(device), batch_size
        size = getattr(model.visual, "image_size", 224)
        self.size = int(size[0] if isinstance(size, (tuple, list)) else size)
        with torch.no_grad():
            self.dim = int(self.model.encode_image(torch.zeros(1, 3, self.size, self.size, device=device)).shape[1])

    @classmethod
    def from_file(cls, weights: str | Path | None, model_name: str = "ViT-B-32", device: torch.device | str = "cpu",
                  ) -> "ClipEmbedder":
        """Load `model_name` with the weights in the local file `weights` (one-line error when it is missing)."""
        import open_clip  # optional: open_clip, for the CLIP baselines only

        if not weights:
            raise ConfigError(f"the CLIP baselines need CLIP weights: give {CLIP_HELP}")
        path = Path(weights).expanduser()
        if not path.is_file():
            raise ConfigError(f"CLIP weights file not found: {path}; give {CLIP_HELP}")
        if model_name not in open_clip.list_models():
            raise ConfigError(f"unknown open_clip model {model_name!r}; e.g. ViT-B-32, ViT-B-16, RN50")
        try:
            model = open_clip.create_model(model_name, pretrained=str(path), device="cpu", weights_only=True)
        except Exception as exc:  # a file for another architecture, or not a checkpoint at all
            first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
            raise ConfigError(f"{path.name} is not usable as {model_name} weights ({first})") from None
        return cls(model, f"{model_name}:{file_digest(path)}", device)

    @classmethod
    def random(cls, model_name: str, seed: int = 0, device: torch.device | str = "cpu") -> "ClipEmbedder":
        """A randomly initialised tower (tests only: it exercises the code, its similarities mean nothing)."""
        import open_clip  # optional: open_clip, for the CLIP baselines only

        torch.manual_seed(seed)
        model = open_clip.create_model(model_name, pretrained=None, device="cpu")
        return cls(model, f"{model_name}:random-{seed}", device)

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """(M, C, H, W) in [-1, 1] -> CLIP input (M, 3, S, S)."""
        x = (images.float() + 1) / 2
        if x.shape[1] == 1:
            x = x.repeat(1, 3, 1, 1)
        x = torch.nn.functional.interpolate(x, size=(self.size, self.size), mode="bicubic", align_corners=False)
        mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
        std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)
        return (x.clamp(0, 1) - mean) / std

    @torch.no_grad()
    def embed(self, images: torch.Tensor) -> np.ndarray:
        out = []
        for s in range(0, len(images), self.batch_size):
            x = self.preprocess(images[s:s + self.batch_size]).to(self.device)
            out.append(self.model.encode_image(x).float().cpu())
        return torch.cat(out).numpy().astype(np.float32)


class EmbeddingFeatures(Featurizer):
    """An image embedding as the features of a similarity baseline: one row per image, no gradients."""

    def __init__(self, model, train, cfg, cache_dir, batch_size=16):
        super().__init__(model, train, cfg, cache_dir, batch_size)
        self.embedder = self.make_embedder()
        self.grad_dim = self.proj_dim = self.embedder.dim

    def make_embedder(self):
        raise NotImplementedError

    @classmethod
    def cost_kind(cls, cfg) -> str:
        return cls.slug(cfg)

    def identity(self) -> dict:
        return {"embedding": self.embedder.identity}

    def provenance(self) -> dict:
        return {"projector": {"embedding": self.embedder.identity}}

    def rows(self, images, keys, fn=None) -> np.ndarray:
        return self.embedder.embed(images)


class PixelFeatures(EmbeddingFeatures):
    """The flattened pixels (pixel-dot, pixel-cos)."""

    kind = "pixels"
    description = "pixel embeddings"

    @classmethod
    def config_dict(cls, cfg) -> dict:
        return {"embedding": "pixels"}

    @classmethod
    def slug(cls, cfg) -> str:
        return "pixels"

    def make_embedder(self):
        return PixelEmbedder(self.model.channels, self.model.resolution)


class ClipFeatures(EmbeddingFeatures):
    """CLIP image embeddings (clip-dot, clip-cos), the tower's weights from a local file."""

    kind = "clip"
    description = "CLIP embeddings"
    option_groups = frozenset({"clip"})

    @classmethod
    def config_dict(cls, cfg) -> dict:
        return {"embedding": "clip", "clip_model": cfg.clip_model}  # the weights: by digest, in `identity`

    @classmethod
    def slug(cls, cfg) -> str:
        return f"clip-{cfg.clip_model}"

    def make_embedder(self):
        return ClipEmbedder.from_file(self.cfg.clip_weights, self.cfg.clip_model, self.model.device)
