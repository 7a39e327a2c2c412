"""Output functions f(theta; x0, t, eps) whose gradients become the features phi (D-TRAK paper, Sec. 3, Table 1).

Each takes the predicted noise `eps_hat`, the true noise `eps` (both (n, C, H, W)) and the ELBO weight `w_t` (n,),
and returns the sum over the n rows of a per-row scalar. "mean" is over C x H x W; the norms are un-normalised,
over the flattened prediction, as in the reference code.

| name | paper | per-row value |
|---|---|---|
| simple | Simple (TRAK; the training loss) | mean (eps_hat - eps)^2 |
| elbo | ELBO | w_t * mean (eps_hat - eps)^2, w_t = beta_t / (2 alpha_t (1 - abar_t)) |
| square | Square (D-TRAK's default) | mean eps_hat^2 |
| avg | Avg | mean eps_hat |
| l1 | L1-norm | sum abs(eps_hat) |
| l2 | L2-norm | sqrt(sum eps_hat^2) |
| linf | Linf-norm | max abs(eps_hat) |
| interp | Sec. 3.2 interpolation | eta * Square + (1 - eta) * (Simple - Square) |

`interp` at eta = 1 is Square and at eta = 0.5 is Simple / 2 (TRAK up to a constant).
"""

from __future__ import annotations

import torch

from ..errors import ConfigError

OUTPUT_FUNCTIONS = ("square", "simple", "elbo", "avg", "l1", "l2", "linf", "interp")


def _mean(x: torch.Tensor) -> torch.Tensor:
    return x.flatten(1).mean(1)


def output_value(fn: str, eps_hat: torch.Tensor, eps: torch.Tensor, w_t: torch.Tensor,
                 eta: float = 1.0) -> torch.Tensor:
    """Sum over rows of the per-row output function (a scalar)."""
    if fn == "simple":
        rows = _mean((eps_hat - eps) ** 2)
    elif fn == "elbo":
        rows = w_t * _mean((eps_hat - eps) ** 2)
    elif fn == "square":
        rows = _mean(eps_hat**2)
    elif fn == "avg":
        rows = _mean(eps_hat)
    elif fn == "l1":
        rows = eps_hat.flatten(1).abs().sum(1)
    elif fn == "l2":
        rows = eps_hat.flatten(1).pow(2).sum(1).sqrt()
    elif fn == "linf":
        rows = eps_hat.flatten(1).abs().amax(1)
    elif fn == "interp":
        square = _mean(eps_hat**2)
        rows = eta * square + (1 - eta) * (_mean((eps_hat - eps) ** 2) - square)
    else:
        raise ConfigError(f"unknown output function {fn!r}; use one of: {', '.join(OUTPUT_FUNCTIONS)}")
    return rows.sum()
