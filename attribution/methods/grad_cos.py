"""Gradient cosine similarity (D-TRAK paper, appendix A.3, "Gradient", cosine form)."""

from ..errors import ConfigError
from .base import Method, cosine_scores


class GradCos(Method):
    name = "grad-cos"
    title = "Gradient (cosine)"
    summary = "cosine similarity of projected loss gradients, no kernel"
    uses_lambda = False
    has_self_influence = False

    def score(self, train, G, lam):
        return cosine_scores(train, G)

    def self_influence(self, train, lam):
        raise ConfigError("self-influence is always 1 under cosine similarity; use grad-dot, trak or dtrak")
