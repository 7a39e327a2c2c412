"""DAS, the Diffusion Attribution Score (Lin et al., ICLR 2025, arXiv 2410.18639; code `Jinxu-Lin/DAS`,
`CIFAR2/07_score.py`).

DAS measures how removing a training image changes the noise predictor's *output* on the target (a KL proxy: the
KL divergence between the two models' Gaussian transitions is the squared difference of their noise predictions),
instead of the change in the target's loss. Linearising the output in the parameters and taking a Newton
leave-one-out step gives D-TRAK's kernel on gradients of the output itself, times the training image's residual
r_n and divided by (1 - h_nn): ridge regression's leave-one-out identity, removing row n moves the fit by
(X^T X + lambda I)^{-1} phi_n r_n / (1 - h_nn), h_nn = phi_n^T (X^T X + lambda I)^{-1} phi_n the row's leverage.

What is computed (features: projected gradients of the Avg output, the mean of eps_hat over its dimensions, the
reference's `mean` loss type; uniform timesteps, K = 10 there; through the ridge kernel):

- `das` (the reference's DAS1): the kernel score times the reference's residual weight w_n = mean_t(e_t / ||e||)
  (`features.residuals`, "das-residual"). That weight is scale-free: it carries the *shape* of the image's error
  curve over timesteps, not the size of its residual. On the digits bank's model it varies by 2.8% across the
  training images (coefficient of variation; range 0.200-0.238), so `das` is D-TRAK with the Avg output
  (`--method dtrak --fn avg`) up to a few-percent reweighting of the training images, and scores like it at the
  extra cost of a residual pass (LDS on validation / generated targets: digits bank +0.334 / +0.238 vs +0.333 /
  +0.235, digits-latent bank +0.538 / +0.388 vs +0.539 / +0.388; every paired interval covers 0; BENCHMARKS.md,
  "DAS and EK-FAC"). The residual's size, which the derivation multiplies by, is `das-size` (`das_size.py`).
- `das0` (the reference's DAS0): additionally divided by (1 - h_nn), the exact ridge leave-one-out factor (a test
  checks it against refitting a toy ridge problem once per left-out row). The reference divides by (1 - h)^2,
  which is not the leave-one-out change of a ridge fit; that branch of its code does not run (next paragraph).

Departures from the reference, each forced by it: its DAS0 branch does not run (it reads `args.dim`, which the
parser does not define, and takes the leverage from the diagonal of the target-by-train matrix); here the leverage
is the one of the ridge leave-one-out formula, with its (1 - h) factor. Its DAS1 broadcasts the weight along the
wrong axis (it only runs when there are as many targets as training images); here each training image's column is
weighted. Its "squ" variants (scores squared) drop the sign, so they cannot say proponent from opponent, and are
left out. The reference rescales the inverse by its mean absolute value per lambda, a constant per lambda that
changes no ranking.
"""

import numpy as np

from ..features.residuals import ResidualShape
from .base import KernelMethod


class DAS(KernelMethod):
    name = "das"
    title = "DAS"
    summary = ("Diffusion Attribution Score: how much removing the training image would change the noise "
               "predictor's output on the target, from D-TRAK's kernel on Avg-output gradients times the reference "
               "code's scale-free residual weight (2.8% spread on the digits model: D-TRAK Avg, reweighted slightly)")
    default_fn = "avg"
    features = ResidualShape

    def weights(self, train, lam):
        return train.stat(self.features.statistic_name)

    def score(self, train, G, lam):
        return train.kernel.scores(G, lam) * self.weights(train, lam)[None, :]

    def self_influence(self, train, lam):
        return train.kernel.self_influence(lam) * self.weights(train, lam)


class DASLeverage(DAS):
    name = "das0"
    title = "DAS (leverage-corrected)"
    summary = ("DAS with the leave-one-out correction: each training image's score divided by (1 - h), h its "
               "leverage in the ridge kernel (ridge regression's exact leave-one-out factor), so images the model "
               "fits largely on their own weigh more")

    def weights(self, train, lam):
        leverage = train.kernel.self_influence(lam)
        return train.stat(self.features.statistic_name) / np.maximum(1.0 - leverage, 1e-12)
