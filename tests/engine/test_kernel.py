"""The TRAK kernel (attribution/kernel.py) against direct dense linear algebra.

Every score is checked against `np.linalg.solve(X^T X + lam I, X^T)` computed in float64 from scratch, in both
shapes of the thin SVD (N < k: eigendecomposition of X X^T, "push-through"; N > k: of X^T X) and with
rank-deficient features (duplicate rows, low-rank products), where components below RANK_TOL must be dropped.
Kernel.fit reads float32 features in blocks and never holds a float64 copy of them (GPU readiness, issue 9).
"""

from __future__ import annotations

import time
import tracemalloc

import numpy as np
import pytest

from attribution.errors import ConfigError
from attribution.kernel import Kernel


def _low_rank(rng, n, k, r):
    return rng.standard_normal((n, r)) @ rng.standard_normal((r, k))


def _cases():
    rng = np.random.default_rng(0)
    x_dup = rng.standard_normal((20, 60))
    return {
        "N<k": rng.standard_normal((30, 80)),
        "N>k": rng.standard_normal((120, 40)),
        # 40 rows, only 20 distinct: rank 20 < N < k; the 20 zero eigenvalues of X X^T must be dropped.
        "duplicates": np.concatenate([x_dup, x_dup]),
        # N > k but rank 10 < k: the zero eigenvalues of X^T X must be dropped.
        "low-rank N>k": _low_rank(rng, 100, 30, 10),
    }


CASES = _cases()
# Multiples of the mean non-zero eigenvalue of X^T X: from barely regularised to dominated by lambda.
LAMBDA_FACTORS = (1e-4, 1e-2, 1.0, 100.0)


def _mean_eig(X):
    ev = np.linalg.eigvalsh(X @ X.T if len(X) <= X.shape[1] else X.T @ X)
    return ev[ev > ev.max() * 1e-10].mean()


def _direct(X, lam):
    """(X^T X + lam I)^{-1} X^T, shape (k, N), by a dense float64 solve."""
    k = X.shape[1]
    return np.linalg.solve(X.T @ X + lam * np.eye(k), X.T)


def _rel_err(a, b):
    return np.abs(a - b).max() / np.abs(b).max()


# Tolerance of float64 comparisons below: both sides are float64; the kernel's error is that of an eigendecomposition
# of a Gram matrix (~1e-16 x its largest eigenvalue) amplified by at most (s_max^2 + lam) / (s_min^2 + lam). For these
# random matrices s_max^2 / lam <= ~1e5 at the smallest lambda, so errors stay below ~1e-10; 1e-8 leaves a margin
# while still catching any wrong formula (which shows up at order 1e-3 or larger).
RTOL64 = 1e-8


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("factor", LAMBDA_FACTORS)
def test_scores_self_influence_and_inverse_norms_match_direct_solve(case, factor):
    X = CASES[case]
    rng = np.random.default_rng(1)
    G = rng.standard_normal((4, X.shape[1]))
    kern = Kernel.fit(X)
    lam = factor * _mean_eig(X)
    A = _direct(X, lam)  # (k, N)

    S = kern.scores(G, lam)
    assert S.shape == (4, len(X))
    assert _rel_err(S, G @ A) < RTOL64

    # self-influence: tau(x_n)_n = x_n^T (X^T X + lam I)^{-1} x_n, the diagonal of X A.
    assert _rel_err(kern.self_influence(lam), np.diag(X @ A)) < RTOL64
    # Relative Influence's denominator: || (X^T X + lam I)^{-1} x_n ||, the column norms of A.
    assert _rel_err(kern.inverse_norms(lam), np.linalg.norm(A, axis=0)) < RTOL64


@pytest.mark.parametrize("case", list(CASES))
def test_eigenvalues_are_the_nonzero_spectrum(case):
    X = CASES[case]
    kern = Kernel.fit(X)
    ev = np.sort(np.linalg.eigvalsh(X.T @ X))[::-1]
    rank = np.linalg.matrix_rank(X)
    assert len(kern.sigma) == rank == len(kern.eigenvalues)  # zero directions dropped, nothing else
    assert np.all(np.diff(kern.sigma) <= 0)  # descending
    np.testing.assert_allclose(kern.eigenvalues, ev[:rank], rtol=1e-9)
    # U and V have orthonormal columns (thin SVD).
    np.testing.assert_allclose(kern.U.T @ kern.U, np.eye(rank), atol=1e-9)
    np.testing.assert_allclose(kern.V.T @ kern.V, np.eye(rank), atol=1e-9)
    np.testing.assert_allclose(kern.U * kern.sigma @ kern.V.T, X, atol=1e-9 * np.abs(X).max())
    # default lambda: 0.1 x the mean non-zero eigenvalue; the grid spans it.
    assert kern.default_lambda() == pytest.approx(0.1 * ev[:rank].mean(), rel=1e-9)
    grid = kern.lambda_grid()
    assert grid[0] <= 1e-6 * ev[:rank].mean() and grid[-1] >= 1e2 * ev[:rank].mean()


def test_gram_accumulated_in_column_blocks_equals_one_block():
    X = CASES["N<k"]
    a, b = Kernel.fit(X), Kernel.fit(X, block=7)  # 80 columns in 12 blocks, the last one partial
    G = np.random.default_rng(2).standard_normal((3, X.shape[1]))
    assert _rel_err(b.scores(G, 0.5), a.scores(G, 0.5)) < 1e-10


def test_float32_features_fit_like_float64():
    X = CASES["N<k"]
    G = np.random.default_rng(3).standard_normal((3, X.shape[1]))
    lam = 0.1 * _mean_eig(X)
    # float32 input (as stored) vs float64: the inputs differ by float32 rounding (~6e-8 relative), amplified by the
    # kernel's condition number at this lambda (< 1e2), so 1e-5 is a safe bound.
    assert _rel_err(Kernel.fit(X.astype(np.float32)).scores(G, lam), G @ _direct(X, lam)) < 1e-5


@pytest.mark.parametrize("case", list(CASES))
def test_arrays_round_trip_preserves_scores_to_float32_precision(case):
    X = CASES[case]
    kern = Kernel.fit(X)
    arrays = kern.arrays()
    assert arrays["U"].dtype == np.float32 and arrays["V"].dtype == np.float32 and arrays["sigma"].dtype == np.float64
    back = Kernel.from_arrays(arrays)
    G = np.random.default_rng(4).standard_normal((3, X.shape[1]))
    for factor in (1e-2, 1.0):
        lam = factor * _mean_eig(X)
        # U and V are rounded to float32 (relative 6e-8 per entry); scores are sums of r products of them, so the
        # relative error stays at a few 1e-7; 1e-5 is far below any formula error yet above rounding.
        assert _rel_err(back.scores(G, lam), kern.scores(G, lam)) < 1e-5
        assert _rel_err(back.self_influence(lam), kern.self_influence(lam)) < 1e-5
        assert _rel_err(back.inverse_norms(lam), kern.inverse_norms(lam)) < 1e-5


@pytest.mark.parametrize("bad", [0.0, -1.0, float("nan"), float("inf")])
def test_nonpositive_or_nonfinite_lambda_is_refused(bad):
    kern = Kernel.fit(CASES["N<k"])
    G = np.ones((1, CASES["N<k"].shape[1]))
    for call in (lambda: kern.scores(G, bad), lambda: kern.self_influence(bad), lambda: kern.inverse_norms(bad)):
        with pytest.raises(ConfigError, match="lambda must be a positive number") as exc:
            call()
        assert "\n" not in str(exc.value)


def test_all_zero_features_are_refused():
    with pytest.raises(ConfigError, match="zero"):
        Kernel.fit(np.zeros((5, 8), dtype=np.float32))


def test_scores_tend_to_the_projection_as_lambda_vanishes_and_shrink_as_it_grows():
    X = CASES["N<k"]  # full row rank: X (X^T X + lam I)^{-1} X^T -> I as lam -> 0
    kern = Kernel.fit(X)
    mean = _mean_eig(X)
    S = kern.scores(X, 1e-9 * mean)
    np.testing.assert_allclose(S, np.eye(len(X)), atol=1e-6)
    # lam -> infinity: (X^T X + lam I)^{-1} -> I / lam, so lam * scores -> X X^T (the grad-dot scores).
    lam = 1e9 * mean
    assert _rel_err(lam * kern.scores(X, lam), X @ X.T) < 1e-6


def test_changing_lambda_is_fast():
    """A new lambda costs one (1, k) @ (k, r) product, a scaling and one (1, r) @ (r, N) product: no refit.

    N=2000, k=4096 (r=2000): about 12 M multiply-adds on ~100 MB of float64, i.e. ~10-20 ms when memory bandwidth is
    shared with other jobs. The 50 ms bound is generous (a refit would take seconds); median of 5 damps scheduling
    noise on the loaded 2-core machine. U and V are random (the cost does not depend on their values), so no fit
    is needed.
    """
    rng = np.random.default_rng(5)
    n, k = 2000, 4096
    kern = Kernel(rng.standard_normal((n, n)), np.sort(rng.random(n) + 0.1)[::-1], rng.standard_normal((k, n)))
    g = rng.standard_normal((1, k))
    kern.scores(g, 1.0)  # warm-up (page faults, BLAS threads)
    times = []
    for lam in (0.01, 0.1, 1.0, 10.0, 100.0):
        start = time.perf_counter()
        s = kern.scores(g, lam)
        times.append(time.perf_counter() - start)
    assert s.shape == (1, n)
    assert np.median(times) < 0.05, f"lambda change took {np.median(times) * 1e3:.1f} ms (median of 5)"


# -- memory: the kernel at large k with N > k (GPU readiness, issue 9, item 9) -----------------------------------


@pytest.mark.parametrize("n, k", [(3000, 48), (40, 3000)])
def test_kernel_fit_never_holds_the_features_in_float64(n, k):
    """Kernel.fit reads float32 features in blocks: numpy never allocates a float64 copy of X (N x k x 8 bytes;
    the Gram matrix and the factors are torch tensors, outside tracemalloc's view), and the factors equal the
    dense float64 computation."""
    rng = np.random.default_rng(0)
    X = (rng.standard_normal((n, k)) * np.linspace(3, 0.1, k)).astype(np.float32)
    tracemalloc.start()
    kernel = Kernel.fit(X, block=256)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < 0.25 * n * k * 8, peak  # one 256-row (or -column) float64 block: <= 256 / 3000 of a full copy
    Xd = X.astype(np.float64)
    np.testing.assert_allclose(kernel.sigma, np.linalg.svd(Xd, compute_uv=False)[:len(kernel.sigma)], rtol=1e-9)
    np.testing.assert_allclose(kernel.U * kernel.sigma @ kernel.V.T, Xd, atol=1e-9 * np.abs(Xd).max())
