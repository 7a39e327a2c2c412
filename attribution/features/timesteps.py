"""Which timesteps and which noise a feature is computed at.

Timestep strategies (D-TRAK, Sec. 2.4 of METHODS.md):
- `uniform`: range(0, T, T // K), the first K of them: for K=10, T=1000 that is 0, 100, ..., 900;
- `cumulative`: the first K timesteps, 0..K-1;
- `training` (Diffusion-TracIn): each training image at the timestep it was drawn at in the training epoch that
  ended at the checkpoint (recorded by `attribution train`), else at one timestep drawn per image from its key;
  targets at the K uniform timesteps.

Noise is a pure function of (seed, sample key, timestep, draw): a sample's feature never depends on batch size or
position. The key names the sample: "train/17", "val/3", "gen/42" or "file/<content hash>", so a training image
used as a target gets exactly the noise of its own training row.
"""

from __future__ import annotations

import hashlib

import numpy as np
import torch

from ..errors import ConfigError

STRATEGIES = ("uniform", "cumulative", "training")


def select_timesteps(strategy: str, k: int, num_timesteps: int) -> torch.Tensor:
    """The K timesteps of a strategy, as an int64 tensor."""
    if strategy not in STRATEGIES:
        raise ConfigError(f"unknown timestep strategy {strategy!r}; use one of: {', '.join(STRATEGIES)}")
    if not 1 <= k <= num_timesteps:
        raise ConfigError(f"the number of timesteps K must be within 1..{num_timesteps}, got {k}")
    if strategy in ("uniform", "training"):  # training: the targets' grid (training rows use their own t)
        return torch.arange(0, num_timesteps, num_timesteps // k, dtype=torch.long)[:k]
    return torch.arange(k, dtype=torch.long)


def noise_seed(seed: int, key: str, t: int, draw: int = 0) -> int:
    digest = hashlib.sha256(f"{seed}/{key}/{t}/{draw}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def noise_for(keys: list[str], timesteps: torch.Tensor, shape: tuple[int, ...], seed: int, draws: int = 1,
              ) -> torch.Tensor:
    """Standard normal noise of shape (len(keys), len(timesteps) * draws, *shape), one CPU stream per entry."""
    out = torch.empty((len(keys), len(timesteps) * draws, *shape))
    gen = torch.Generator()
    for i, key in enumerate(keys):
        for j, t in enumerate(timesteps.tolist()):
            for d in range(draws):
                gen.manual_seed(noise_seed(seed, key, t, d))
                out[i, j * draws + d] = torch.randn(shape, generator=gen)
    return out


def sampled_timesteps(keys: list[str], num_timesteps: int, seed: int) -> torch.Tensor:
    """One timestep per sample drawn uniformly from [0, T), a pure function of (seed, key): the stand-in for
    training timesteps a checkpoint did not record."""
    return torch.tensor([noise_seed(seed, key, -1) % num_timesteps for key in keys], dtype=torch.long)


def training_timesteps(model, train, seed: int) -> tuple[np.ndarray, str]:
    """The timestep of each training row for the "training" strategy, and its source: "recorded" (the epoch
    that ended at this checkpoint, when its run trained on exactly this dataset) or "sampled" (one uniform draw
    per image, keyed by seed and row)."""
    info = model.info
    recorded = info.training_timesteps() if info else None
    meta = info.run_metadata() if info else {}
    if (recorded is not None and train.split == "train" and len(recorded) == len(train)
            and meta.get("dataset_hash") == train.content_hash and meta.get("n_train") == len(train)):
        return recorded, "recorded"
    keys = [f"{train.split}/{i}" for i in range(len(train))]
    return sampled_timesteps(keys, model.num_timesteps, seed).numpy(), "sampled"
