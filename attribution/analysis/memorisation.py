"""Self-influence that teaches (issue 17, item 10): a size-normalised variant and per-class ranks.

Plain self-influence τ(x_n) = φ_nᵀ(ΦᵀΦ + λI)⁻¹φ_n grows with the size of the training image's own gradient
feature φ_n: on digits its top is a row of thin "1"s, whose loss gradients are simply large. Dividing by ‖φ_n‖²
gives the Rayleigh quotient uᵀ(ΦᵀΦ + λI)⁻¹u of the unit direction u = φ_n/‖φ_n‖: how *unusual the direction* of an
image's gradient is (how few other training images share it), whatever its size. It lies between
1/(σ_max² + λ) and 1/λ. We normalise by the squared feature norm rather than use the kernel leverage because, with
Q = I as here, the leverage h_nn = φ_nᵀ(ΦᵀΦ + λI)⁻¹φ_n *is* the plain self-influence, size effect included.

    normalized = size_normalized(values, squared_norms)
    ranks = class_ranks(normalized, labels)      # 1 = highest within its own class
"""

from __future__ import annotations

import numpy as np


def size_normalized(values: np.ndarray, squared_norms: np.ndarray) -> np.ndarray:
    """Self-influence divided by each image's squared feature norm ‖φ_n‖² (0 where the feature is zero)."""
    values = np.asarray(values, dtype=np.float64)
    sq = np.asarray(squared_norms, dtype=np.float64)
    if values.shape != sq.shape:
        raise ValueError(f"{values.shape[0] if values.ndim else 0} self-influence values but "
                         f"{sq.shape[0] if sq.ndim else 0} feature norms")
    return np.divide(values, sq, out=np.zeros_like(values), where=sq > 0)


def class_ranks(values: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Per image, its 1-based rank by `values` (largest first) among the images of its own class (label -1, no
    class, is ranked among the unlabelled). Ties are broken by index, as the page's sort is."""
    values = np.asarray(values)
    labels = np.asarray(labels)
    ranks = np.zeros(len(values), dtype=np.int64)
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        order = members[np.argsort(-values[members], kind="stable")]
        ranks[order] = np.arange(1, len(order) + 1)
    return ranks
