"""Size-normalised self-influence and per-class ranks against a direct computation."""

import numpy as np

from attribution.analysis.memorisation import class_ranks, size_normalized
from attribution.kernel import Kernel


def test_size_normalized_is_the_rayleigh_quotient_of_the_inverse_kernel():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(30, 12)) * rng.uniform(0.1, 5.0, size=(30, 1))  # rows of very different sizes
    lam = 0.7
    kernel = Kernel.fit(X.astype(np.float32))
    values = kernel.self_influence(lam)
    got = size_normalized(values, (X.astype(np.float32).astype(np.float64) ** 2).sum(1))
    A = X.T @ X + lam * np.eye(12)
    direct_tau = np.einsum("nk,nk->n", X, np.linalg.solve(A, X.T).T)
    direct = direct_tau / (X**2).sum(1)
    # float32 features (the store's dtype) against float64: relative error ~1e-6; 1e-4 leaves room
    np.testing.assert_allclose(values, direct_tau, rtol=1e-4)
    np.testing.assert_allclose(got, direct, rtol=1e-4)
    # bounded by the inverse kernel's extreme eigenvalues, whatever the row sizes
    assert 1 / (kernel.sigma[0] ** 2 + lam) * 0.999 <= got.min() and got.max() <= 1 / lam


def test_size_normalized_zero_feature():
    assert size_normalized(np.array([1.0, 0.0]), np.array([2.0, 0.0])).tolist() == [0.5, 0.0]


def test_class_ranks():
    values = np.array([0.5, 0.9, 0.1, 0.9, 0.3, 0.7])
    labels = np.array([0, 1, 0, 1, 0, 2])
    # class 0: 0.5 (#0) > 0.3 (#4) > 0.1 (#2); class 1: tie 0.9 / 0.9 broken by index; class 2 alone
    assert class_ranks(values, labels).tolist() == [1, 1, 3, 2, 2, 1]
