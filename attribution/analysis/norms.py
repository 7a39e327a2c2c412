"""Gradient norm versus timestep (Diffusion-ReTrac paper, Sec. 4): per-sample loss-gradient norms depend strongly
on the diffusion timestep, so plain TracIn favours training images that happened to be drawn at timesteps with large
gradients ("generally influential" samples).

Two measurements, both of ||grad_theta L(x, t)|| over all UNet parameters (or a subset), exact (not projected):
- `sample_curve`: one image at a grid of timesteps (default 100, evenly spaced in [1, T-1]) with the same noise at
  every timestep, so the curve varies with t only;
- `training_norms`: a seeded random subset of the training set, each image at the timestep it was drawn at in the
  training epoch that ended at the checkpoint (recorded by `attribution train`), else at one sampled timestep;
  with the Spearman correlation between norm and timestep and per-timestep-bin medians.

Results are cached like features: a `FeatureStore` (rows = sampled images, one column = the norm) under
cache/norms/, written batch by batch and resumed after a kill.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..data import ImageDataset
from ..errors import ConfigError
from ..features.gradients import GradientSpec, gradient_norms
from ..features.outputs import OUTPUT_FUNCTIONS
from ..features.timesteps import training_timesteps
from ..models.adapter import DiffusionModel
from ..options import opt, validate
from ..store import FeatureStore, identity_hash, norms_dir

Progress = Callable[[int, int, str], None]


@dataclass(frozen=True)
class NormConfig:
    """What the norm analysis computes.

    Attributes:
        fn: output function whose gradient norm is taken ("simple" = the training loss).
        grid: number of timesteps of a single-sample curve.
        samples: training images in the norm-versus-timestep scatter (a seeded random subset; all if fewer).
        draws: noise draws averaged per (image, timestep) before the norm.
        seed: seed of the subset and of the noise.
        params: comma-separated parameter-name prefixes (None: all parameters).
    """

    fn: str = field(default="simple", metadata=opt("output function (simple: the training loss)",
                                                   choices=OUTPUT_FUNCTIONS, noun="output function"))
    grid: int = field(default=100, metadata=opt("timesteps of the single-sample curve"))
    samples: int = field(default=2000, metadata=opt("training images in the scatter"))
    draws: int = field(default=1, metadata=opt("noise draws averaged per (image, timestep)"))
    seed: int = field(default=0, metadata=opt("subset and noise seed"))
    params: str | None = field(default=None, metadata=opt("only parameters with these comma-separated name "
                                                          "prefixes"))

    def __post_init__(self):
        validate(self)  # the output function, in one line
        if self.grid < 1:
            raise ConfigError(f"--grid must be at least 1, got {self.grid}")
        if self.samples < 1:
            raise ConfigError(f"--samples must be at least 1, got {self.samples}")
        if self.draws < 1:
            raise ConfigError(f"--draws must be at least 1, got {self.draws}")

    def spec(self, timesteps=(0,)) -> GradientSpec:
        return GradientSpec(self.fn, tuple(int(t) for t in timesteps), self.draws, self.seed, params=self.params)


def grid_timesteps(num_timesteps: int, n: int) -> np.ndarray:
    """n timesteps evenly spaced in [1, T-1] (the reference code's linspace(1, 999, n)), without repeats."""
    return np.unique(np.linspace(1, num_timesteps - 1, min(n, num_timesteps - 1)).round().astype(np.int64))


def check_timesteps(timesteps, num_timesteps: int) -> np.ndarray:
    ts = np.asarray(timesteps, dtype=np.int64).reshape(-1)
    bad = ts[(ts < 0) | (ts >= num_timesteps)]
    if len(bad):
        raise ConfigError(f"timestep {int(bad[0])} is outside [0, {num_timesteps}) for this model")
    return ts


def sample_curve(model: DiffusionModel, image: torch.Tensor, key: str, cfg: NormConfig,
                 timesteps=None) -> tuple[np.ndarray, np.ndarray]:
    """(timesteps, norms) of one image (C, H, W) in [-1, 1] over a grid of timesteps, fixed noise."""
    ts = grid_timesteps(model.num_timesteps, cfg.grid) if timesteps is None else check_timesteps(
        timesteps, model.num_timesteps)
    norms = gradient_norms(model, image[None], [key], cfg.spec(ts), fixed_noise=True)
    return ts, norms[0].cpu().numpy().astype(np.float64)


def subset_indices(n: int, samples: int, seed: int) -> np.ndarray:
    """A seeded random subset of range(n) of size min(samples, n), sorted."""
    if samples >= n:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, samples, replace=False))


@dataclass
class TrainingNorms:
    """Gradient norms of a training subset, each image at its training timestep."""

    checkpoint: str
    indices: np.ndarray  # (n,) training-set rows
    timesteps: np.ndarray  # (n,)
    norms: np.ndarray  # (n,)
    labels: np.ndarray  # (n,) class ids (-1: none)
    source: str  # "recorded" or "sampled" training timesteps

    def spearman(self) -> float:
        """Spearman rank correlation between norm and timestep (negative: small t, large norms)."""
        from scipy.stats import spearmanr  # lazy: scipy.stats takes a second to import

        return float(spearmanr(self.norms, self.timesteps).statistic) if len(self.norms) > 2 else float("nan")

    def binned(self, bins: int = 10, num_timesteps: int = 1000) -> list[dict]:
        """Median, mean and count of the norms in `bins` equal timestep bins."""
        edges = np.linspace(0, num_timesteps, bins + 1).round().astype(int)
        rows = []
        for lo, hi in zip(edges[:-1], edges[1:]):
            sel = (self.timesteps >= lo) & (self.timesteps < hi)
            vals = self.norms[sel]
            rows.append({"t_from": int(lo), "t_to": int(hi) - 1, "count": int(sel.sum()),
                         "median": float(np.median(vals)) if len(vals) else float("nan"),
                         "mean": float(vals.mean()) if len(vals) else float("nan")})
        return rows

    def table(self, class_name: Callable[[int], str]) -> list[dict]:
        return [{"checkpoint": self.checkpoint, "index": int(i), "label": class_name(int(i)), "timestep": int(t),
                 "norm": float(v)} for i, t, v in zip(self.indices, self.timesteps, self.norms)]


def training_norms(model: DiffusionModel, train: ImageDataset, cfg: NormConfig, cache: str | Path | None = None,
                   progress: Progress | None = None, batch_size: int = 16) -> TrainingNorms:
    """Norms of `cfg.samples` training images at their training timesteps (cached, resumable)."""
    rows = subset_indices(len(train), cfg.samples, cfg.seed)
    all_t, source = training_timesteps(model, train, cfg.seed)
    ts = all_t[rows]
    identity = {"checkpoint": model.identity(), "dataset": train.spec, "dataset_hash": train.content_hash,
                "split": train.split, "rows": identity_hash({"rows": rows.tolist(), "t": ts.tolist()}),
                "source": source, "config": asdict(cfg)}
    path = norms_dir(model.identity(), train.spec, train.split, f"{cfg.fn}-n{len(rows)}-d{cfg.draws}-s{cfg.seed}",
                     identity, cache)
    store = FeatureStore.open(path, identity, len(rows), 1, {"checkpoint_spec": model.spec})
    todo = np.flatnonzero(~store.done())
    for s in range(0, len(todo), batch_size):
        part = todo[s:s + batch_size]
        keys = [f"{train.split}/{i}" for i in rows[part]]
        norms = gradient_norms(model, train.tensors(rows[part]), keys, cfg.spec(),
                               torch.as_tensor(ts[part]).reshape(-1, 1))
        store.write_rows(part, norms.cpu().numpy().reshape(-1, 1))
        if progress:
            progress(len(rows) - len(todo) + s + len(part), len(rows), model.spec)
    if progress and not len(todo):
        progress(len(rows), len(rows), f"{model.spec} (cached)")
    return TrainingNorms(model.spec, rows, ts, np.array(store.features()[:, 0], dtype=np.float64),
                         train.labels[rows], source)
