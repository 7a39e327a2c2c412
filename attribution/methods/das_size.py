"""DAS with the residual's size: the leave-one-out Newton step of DAS (`das.py`) multiplies the kernel score by the
training image's residual; the reference code's weight (`das`) normalises each image's error curve by its own norm
and so keeps only its shape. Here the weight is the residual's size, w_n = mean_t e_t, the image's root-mean-squared
training error averaged over the residual timesteps (`features.residuals`, "das-residual-size"): images the model
fits worse weigh more, by the factor the derivation gives. Same features and kernel as `das`.

Measured (BENCHMARKS.md, "DAS and EK-FAC"): the size varies more than the reference's weight (coefficient of
variation 5.6% on the digits model, 6.0% on digits-latent, against 2.8% and 2.0%) but still only by a few percent, and
it scores level with D-TRAK Avg on both banks (digits +0.331 / +0.230 vs +0.333 / +0.235, digits-latent +0.540 /
+0.395 vs +0.539 / +0.388, validation / generated targets; every paired interval covers 0).
"""

from ..features.residuals import ResidualSize
from .das import DAS


class DASResidualSize(DAS):
    name = "das-size"
    title = "DAS (residual size)"
    summary = ("DAS with the weight its derivation has: the kernel score on Avg-output gradients times the size of "
               "the training image's residual (its root-mean-squared training error, averaged over timesteps), so "
               "images the model fits worse weigh more")
    features = ResidualSize
