"""Gradient cosine similarity (D-TRAK paper, appendix A.3, "Gradient", cosine form)."""

import numpy as np

from ..errors import ConfigError
from .base import Method


class GradCos(Method):
    name = "grad-cos"
    title = "Gradient (cosine)"
    summary = "cosine similarity of projected loss gradients, no kernel"
    uses_lambda = False

    def score(self, train, G, lam):
        G = np.asarray(G, dtype=np.float64)
        g_norm = np.linalg.norm(G, axis=1, keepdims=True)
        dots = G @ np.asarray(train.X, dtype=np.float64).T
        return dots / np.maximum(g_norm, 1e-30) / np.maximum(train.norms, 1e-30)[None, :]

    def self_influence(self, train, lam):
        raise ConfigError("self-influence is always 1 under cosine similarity; use grad-dot, trak or dtrak")
