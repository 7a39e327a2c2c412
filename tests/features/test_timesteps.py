"""Timesteps and noise (attribution/features/timesteps.py): the uniform and cumulative timestep strategies, with
one-line errors for a K outside 1..T (checked through the feature config too), and noise keyed per sample, timestep,
draw and seed: a sample's noise does not depend on the batch it is drawn in, and distinct keys give independent
standard normal noise.
"""

from __future__ import annotations

import pytest
import torch

from engine_support import one_line

from attribution.errors import ConfigError
from attribution.features.config import FeatureConfig
from attribution.features.timesteps import noise_for, select_timesteps


# -- timesteps and noise ---------------------------------------------------------------------------------------


def test_timestep_strategies():
    assert select_timesteps("uniform", 10, 1000).tolist() == list(range(0, 1000, 100))
    assert select_timesteps("uniform", 3, 1000).tolist() == [0, 333, 666]  # range(0, 1000, 333)[:3]
    assert select_timesteps("uniform", 1000, 1000).tolist() == list(range(1000))
    assert select_timesteps("cumulative", 7, 1000).tolist() == list(range(7))
    assert select_timesteps("uniform", 10, 1000).dtype == torch.long
    for k in (0, -1, 1001):
        for strategy in ("uniform", "cumulative"):
            with pytest.raises(ConfigError, match="timesteps K") as exc:
                select_timesteps(strategy, k, 1000)
            one_line(exc)
    with pytest.raises(ConfigError, match="strategy"):
        select_timesteps("random", 10, 1000)
    # through the feature config: K is checked against the model's T when the gradient spec is made.
    assert FeatureConfig(timesteps=10).gradient_spec(1000).timesteps == tuple(range(0, 1000, 100))
    with pytest.raises(ConfigError, match="within 1..1000"):
        FeatureConfig(timesteps=5000).gradient_spec(1000)


def test_noise_is_keyed_per_sample_timestep_and_draw():
    ts = torch.tensor([0, 500])
    a = noise_for(["train/1", "train/2", "val/1"], ts, (1, 4, 4), seed=0, draws=2)
    assert a.shape == (3, 4, 1, 4, 4)
    # a sample's noise does not depend on what else is in the batch, or where.
    b = noise_for(["val/1", "train/1"], ts, (1, 4, 4), seed=0, draws=2)
    assert torch.equal(a[0], b[1]) and torch.equal(a[2], b[0])
    # different keys, timesteps, draws and seeds give different (independent) noise.
    flat = a.reshape(12, -1)
    corr = torch.corrcoef(flat)
    off = corr[~torch.eye(12, dtype=bool)]
    # 16 standard normals per entry: independent correlations have sd 1/sqrt(15) ~ 0.26; identical would be 1.
    assert off.abs().max() < 0.99
    assert not torch.equal(noise_for(["train/1"], ts, (1, 4, 4), seed=1), a[:1, ::2])
    assert torch.equal(noise_for(["train/1"], ts, (1, 4, 4), seed=0), a[:1, ::2])  # draw 0 of each t
    # standard normal: over 4096 values the mean is within 4 sd (4/64) of 0 and the variance within ~0.1 of 1.
    big = noise_for(["x"], torch.tensor([3]), (4096,), seed=0)
    assert abs(big.mean().item()) < 4 / 64 and abs(big.var().item() - 1) < 0.1
