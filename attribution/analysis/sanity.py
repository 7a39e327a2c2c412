"""Checks of attribution scores that can fail, and the sign convention that links scores to retraining.

The sign (D-TRAK's `-scores`, LDS): tau_i is the score of training image i for a target, positive for a
proponent. Removing nothing and training on a subset S, or taking a gradient step on the images of S, changes the
target's loss by approximately

    predicted change of the target's loss = -sum_{i in S} tau_i            (`predicted_loss_change`)

up to a positive factor (the step size, for one SGD step with gradient-dot scores exactly -lr x tau_i to first
order; tests/analysis/test_sanity.py checks this on a tiny model). The linear datamodeling score (LDS) of the
evaluation correlates this prediction, over random subsets S, with the loss change measured after retraining on S
(`attribution train --indices`): the same formula, no other sign flip.

Class agreement: the fraction of a target's top proponents that share its class, with a 95% confidence interval
over targets, against the fraction expected by chance (the class frequencies of the training set). Agreement
above chance says the scores carry class information; a check that also holds for random features (a training
image used as a target is its own top proponent: its self-score is a leverage score) says nothing about quality.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import ConfigError


def predicted_loss_change(scores: np.ndarray, subset) -> np.ndarray:
    """-sum_{i in S} tau_i: the predicted change of each target's loss when the model trains on (a gradient
    step over) the training images `subset`. `scores` (M, N) or (N,); returns (M,) or a scalar."""
    scores = np.asarray(scores, dtype=np.float64)
    idx = np.asarray(subset, dtype=np.int64)
    if idx.size and (idx.min() < 0 or idx.max() >= scores.shape[-1]):
        raise ConfigError(f"subset indices must lie in 0..{scores.shape[-1] - 1}")
    return -scores[..., idx].sum(-1)


@dataclass(frozen=True)
class ClassAgreement:
    """Share of the top proponents in the target's class: `rate` (mean over targets), its 95% interval
    [`low`, `high`] over targets, and `chance` (the share a random ranking would give)."""

    rate: float
    low: float
    high: float
    chance: float
    targets: int
    top: int

    @property
    def above_chance(self) -> bool:
        return self.low > self.chance

    def describe(self) -> str:
        verdict = "above chance" if self.above_chance else "not distinguishable from chance"
        return (f"class agreement of the top {self.top} proponents: {self.rate:.0%} (95% CI {self.low:.0%}-"
                f"{self.high:.0%} over {self.targets} targets) vs {self.chance:.0%} by chance: {verdict}")


def class_agreement(scores: np.ndarray, train_labels: np.ndarray, target_labels: np.ndarray,
                    top: int = 10) -> ClassAgreement:
    """Class agreement of each target's `top` proponents (largest scores), with a normal-approximation 95%
    interval of the mean over targets (targets are the independent units: a target's proponents are not), and
    the chance level sum_c p(c in target classes) x share of class c in the training set."""
    scores = np.atleast_2d(np.asarray(scores, dtype=np.float64))
    train_labels, target_labels = np.asarray(train_labels), np.asarray(target_labels)
    m, n = scores.shape
    if len(train_labels) != n or len(target_labels) != m:
        raise ConfigError(f"class agreement needs one label per training image ({n}) and per target ({m})")
    if not 1 <= top <= n:
        raise ConfigError(f"top must lie in 1..{n}, got {top}")
    order = np.argsort(-scores, axis=1, kind="stable")[:, :top]
    per_target = (train_labels[order] == target_labels[:, None]).mean(1)
    rate = float(per_target.mean())
    half = 1.96 * float(per_target.std(ddof=1)) / np.sqrt(m) if m > 1 else 1.0
    chance = float(np.mean([(train_labels == c).mean() for c in target_labels]))
    return ClassAgreement(rate, max(0.0, rate - half), min(1.0, rate + half), chance, m, top)
