"""A small score network for the variance-exploding SDE dx = sigma^t dw (sigma = 25), written functionally.

MAGIC differentiates through every training step, so the model is a pure function of one flat parameter vector:
`score(theta, x, t)`. No dropout, no normalisation layers (nothing that depends on the batch or on a train/eval
mode), so a training step is a deterministic, smooth function of the parameters and the example weights.

Data: images as flat vectors in [0, 1] (D = channels * side * side). The default problem is scikit-learn digits at
their native 8x8: upscaling to 16x16 adds no information but multiplies the exact-divergence cost by 4 (one
VJP per dimension) and the parameter count of the first layer by 4.

Network (Song et al.'s tutorial recipe, in MLP form): Gaussian Fourier features of log sigma_t, concatenated with
x, two hidden SiLU layers, output divided by the marginal std so the score has the right scale at every t.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch

from ..errors import ConfigError

SIGMA = 25.0


def marginal_std(t: torch.Tensor, sigma: float = SIGMA) -> torch.Tensor:
    """std of x_t given x_0 for dx = sigma^t dw: sqrt((sigma^(2t) - 1) / (2 ln sigma))."""
    return torch.sqrt((sigma ** (2 * t) - 1.0) / (2 * math.log(sigma)))


def diffusion_coeff(t: torch.Tensor, sigma: float = SIGMA) -> torch.Tensor:
    """g(t) = sigma^t."""
    return sigma ** t


@dataclass(frozen=True)
class ScoreModelConfig:
    dim: int = 64            # D = channels * side * side
    hidden: int = 64
    fourier: int = 16        # number of Fourier frequencies of log sigma_t (embedding width 2 * fourier)
    sigma: float = SIGMA
    seed: int = 0            # initialisation and the fixed Fourier frequencies

    def __post_init__(self):
        for name in ("dim", "hidden", "fourier"):
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"score model {name} must be >= 1, got {getattr(self, name)}")
        if not self.sigma > 1:
            raise ConfigError(f"score model sigma must be > 1, got {self.sigma}")

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def shapes(self) -> list[tuple[str, tuple[int, ...]]]:
        d, h, e = self.dim, self.hidden, 2 * self.fourier
        return [("w1", (d + e, h)), ("b1", (h,)), ("w2", (h, h)), ("b2", (h,)), ("w3", (h, d)), ("b3", (d,))]

    @property
    def n_params(self) -> int:
        return sum(math.prod(s) for _, s in self.shapes)


class ScoreModel:
    """score(theta, x, t) for flat parameters theta; `init()` gives the seeded initial theta."""

    def __init__(self, config: ScoreModelConfig):
        self.config = config
        g = torch.Generator().manual_seed(config.seed + 7919)
        self._freqs = torch.randn(config.fourier, generator=g, dtype=torch.float64) * 4.0

    def init(self, dtype=torch.float32) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.config.seed)
        parts = []
        for name, shape in self.config.shapes:
            if name.startswith("w"):
                bound = 1.0 / math.sqrt(shape[0])
                parts.append((torch.rand(shape, generator=g, dtype=torch.float64) * 2 - 1) * bound)
            else:
                parts.append(torch.zeros(shape, dtype=torch.float64))
        return torch.cat([p.reshape(-1) for p in parts]).to(dtype)

    def unflatten(self, theta: torch.Tensor) -> dict[str, torch.Tensor]:
        if theta.ndim != 1 or theta.numel() != self.config.n_params:
            raise ConfigError(f"parameter vector has {theta.numel()} entries; this score model needs "
                              f"{self.config.n_params}")
        out, i = {}, 0
        for name, shape in self.config.shapes:
            n = math.prod(shape)
            out[name] = theta[i:i + n].view(shape)
            i += n
        return out

    def embed(self, t: torch.Tensor) -> torch.Tensor:
        s = torch.log(marginal_std(t, self.config.sigma)).unsqueeze(-1) / 4.0
        a = 2 * math.pi * s * self._freqs.to(t.dtype)
        return torch.cat([torch.sin(a), torch.cos(a)], dim=-1)

    def score(self, theta: torch.Tensor, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Score estimate for flat images x (B, D) at times t (B,) in (0, 1]."""
        p = self.unflatten(theta)
        std = marginal_std(t, self.config.sigma).unsqueeze(-1)
        # inputs scaled to unit variance at every t (c_in of Karras et al.), so one network fits all noise levels
        h = torch.cat([x / torch.sqrt(std ** 2 + 0.25), self.embed(t)], dim=-1)
        h = torch.nn.functional.silu(h @ p["w1"] + p["b1"])
        h = torch.nn.functional.silu(h @ p["w2"] + p["b2"])
        return (h @ p["w3"] + p["b3"]) / std


def dsm_losses(model: ScoreModel, theta: torch.Tensor, x0: torch.Tensor, t: torch.Tensor,
               z: torch.Tensor) -> torch.Tensor:
    """Per-example denoising score matching loss || std_t * s(x0 + std_t z, t) + z ||^2 (summed over pixels)."""
    std = marginal_std(t, model.config.sigma).unsqueeze(-1)
    s = model.score(theta, x0 + std * z, t)
    return ((s * std + z) ** 2).sum(dim=-1)
