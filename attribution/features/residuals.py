"""Per-training-image statistics a scoring rule needs beside the features (one number per row, cached like them).

Both come from one error curve per training image x_n (Lin et al., ICLR 2025; `Jinxu-Lin/DAS`, `04_eval.py`
computes the errors): the per-timestep training error e_t = sqrt(mean (eps_hat(x_t, t) - eps)^2) over E evenly
spaced timesteps (one noise draw each; the reference code uses E = 1000, every timestep).

- `das-residual`: DAS's training-residual weight as the reference computes it (`07_score.py`, `load_error`),

      w_n = mean_t ( e_t / ||e||_2 ),

  the mean of the error curve divided by its L2 norm across timesteps. It is scale-free: it measures only the
  *shape* of the curve (at most 1/sqrt(E), reached by a flat curve) and not how large the image's residual is. On
  the digits bank's model it lies in [0.200, 0.238] with a coefficient of variation of 2.8% across the 1,618
  training images, so DAS is D-TRAK with the Avg output up to a few-percent reweighting of its columns.
- `das-residual-size`: the residual's size, w_n = mean_t e_t (the same curve, not normalised): what DAS's
  leave-one-out Newton step multiplies the kernel score by (the parameter change from removing x_n is
  proportional to its residual), reduced to one scalar per image like the reference's weight (`das-size`).

The feature kinds `ResidualShape` and `ResidualSize` are gradient features with one of these statistics beside
them: the rows are the plain gradient features (the same store as D-TRAK's with the same options), the statistic is
computed after them into a one-column store under cache/stats/ (resumable, like features).
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import torch

from ..errors import ConfigError
from ..models.adapter import DiffusionModel
from ..store import FeatureStore, stats_dir
from .gradients import GradientFeatures
from .timesteps import noise_seed

# How many evenly spaced timesteps the residual curve is taken at (the reference: all 1000 of its model's; here 10,
# the features' grid, for CPUs: 16k forward passes on the digits set instead of 1.6M).
RESIDUAL_TIMESTEPS = 10

ROW_STATISTICS = ("das-residual", "das-residual-size")


def residual_timesteps(num_timesteps: int, count: int = RESIDUAL_TIMESTEPS) -> torch.Tensor:
    count = min(count, num_timesteps)
    return torch.arange(0, num_timesteps, num_timesteps // count, dtype=torch.long)[:count]


@torch.no_grad()
def residual_curves(model: DiffusionModel, x0: torch.Tensor, keys: list[str], seed: int = 0,
                    count: int = RESIDUAL_TIMESTEPS) -> torch.Tensor:
    """e_t = sqrt(mean squared training error) of each image at each of the `count` timesteps: (B, E) float64.
    The noise of (image, t) is a pure function of (seed, key, t)."""
    ts = residual_timesteps(model.num_timesteps, count)
    z0 = model.encode(x0.to(model.device))
    cond = model.condition(keys)
    gen = torch.Generator()
    out = torch.empty(len(keys), len(ts), dtype=torch.float64)
    for j, t in enumerate(ts.tolist()):
        eps = []
        for key in keys:
            gen.manual_seed(noise_seed(seed, f"das-residual/{key}", t))
            eps.append(torch.randn(tuple(z0.shape[1:]), generator=gen))
        eps = torch.stack(eps).to(model.device)
        tt = torch.full((len(keys),), t, dtype=torch.long, device=model.device)
        x_t = model.schedule.add_noise(z0, eps, tt)
        pred = model.raw(model.parameters(), x_t, tt, cond)
        err = (pred - model.prediction_target(z0, eps, tt)).double().flatten(1).pow(2).mean(1)
        out[:, j] = err.sqrt().cpu()
    return out


def row_statistic(name: str, model: DiffusionModel, x0: torch.Tensor, keys: list[str], seed: int = 0,
                  ) -> np.ndarray:
    """One statistic (ROW_STATISTICS) of each image: (B,) float64."""
    if name not in ROW_STATISTICS:
        raise KeyError(name)
    e = residual_curves(model, x0, keys, seed)
    if name == "das-residual":
        return (e / (e.norm(dim=1, keepdim=True) + 1e-8)).mean(1).numpy()
    return e.mean(1).numpy()


class ResidualFeatures(GradientFeatures):
    """Gradient features and one per-row statistic of the training images' residual curves (`row_statistic`)."""

    statistic_name: ClassVar[str]

    def __init__(self, model, train, cfg, cache_dir, batch_size=16):
        super().__init__(model, train, cfg, cache_dir, batch_size)
        self._values = None

    def finish(self, progress=None) -> None:
        self._load(progress)

    def statistic(self, name: str) -> np.ndarray:
        if name != self.statistic_name:
            raise ConfigError(f"these training features carry the {self.statistic_name!r} statistic, not {name!r}")
        return self._load()

    def _load(self, progress=None) -> np.ndarray:
        """The statistic of every training row, computed in batches where missing (resumable)."""
        if self._values is None:
            name, n = self.statistic_name, len(self.train)
            checkpoint = self.model.identity()
            identity = {"checkpoint": checkpoint, "dataset": self.train.spec, "dataset_hash": self.train.content_hash,
                        "split": self.train.split, "n": n, "statistic": name, "seed": self.cfg.seed,
                        "timesteps": RESIDUAL_TIMESTEPS}
            path = stats_dir(checkpoint, self.train.spec, self.train.split, name, identity, self.cache_dir)
            store = FeatureStore.open(path, identity, n, 1, {"checkpoint_spec": self.model.spec})
            with store.exclusive():
                todo = np.flatnonzero(~store.done())
                for s in range(0, len(todo), self.batch_size):
                    rows = todo[s:s + self.batch_size]
                    values = row_statistic(name, self.model, self.train.tensors(rows), self.train_keys(rows),
                                           self.cfg.seed)
                    store.write_rows(rows, values[:, None])
                    if progress:
                        progress(n - len(todo) + s + len(rows), n, name)
            self._values = np.asarray(store.features()[:, 0], dtype=np.float64)
        return self._values


class ResidualShape(ResidualFeatures):
    """DAS's scale-free residual weight beside the gradient features (`das`, `das0`)."""

    kind = statistic_name = "das-residual"
    description = "gradient features with DAS's residual weights"


class ResidualSize(ResidualFeatures):
    """The residual's size beside the gradient features (`das-size`)."""

    kind = statistic_name = "das-residual-size"
    description = "gradient features with the residual sizes"
