"""Bits/dim through the probability-flow ODE, with the exact divergence, differentiable in the parameters.

For dx = g(t) dw (variance exploding) the probability-flow ODE is dx/dt = f(x, t) = -1/2 g(t)^2 s(x, t), and

    log p_eps(x) = log p_1(x(1)) + integral_eps^1 div f(x(t), t) dt,   x(eps) = x.

The integral is taken with a fixed-step Heun (or RK4) solver on a grid that is geometric in the marginal std (the
drift is stiff near t = 0 and gentle near t = 1, so equal steps in log std are close to equal difficulty). The
divergence is exact: D copies of the state go through the network in one batch and one backward pass gives the
Jacobian's diagonal (row j of copy j), i.e. one VJP per dimension done together. Everything is plain autograd, so
bits/dim is a deterministic function of the parameters that can be differentiated again (metagradients need it).

Images are flat vectors in [0, 1]; bits/dim counts 8-bit pixels: bpd = -log p(x) / (D ln 2) + 8.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from ..errors import ConfigError
from .score_model import diffusion_coeff, marginal_std

ScoreFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]   # (x (B, D), t (B,)) -> score (B, D)


def check_steps(steps: int) -> int:
    if int(steps) != steps or int(steps) < 1:
        raise ConfigError(f"ODE step count must be an integer >= 1, got {steps}")
    return int(steps)


def time_grid(steps: int, eps: float, sigma: float, dtype=torch.float64) -> torch.Tensor:
    """steps+1 times from eps to 1, equally spaced in log of the marginal std."""
    steps = check_steps(steps)
    if not 0 < eps < 1:
        raise ConfigError(f"ODE start time eps must be in (0, 1), got {eps}")
    ls = math.log(sigma)
    s0 = float(marginal_std(torch.tensor(eps, dtype=torch.float64), sigma))
    s1 = float(marginal_std(torch.tensor(1.0, dtype=torch.float64), sigma))
    stds = torch.exp(torch.linspace(math.log(s0), math.log(s1), steps + 1, dtype=torch.float64))
    t = torch.log1p(2 * ls * stds ** 2) / (2 * ls)
    t[0], t[-1] = eps, 1.0
    return t.to(dtype)


def exact_divergence(fn: ScoreFn, x: torch.Tensor, t: torch.Tensor,
                     create_graph: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(fn(x, t), div_x fn(x, t)) for x (B, D), t scalar tensor: one batched pass over D copies per image."""
    b, d = x.shape
    xr = x.unsqueeze(1).expand(b, d, d).reshape(b * d, d)
    if not xr.requires_grad:
        xr = xr.detach().requires_grad_(True)
    out = fn(xr, t.expand(b * d)).reshape(b, d, d)
    diag = out.diagonal(dim1=1, dim2=2)                   # copy j, output j
    (jac_rows,) = torch.autograd.grad(diag.sum(), xr, create_graph=create_graph)
    div = jac_rows.reshape(b, d, d).diagonal(dim1=1, dim2=2).sum(-1)
    return out[:, 0, :], div


def ode_log_likelihood(score_fn: ScoreFn, x: torch.Tensor, *, steps: int = 32, eps: float = 1e-3,
                       sigma: float = 25.0, solver: str = "heun", prior_var: float | None = None,
                       create_graph: bool | None = None) -> torch.Tensor:
    """log p_eps(x) per image (B,) under the probability-flow ODE of `score_fn`.

    create_graph: keep the graph for differentiating the result (default: when grad mode is on).
    prior_var: variance of the Gaussian prior at t = 1 (default: the marginal variance of the SDE at t = 1).
    """
    if solver not in ("heun", "rk4"):
        raise ConfigError(f"unknown ODE solver {solver!r}; use heun or rk4")
    if x.ndim != 2:
        raise ConfigError(f"images must be flat (B, D), got shape {tuple(x.shape)}")
    if create_graph is None:
        create_graph = torch.is_grad_enabled()
    grid = time_grid(steps, eps, sigma, x.dtype)
    d = x.shape[1]

    def rhs(xs, t):
        g2 = diffusion_coeff(t, sigma) ** 2
        with torch.enable_grad():
            s, div = exact_divergence(score_fn, xs, t, create_graph)
        if not create_graph:
            s, div = s.detach(), div.detach()
        return -0.5 * g2 * s, -0.5 * g2 * div

    xs, acc = x, torch.zeros(x.shape[0], dtype=x.dtype)
    for k in range(len(grid) - 1):
        t0, t1 = grid[k], grid[k + 1]
        h = t1 - t0
        if solver == "heun":
            f0, d0 = rhs(xs, t0)
            xp = xs + h * f0
            f1, d1 = rhs(xp, t1)
            xs, acc = xs + 0.5 * h * (f0 + f1), acc + 0.5 * h * (d0 + d1)
        else:
            tm = 0.5 * (t0 + t1)
            k1, e1 = rhs(xs, t0)
            k2, e2 = rhs(xs + 0.5 * h * k1, tm)
            k3, e3 = rhs(xs + 0.5 * h * k2, tm)
            k4, e4 = rhs(xs + h * k3, t1)
            xs = xs + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
            acc = acc + h / 6 * (e1 + 2 * e2 + 2 * e3 + e4)
    var = float(marginal_std(torch.tensor(1.0, dtype=torch.float64), sigma) ** 2) if prior_var is None else prior_var
    prior = -0.5 * d * math.log(2 * math.pi * var) - 0.5 * (xs ** 2).sum(-1) / var
    return prior + acc


def bits_per_dim(score_fn: ScoreFn, x: torch.Tensor, **kw) -> torch.Tensor:
    """Bits/dim of images x (B, D) in [0, 1], counting 8-bit pixels: -log p / (D ln 2) + 8."""
    d = x.shape[1]
    return -ode_log_likelihood(score_fn, x, **kw) / (d * math.log(2)) + 8.0
