"""Metasmoothness (metagradient paper, Definition 2): is the trained model a smooth function of the data weights?

Train three runs with weights 1, 1 + h v, 1 + 2 h v (v ~ N(0, I), same seed otherwise) and compare the two
parameter differences coordinate by coordinate:

    d = |theta_2h - theta_0|,   score = sum_j (d_j / ||d||_1) * sign(theta_h - theta_0)_j * sign(theta_2h - theta_h)_j

A score near 1 means the weights move every parameter consistently (locally linear: metagradients are useful);
near 0 means the direction flips between the two steps (a chaotic run: the metagradient says little about a
finite change such as removing 1% of the data).
"""

from __future__ import annotations

import dataclasses
import itertools
import time

import torch

from ..errors import ConfigError
from .weighted_train import TrainConfig, WeightedRun


def metasmoothness(run: WeightedRun, h: float = 0.1, seed: int = 0) -> float:
    if not h > 0:
        raise ConfigError(f"metasmoothness step h must be > 0, got {h}")
    g = torch.Generator().manual_seed(seed)
    v = torch.randn(run.n, generator=g, dtype=torch.float64).to(run.config.torch_dtype)
    ones = torch.ones(run.n, dtype=run.config.torch_dtype)
    th0, th1, th2 = (run.train(ones + c * h * v) for c in (0, 1, 2))
    d = (th2 - th0).abs().double()
    if float(d.sum()) == 0:
        return float("nan")
    return float((d / d.sum() * torch.sign(th1 - th0).double() * torch.sign(th2 - th1).double()).sum())


def smoothness_grid(data: torch.Tensor, model, base: TrainConfig, batch_sizes=(64, 256), lrs=(3e-3, 1e-2),
                    eps_roots=(1e-8, 1e-6), h: float = 0.1, progress=None) -> list[dict]:
    """Metasmoothness for every (batch size, lr, eps_root) on the grid; other settings from `base`."""
    rows = []
    cells = list(itertools.product(batch_sizes, lrs, eps_roots))
    for i, (b, lr, e) in enumerate(cells):
        cfg = dataclasses.replace(base, batch_size=int(b), lr=float(lr), eps_root=float(e))
        run = WeightedRun(data, model, cfg)
        start = time.perf_counter()
        score = metasmoothness(run, h=h)
        theta = run.train()
        rows.append({"batch_size": int(b), "lr": float(lr), "eps_root": float(e), "steps": cfg.steps,
                     "smoothness": score, "train_loss": run.train_loss(theta),
                     "seconds": time.perf_counter() - start})
        if progress:
            progress(i + 1, len(cells), rows[-1])
    return rows
