"""DAS with the residual's size: the leave-one-out Newton step of DAS (`das.py`) multiplies the kernel score by the
training image's residual; the reference code's weight (`das`) normalises each image's error curve by its own norm
and so keeps only its shape. Here the weight is the residual's size, w_n = mean_t e_t, the image's root-mean-squared
training error averaged over the residual timesteps (`features.residuals`, "das-residual-size"): images the model
fits worse weigh more, by the factor the derivation gives. Same features and kernel as `das`.
"""

from .das import DAS

RESIDUAL_SIZE = "das-residual-size"


class DASResidualSize(DAS):
    name = "das-size"
    title = "DAS (residual size)"
    summary = ("DAS with the weight its derivation has: the kernel score on Avg-output gradients times the size of "
               "the training image's residual (its root-mean-squared training error, averaged over timesteps), so "
               "images the model fits worse weigh more")
    row_statistics = (RESIDUAL_SIZE,)

    def weights(self, train, lam):
        return train.stat(RESIDUAL_SIZE)
