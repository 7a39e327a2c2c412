"""GAS, gradient aggregated similarity (Hammoudeh & Lowd 2022; D-TRAK paper, appendix A.3): TracInCP with the
cosine similarity of the checkpoint's gradients in place of their dot product ("renormalised" TracInCP); weighted
like TracInCP (learning-rate weights by default, `--checkpoint-weights uniform` as in the paper)."""

from ..errors import ConfigError
from .base import cosine_scores
from .over_checkpoints import CheckpointMethod


class GAS(CheckpointMethod):
    name = "gas"
    title = "GAS"
    summary = "weighted sum over checkpoints of loss-gradient cosine similarities (learning-rate or uniform weights)"
    has_self_influence = False

    def score(self, train, G, lam):
        return cosine_scores(train, G)

    def self_influence(self, train, lam):
        raise ConfigError("GAS self-influence is the sum of the checkpoint weights for every image (cosine 1); "
                          "use tracin or tracincp")
