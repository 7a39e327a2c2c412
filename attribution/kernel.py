"""The TRAK kernel: one thin SVD of the training features, then any lambda in milliseconds.

With X the (N, k) training features (rows phi(x_n)) and a target feature g (k,), the TRAK / D-TRAK score is

    tau(g)_n = g^T (X^T X + lambda I)^{-1} phi(x_n).

Write X = U diag(sigma) V^T (thin SVD, r = min(N, k) components; found from an eigendecomposition of the smaller of
X X^T (N x N, when N < k: the "push-through" form) and X^T X (k x k)). Every phi(x_n) lies in the span of V, so

    tau(g) = (g V) diag(sigma / (sigma^2 + lambda)) U^T                (M x N for M targets)
    self-influence_n = tau(phi(x_n))_n = sum_j U_nj^2 sigma_j^2 / (sigma_j^2 + lambda)
    ||(X^T X + lambda I)^{-1} phi(x_n)|| = sqrt(sum_j U_nj^2 sigma_j^2 / (sigma_j^2 + lambda)^2)

so a new lambda costs one diagonal scaling and one (M x r) @ (r x N) product. The decomposition runs in float64.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .errors import ConfigError

# Components with sigma^2 below this fraction of the largest carry no signal (rank deficiency) and are dropped.
RANK_TOL = 1e-12


@dataclass
class Kernel:
    U: np.ndarray  # (N, r) float64
    sigma: np.ndarray  # (r,) float64, descending
    V: np.ndarray  # (k, r) float64

    @classmethod
    def fit(cls, X: np.ndarray, block: int = 4096) -> "Kernel":
        """Thin SVD of the (N, k) features via the smaller Gram matrix, in float64.

        X (often a float32 memmap) is read in blocks and never converted to float64 as a whole: the Gram matrix
        is accumulated block by block, so the peak is that matrix and its eigenvectors (2 x min(N, k)^2 x 8
        bytes: 17 GiB at k = 32768 with N > k), one float64 block, and the result U (N x r) and V (k x r).
        """
        n, k = X.shape
        if n <= k:
            gram = torch.zeros(n, n, dtype=torch.float64)
            for s in range(0, k, block):  # X X^T accumulated over column blocks (bounded memory)
                xb = torch.from_numpy(np.asarray(X[:, s:s + block], dtype=np.float64))
                gram += xb @ xb.T
            evals, evecs = torch.linalg.eigh(gram)
            del gram
            keep = evals > evals.max().clamp_min(0) * RANK_TOL
            s2, U = evals[keep].flip(0), evecs[:, keep].flip(1).contiguous()
            sigma = s2.sqrt()
            V = torch.empty(k, U.shape[1], dtype=torch.float64)
            for s in range(0, k, block):  # V = X^T U / sigma, by column blocks of X
                xb = torch.from_numpy(np.asarray(X[:, s:s + block], dtype=np.float64))
                V[s:s + block] = xb.T @ U / sigma
        else:
            gram = torch.zeros(k, k, dtype=torch.float64)
            rows = max(1, block)
            for s in range(0, n, rows):  # X^T X accumulated over row blocks (bounded memory)
                xb = torch.from_numpy(np.asarray(X[s:s + rows], dtype=np.float64))
                gram += xb.T @ xb
            evals, evecs = torch.linalg.eigh(gram)
            del gram
            keep = evals > evals.max().clamp_min(0) * RANK_TOL
            s2, V = evals[keep].flip(0), evecs[:, keep].flip(1).contiguous()
            sigma = s2.sqrt()
            U = torch.empty(n, V.shape[1], dtype=torch.float64)
            for s in range(0, n, rows):  # U = X V / sigma, by row blocks
                xb = torch.from_numpy(np.asarray(X[s:s + rows], dtype=np.float64))
                U[s:s + rows] = xb @ V / sigma
        if sigma.numel() == 0:
            raise ConfigError("all training features are zero; the kernel is empty")
        return cls(U.numpy(), sigma.numpy(), V.numpy())

    @property
    def eigenvalues(self) -> np.ndarray:
        """Non-zero eigenvalues of X^T X (= sigma^2), descending."""
        return self.sigma**2

    def default_lambda(self) -> float:
        """0.1 x the mean non-zero eigenvalue of X^T X: a scale-free starting point (tune with the slider/LDS)."""
        return float(0.1 * self.eigenvalues.mean())

    def lambda_grid(self, per_decade: int = 1) -> np.ndarray:
        """Powers of ten from 1e-6 to 1e2 times the mean eigenvalue, for sliders and sweeps."""
        mean = self.eigenvalues.mean()
        lo, hi = np.floor(np.log10(mean * 1e-6)), np.ceil(np.log10(mean * 1e2))
        return 10.0 ** np.arange(lo, hi + 1e-9, 1.0 / per_decade)

    def coords(self, G: np.ndarray) -> np.ndarray:
        """Targets in the kernel's eigenbasis: G V, shape (M, r)."""
        return np.asarray(G, dtype=np.float64) @ self.V

    def scores(self, G: np.ndarray, lam: float) -> np.ndarray:
        """tau for targets G (M, k): shape (M, N)."""
        check_lambda(lam)
        return (self.coords(G) * (self.sigma / (self.sigma**2 + lam))) @ self.U.T

    def self_influence(self, lam: float) -> np.ndarray:
        check_lambda(lam)
        s2 = self.sigma**2
        return (self.U**2 * (s2 / (s2 + lam))).sum(1)

    def inverse_norms(self, lam: float) -> np.ndarray:
        """||(X^T X + lambda I)^{-1} phi(x_n)|| for every training row (Relative Influence's denominator)."""
        check_lambda(lam)
        s2 = self.sigma**2
        return np.sqrt((self.U**2 * (s2 / (s2 + lam) ** 2)).sum(1))

    def arrays(self) -> dict[str, np.ndarray]:
        """For storage: U and V as float32 (relative error ~1e-7, far below projection noise), sigma float64."""
        return {"U": self.U.astype(np.float32), "sigma": self.sigma, "V": self.V.astype(np.float32)}

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray]) -> "Kernel":
        return cls(arrays["U"].astype(np.float64), arrays["sigma"].astype(np.float64), arrays["V"].astype(np.float64))


def check_lambda(lam: float) -> None:
    """The one rule for the ridge lambda: a positive, finite number."""
    if not (lam > 0 and np.isfinite(lam)):
        raise ConfigError(f"lambda must be a positive number, got {lam}")
