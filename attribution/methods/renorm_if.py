"""Renormalized Influence (Hammoudeh & Lowd 2022) with TRAK's optimisations (D-TRAK paper, appendix A.3):
tau_n / ||phi(x_n)||."""

import numpy as np

from .base import KernelMethod


class RenormalizedInfluence(KernelMethod):
    name = "renorm-if"
    title = "Renormalized Influence"
    summary = "TRAK scores divided by the norm of each training row's projected gradient"

    def score(self, train, G, lam):
        return train.kernel.scores(G, lam) / np.maximum(train.norms, 1e-30)[None, :]

    def self_influence(self, train, lam):
        return train.kernel.self_influence(lam) / np.maximum(train.norms, 1e-30)
