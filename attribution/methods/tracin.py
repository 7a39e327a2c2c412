"""Diffusion-TracIn (Xie et al., TMLR 2024, "Data Attribution for Diffusion Models: Timestep-induced Bias in
Influence Estimation"): sum over checkpoints c of eta_c <g_c(x_n, t_n), g_c(x)>, where

- g_c(x_n, t_n) is the training image's loss gradient at the timestep t_n it was drawn at in the epoch that ended
  at checkpoint c (recorded by `attribution train`; one uniform draw per image otherwise), fresh noise;
- g_c(x) is the target's loss gradient averaged over the K feature timesteps.

The loss is the training loss (Simple, the epsilon MSE the models were trained with; the reference code defaults to
an L1 loss). Gradients are projected, which the reference code does not do, so the method scales. Its scores
inherit the timestep dependence of gradient norms: training images drawn at small t have large gradients and rank
high for every target ("generally influential" samples); Diffusion-ReTrac (`retrac`) removes that.
"""

from .base import dot_scores
from .over_checkpoints import CheckpointMethod


class DiffusionTracIn(CheckpointMethod):
    name = "tracin"
    title = "Diffusion-TracIn"
    summary = "TracIn over checkpoints with training gradients at each image's training timestep"
    strategy = "training"

    def score(self, train, G, lam):
        return dot_scores(train, G)

    def self_influence(self, train, lam):
        return train.norms**2
