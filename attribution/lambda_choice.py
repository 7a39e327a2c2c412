"""A ridge lambda chosen without retraining: generalized cross-validation (GCV) over the feature dimensions.

TRAK / D-TRAK scores of a target g (k,) against training features X (N, k) are

    tau(g) = g^T (X^T X + lambda I)^{-1} X^T = ((X X^T + lambda I)^{-1} X g)^T        (push-through)

i.e. exactly the ridge-regression coefficients w of the target's feature written as a combination of the training
images' features, with the k feature coordinates as observations:  min_w ||X^T w - g||^2 + lambda ||w||^2.
That regression has the hat matrix H = X^T (X X^T + lambda I)^{-1} X = V diag(s^2 / (s^2 + lambda)) V^T, so its
generalized cross-validation score (Golub, Heath & Wahba 1979) is

    GCV(lambda) = k ||(I - H) g||^2 / (k - tr H)^2,

and from the kernel's thin SVD (c = V^T g, s = sigma) both terms cost O(r) per lambda:

    ||(I - H) g||^2 = ||g||^2 - ||c||^2 + sum_j (lambda / (s_j^2 + lambda))^2 c_j^2,
    tr H = sum_j s_j^2/(s_j^2+lambda).

Summed over a set of targets (their residuals added, the degrees of freedom shared) this picks the lambda at which
the training features explain the targets' features best out of sample, using nothing but the cached kernel and
target features: no retrained model. Training images are useless as targets here (their feature lies in the span
of X, so the residual vanishes at lambda -> 0); use validation or generated images.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .errors import ConfigError
from .kernel import Kernel


@dataclass
class GCVCurve:
    lambdas: np.ndarray  # (L,) ascending
    gcv: np.ndarray  # (L,) GCV score, lower is better
    best: float  # the lambda with the lowest GCV score


def gcv_scores(kernel: Kernel, G: np.ndarray, lambdas: np.ndarray) -> np.ndarray:
    """GCV(lambda) of targets G (M, k) for every lambda in `lambdas`: shape (L,)."""
    G = np.asarray(G, dtype=np.float64)
    if G.ndim != 2 or G.shape[1] != kernel.V.shape[0]:
        raise ConfigError(f"target features must be (M, {kernel.V.shape[0]}), got {G.shape}")
    k = G.shape[1]
    c2 = (G @ kernel.V) ** 2  # (M, r)
    outside = float((G**2).sum() - c2.sum())  # the part of the targets no lambda can explain
    s2 = kernel.sigma**2
    lam = np.asarray(lambdas, dtype=np.float64)[:, None]  # (L, 1)
    shrink = lam / (s2[None, :] + lam)  # (L, r)
    resid = max(outside, 0.0) + (shrink**2 * c2.sum(0)[None, :]).sum(1)
    df = (s2[None, :] / (s2[None, :] + lam)).sum(1)
    # With N >= k the fit interpolates as lambda -> 0 (tr H -> k): GCV is undefined there, i.e. infinitely bad.
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(df < k - 1e-9, k * resid / np.maximum(k - df, 1e-300) ** 2, np.inf)


def gcv_lambda(kernel: Kernel, G: np.ndarray, per_decade: int = 8) -> GCVCurve:
    """The GCV-optimal lambda over the kernel's log-spaced grid (`Kernel.lambda_grid`), refined `per_decade`."""
    lambdas = kernel.lambda_grid(per_decade=per_decade)
    scores = gcv_scores(kernel, G, lambdas)
    return GCVCurve(lambdas, scores, float(lambdas[int(np.argmin(scores))]))
