"""TracInCP (Pruthi et al. 2020; D-TRAK paper, appendix A.3): sum over checkpoints c of
eta_c <phi_c(x), phi_c(x_n)>, phi_c the projected gradient of the training loss (Simple) at checkpoint c, averaged
over the K feature timesteps (the same features as TRAK at that checkpoint). The D-TRAK paper averages four evenly
spaced checkpoints with equal weights and a projection seed per checkpoint (`--checkpoint-weights uniform`); by
default eta_c weights each by the learning rate it was trained at (`over_checkpoints.tracin_weights`,
one projection)."""

from .base import dot_scores
from .over_checkpoints import CheckpointMethod


class TracInCP(CheckpointMethod):
    name = "tracincp"
    title = "TracInCP"
    summary = "weighted sum over checkpoints of loss-gradient dot products (learning-rate or uniform weights)"

    def score(self, train, G, lam):
        return dot_scores(train, G)

    def self_influence(self, train, lam):
        return train.norms**2
