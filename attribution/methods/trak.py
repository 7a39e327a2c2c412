"""TRAK for diffusion (D-TRAK paper eq. 6 with Q = I): features from the Simple (training) loss."""

from .base import KernelMethod


class TRAK(KernelMethod):
    name = "trak"
    title = "TRAK"
    summary = "projected gradients of the training loss (Simple) through the ridge kernel"
    default_fn = "simple"
    per_step = True
