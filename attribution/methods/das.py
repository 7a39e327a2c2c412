"""DAS, the Diffusion Attribution Score (Lin et al., ICLR 2025, arXiv 2410.18639; code `Jinxu-Lin/DAS`,
`CIFAR2/07_score.py`).

DAS measures how removing a training image changes the noise predictor's *output* on the target (a KL proxy: the
KL divergence between the two models' Gaussian transitions is the squared difference of their noise predictions),
instead of the change in the target's loss. Linearising the output in the parameters and taking a Newton
leave-one-out step gives D-TRAK's kernel on gradients of the output itself, weighted by the training image's
residual. As the reference code computes it:

- features: projected gradients of the Avg output (the mean of eps_hat over its dimensions: the reference's
  `mean` loss type; uniform timesteps, K = 10 there), through the ridge kernel (X^T X + lambda I)^{-1};
- DAS (`das`, the reference's DAS1): the kernel score times the training image's residual weight w_n
  (`features.residuals`: the mean over timesteps of its normalised root training error);
- DAS with the leverage correction (`das0`, the reference's DAS0): additionally divided by (1 - h_nn)^2, h_nn the
  training image's leverage phi_n^T (X^T X + lambda I)^{-1} phi_n (the kernel's self-influence, in [0, 1)): the
  leave-one-out residual of ridge regression.

Departures from the reference, each forced by it: its DAS0 branch does not run (it reads `args.dim`, which the
parser does not define, and takes the leverage from the diagonal of the target-by-train matrix); here the leverage
is the one of the ridge leave-one-out formula. Its DAS1 broadcasts the weight along the wrong axis (it only runs
when there are as many targets as training images); here each training image's column is weighted. Its "squ"
variants (scores squared) drop the sign, so they cannot say proponent from opponent, and are left out. The
reference rescales the inverse by its mean absolute value per lambda, a constant per lambda that changes no ranking.
"""

import numpy as np

from .base import KernelMethod

RESIDUAL = "das-residual"


class DAS(KernelMethod):
    name = "das"
    title = "DAS"
    summary = ("Diffusion Attribution Score: how much removing the training image would change the noise "
               "predictor's output on the target (a proxy for the KL divergence between the two models), from "
               "D-TRAK's kernel on gradients of the output itself (Avg), weighted by the image's training residual")
    default_fn = "avg"
    row_statistics = (RESIDUAL,)

    def weights(self, train, lam):
        return train.stat(RESIDUAL)

    def score(self, train, G, lam):
        return train.kernel.scores(G, lam) * self.weights(train, lam)[None, :]

    def self_influence(self, train, lam):
        return train.kernel.self_influence(lam) * self.weights(train, lam)


class DASLeverage(DAS):
    name = "das0"
    title = "DAS (leverage-corrected)"
    summary = ("DAS with the leave-one-out correction: each training image's score divided by (1 - h)^2, h its "
               "leverage in the ridge kernel, so images the model fits largely on their own weigh more")

    def weights(self, train, lam):
        leverage = train.kernel.self_influence(lam)
        return train.stat(RESIDUAL) / np.maximum(1.0 - leverage, 1e-12) ** 2
