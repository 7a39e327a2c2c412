"""Generally influential training samples (Diffusion-ReTrac paper, Sec. 5): over many targets, how many distinct
training images appear in the top-k proponents, and which recur most. A method whose rankings are dominated by
a few images that rank high for every target (large-gradient-norm samples, under plain TracIn) has few unique
samples; the paper reports more unique samples under ReTrac than under TracIn.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import ConfigError


@dataclass
class TopKStats:
    """Top-k statistics of one method's (M targets x N training images) scores."""

    method: str
    k: int
    targets: int
    unique: int  # distinct training images over all targets' top-k
    recurring: list[tuple[int, int]]  # (training index, number of targets whose top-k holds it), most frequent first

    @property
    def unique_share(self) -> float:
        """unique / (targets x k): 1 when no image repeats, 1 / targets when every target has the same top-k."""
        return self.unique / (self.targets * self.k)

    def to_dict(self) -> dict:
        return {"method": self.method, "k": self.k, "targets": self.targets, "unique": self.unique,
                "unique_share": round(self.unique_share, 4),
                "recurring": [{"index": i, "count": c} for i, c in self.recurring]}


def top_k_indices(scores: np.ndarray, k: int) -> np.ndarray:
    """(M, k) indices of the k largest scores per row, largest first (ties in dataset order)."""
    scores = np.atleast_2d(scores)
    if not 1 <= k <= scores.shape[1]:
        raise ConfigError(f"--top must be within 1..{scores.shape[1]} (the training set size), got {k}")
    return np.argsort(-scores, axis=1, kind="stable")[:, :k]


def top_k_stats(method: str, scores: np.ndarray, k: int, most: int = 10) -> TopKStats:
    """Distinct top-k proponents over the targets (rows of `scores`) and the `most` most frequent ones."""
    top = top_k_indices(scores, k)
    ids, counts = np.unique(top, return_counts=True)
    order = np.lexsort((ids, -counts))[:most]
    return TopKStats(method, k, top.shape[0], int(len(ids)), [(int(ids[i]), int(counts[i])) for i in order])
