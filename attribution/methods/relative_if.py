"""Relative Influence (Barshan et al. 2020) with TRAK's optimisations (D-TRAK paper, appendix A.3):
tau_n / ||(X^T X + lambda I)^{-1} phi(x_n)||."""

from .base import KernelMethod


class RelativeInfluence(KernelMethod):
    name = "relative-if"
    title = "Relative Influence"
    summary = "TRAK scores divided by the norm of each training row's kernel-inverse gradient"

    def score(self, train, G, lam):
        return train.kernel.scores(G, lam) / train.kernel.inverse_norms(lam)[None, :]

    def self_influence(self, train, lam):
        return train.kernel.self_influence(lam) / train.kernel.inverse_norms(lam)
