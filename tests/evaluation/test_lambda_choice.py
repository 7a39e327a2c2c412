"""The retraining-free lambda (GCV over the feature dimensions) against a direct computation and a planted answer."""

import numpy as np
import pytest

from attribution.lambda_choice import gcv_lambda, gcv_scores
from attribution.kernel import Kernel


def test_gcv_equals_the_explicit_hat_matrix_formula():
    rng = np.random.default_rng(0)
    X, G = rng.normal(size=(12, 40)), rng.normal(size=(3, 40))
    kernel = Kernel.fit(X.astype(np.float32))
    lambdas = np.array([0.1, 3.0, 50.0])
    got = gcv_scores(kernel, G, lambdas)
    Xd = kernel.U * kernel.sigma @ kernel.V.T  # the float32 features, as the kernel saw them
    for lam, value in zip(lambdas, got):
        H = Xd.T @ np.linalg.solve(Xd @ Xd.T + lam * np.eye(12), Xd)  # (k, k) hat matrix
        resid = ((G - G @ H.T) ** 2).sum()
        assert value == pytest.approx(40 * resid / (40 - np.trace(H)) ** 2, rel=1e-8)


def test_gcv_finds_the_planted_ridge_lambda():
    """g = X^T w + noise with w ~ N(0, tau^2 I) and noise ~ N(0, s^2 I): the best ridge lambda for estimating w is
    s^2 / tau^2. GCV sees only X and g; its choice must land within a factor of 3 of that (grid step 10^(1/8))."""
    rng = np.random.default_rng(1)
    n, k, m = 60, 600, 30
    for tau, s in ((1.0, 3.0), (0.2, 1.0), (1.0, 0.5)):
        X = rng.normal(size=(n, k))
        W = rng.normal(scale=tau, size=(m, n))
        G = W @ X + rng.normal(scale=s, size=(m, k))
        best = gcv_lambda(Kernel.fit(X.astype(np.float32)), G).best
        assert s**2 / tau**2 / 3 < best < 3 * s**2 / tau**2, (tau, s, best)


def test_gcv_is_infinite_where_the_fit_interpolates():
    rng = np.random.default_rng(2)
    X = rng.normal(size=(30, 20))  # N > k: tr H -> k as lambda -> 0
    kernel = Kernel.fit(X.astype(np.float32))
    scores = gcv_scores(kernel, rng.normal(size=(2, 20)), np.array([1e-12, 1.0]))
    assert np.isinf(scores[0]) and np.isfinite(scores[1])
