"""D-TRAK (D-TRAK paper, Sec. 3): TRAK's kernel with features from another output function, Square by default."""

from .base import KernelMethod


class DTRAK(KernelMethod):
    name = "dtrak"
    title = "D-TRAK"
    summary = "projected gradients of the Square output (or any of the paper's functions) through the kernel"
    default_fn = "square"
    fixed_fn = False
    per_step = True
