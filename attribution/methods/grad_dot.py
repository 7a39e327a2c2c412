"""Gradient dot product (D-TRAK paper, appendix A.3, "Gradient"; Charpiat et al. 2019): phi(x)^T phi(x_n)."""

from .base import Method, dot_scores


class GradDot(Method):
    name = "grad-dot"
    title = "Gradient (dot)"
    summary = "dot product of projected loss gradients, no kernel"
    uses_lambda = False

    def score(self, train, G, lam):
        return dot_scores(train, G)

    def self_influence(self, train, lam):
        return train.norms**2
