"""Per-sample gradients of an output function, averaged over timesteps and noise draws.

For each sample x0 the feature gradient is

    g(x0) = (1 / (K D)) sum_{k, d} grad_theta f(theta; x0, t_k, eps_{k,d})

computed with `torch.func` (`vmap` over samples of `grad` of a function that runs the UNet on that sample's K x D
noisy copies at once), over all UNet parameters or a named subset. Projection happens afterwards, once (it is
linear, so projecting the average equals averaging the projections).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.func import grad, vmap

from ..models.adapter import DiffusionModel
from .outputs import OUTPUT_FUNCTIONS, output_value
from .timesteps import noise_for

# Roughly how many noisy images one vmap call pushes through the UNet (bounds activation memory).
IMAGES_PER_CALL = 64


@dataclass(frozen=True)
class GradientSpec:
    """What to differentiate: output function, timesteps and noise."""

    fn: str
    timesteps: tuple[int, ...]
    draws: int = 1
    seed: int = 0
    eta: float = 1.0
    params: str | None = None

    def __post_init__(self):
        assert self.fn in OUTPUT_FUNCTIONS, self.fn


def param_count(model: DiffusionModel, subset: str | None = None) -> int:
    return sum(p.numel() for p in model.parameters(subset).values())


def per_sample_gradients(model: DiffusionModel, x0: torch.Tensor, keys: list[str], spec: GradientSpec,
                         ) -> torch.Tensor:
    """Flattened per-sample gradients, shape (B, P) float32, in `named_parameters` order.

    Args:
        model: the adapter (its `eps` is differentiated functionally).
        x0: images in [-1, 1], shape (B, C, H, W).
        keys: one noise key per image (see `timesteps.noise_for`).
        spec: output function, timesteps, noise draws and seed, parameter subset.
    """
    device = model.device
    params = model.parameters(spec.params)
    names = list(params)
    z0 = model.encode(x0.to(device))
    ts = torch.tensor(spec.timesteps, dtype=torch.long)
    noise = noise_for(keys, ts, tuple(z0.shape[1:]), spec.seed, spec.draws).to(device)  # (B, K*D, C, H, W)
    t_all = ts.repeat_interleave(spec.draws).to(device)  # (K*D,)
    w_all = model.schedule.elbo_weight(t_all)
    total = len(t_all)
    cond = model.condition(1)

    def f(p, z0_i, eps_i, t_chunk, w_chunk):  # z0_i (C, H, W), eps_i (n, C, H, W)
        x_t = model.schedule.add_noise(z0_i.expand_as(eps_i), eps_i, t_chunk)
        eps_hat = model.eps(p, x_t, t_chunk, cond)
        return output_value(spec.fn, eps_hat, eps_i, w_chunk, spec.eta) / total

    per_sample = vmap(grad(f), in_dims=(None, 0, 0, None, None))
    b = z0.shape[0]
    step = max(1, IMAGES_PER_CALL // max(1, b))
    acc = torch.zeros(b, sum(p.numel() for p in params.values()), device=device)
    for s in range(0, total, step):
        g = per_sample(params, z0, noise[:, s:s + step], t_all[s:s + step], w_all[s:s + step])
        acc += torch.cat([g[n].reshape(b, -1) for n in names], 1)
    return acc
