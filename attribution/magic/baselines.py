"""TRAK-style baselines on the same score model and queries, so MAGIC's validation compares like for like.

Features are exact per-example gradients of the final MAGIC run's parameters (no random projection: the model
has ~15k parameters, so the N x N kernel K = Phi Phi^T is exact and cheap), averaged over K fixed (t, z) draws:

  "trak"    train features: gradient of the denoising loss; query: gradient of the query's bits/dim (the output
            function MAGIC differentiates);
  "dtrak"   D-TRAK: train features and query features both gradients of the Square output ||s(x_t, t)||^2
            (the query noised with the same draws), as in the D-TRAK paper.

Scores tau = (K + lambda I)^-1 Phi phi_q (Woodbury form of phi_q^T (Phi^T Phi + lambda I)^-1 Phi^T), lambda = 0.1 x
mean eigenvalue of K. Upweighting example i by e moves theta by about -e H^-1 g_i, so removing a set S changes the
output by about +sum_{i in S} tau_i: that is the predicted change validated against the retrains.
"""

from __future__ import annotations

import numpy as np
import torch
from torch.func import grad, vmap

from ..errors import ConfigError
from .runs import MagicRun
from .score_model import marginal_std

METHODS = ("trak", "dtrak")


def _draws(run: MagicRun, k: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    c = run.spec.train
    t = c.t_min + (1 - c.t_min) * torch.rand(k, generator=g, dtype=torch.float64)
    z = torch.randn(k, run.spec.model.dim, generator=g, dtype=torch.float64)
    return t.to(c.torch_dtype), z.to(c.torch_dtype)


def _example_output(run: MagicRun, kind: str, t, z):
    model = run.model

    def out(theta, x):   # x (D,): mean over the K draws of the per-example output
        std = marginal_std(t, model.config.sigma).unsqueeze(-1)
        xs = x.unsqueeze(0) + std * z
        s = model.score(theta, xs, t)
        if kind == "loss":
            return ((s * std + z) ** 2).sum(-1).mean()
        return (s ** 2).sum(-1).mean()

    return out


def features(run: MagicRun, theta: torch.Tensor, x: torch.Tensor, kind: str, k: int = 10, seed: int = 0,
             chunk: int = 256) -> torch.Tensor:
    """(n, P) per-example gradients of the loss ("loss") or of the Square output ("square")."""
    t, z = _draws(run, k, seed)
    fn = grad(_example_output(run, kind, t, z))
    theta = theta.detach()
    return torch.cat([vmap(fn, in_dims=(None, 0))(theta, x[i:i + chunk].to(theta.dtype))
                      for i in range(0, len(x), chunk)])


def scores(run: MagicRun, theta: torch.Tensor, queries: torch.Tensor, method: str, k: int = 10,
           lam_scale: float = 0.1) -> np.ndarray:
    """(n_queries, N) TRAK / D-TRAK scores of every training example for each query."""
    if method not in METHODS:
        raise ConfigError(f"unknown baseline {method!r}; use one of {', '.join(METHODS)}")
    phi = features(run, theta, run.data, "loss" if method == "trak" else "square", k=k).double()
    if method == "trak":
        rows = []
        for xq in queries:
            th = theta.detach().clone().requires_grad_(True)
            b = run.bpd(th, xq.reshape(1, -1).to(th.dtype), create_graph=True)[0]   # the divergence needs it
            (gq,) = torch.autograd.grad(b, th)
            rows.append(gq.double())
        phq = torch.stack(rows)
    else:
        phq = features(run, theta, queries, "square", k=k).double()
    kern = phi @ phi.T
    lam = lam_scale * float(torch.trace(kern)) / len(kern)
    sol = torch.linalg.solve(kern + lam * torch.eye(len(kern), dtype=kern.dtype), phi @ phq.T)   # (N, Q)
    return sol.T.numpy()
