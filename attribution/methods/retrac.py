"""Diffusion-ReTrac (Xie et al., TMLR 2024): Diffusion-TracIn with renormalised gradients. The training gradient
g_c(x_n, t_n) is divided by its norm, and the target's gradient at each of the K timesteps is divided by its norm
before the average, so

    score_n = sum_c eta_c (1/K) sum_k cos(g_c(x_n, t_n), g_c(x, t_k))

and no training image ranks high merely because it was drawn at a timestep with large gradients. Norms are taken
of the exact gradients, before projection (`features.gradients`, GradientSpec.normalize).
"""

from ..errors import ConfigError
from .base import dot_scores
from .over_checkpoints import CheckpointMethod


class DiffusionReTrac(CheckpointMethod):
    name = "retrac"
    title = "Diffusion-ReTrac"
    summary = "Diffusion-TracIn with unit-normalised gradients (removes the timestep-induced norm bias)"
    has_self_influence = False
    strategy = "training"
    normalize = True

    def score(self, train, G, lam):
        return dot_scores(train, G)

    def self_influence(self, train, lam):
        raise ConfigError("Diffusion-ReTrac self-influence is the sum of the checkpoint weights for every image "
                          "(unit gradients); use tracin for the norm-based self-influence")
