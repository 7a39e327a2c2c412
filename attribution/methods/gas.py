"""GAS, gradient aggregated similarity (Hammoudeh & Lowd 2022; D-TRAK paper, appendix A.3): TracInCP with the
cosine similarity of the checkpoint's gradients in place of their dot product ("renormalised" TracInCP); weighted
like TracInCP (learning-rate weights by default, `--checkpoint-weights uniform` as in the paper)."""

from ..errors import ConfigError
from .base import Method, cosine_scores


class GAS(Method):
    name = "gas"
    title = "GAS"
    summary = "weighted sum over checkpoints of loss-gradient cosine similarities (learning-rate or uniform weights)"
    uses_lambda = False
    across_checkpoints = True

    def score(self, train, G, lam):
        return cosine_scores(train, G)

    def self_influence(self, train, lam):
        raise ConfigError("GAS self-influence is the sum of the checkpoint weights for every image (cosine 1); "
                          "use tracin or tracincp")
