"""A deterministic training run with one weight per training example, replayable step by step.

    theta_{k+1}, m_{k+1}, v_{k+1} = step_k(theta_k, m_k, v_k, w)

Everything that is random in ordinary training is a function of (seed, step): the data order (concatenated seeded
permutations), the diffusion times t ~ U(t_min, 1) and the noises z ~ N(0, I). The loss of a batch is
sum_i w_i * dsm_i / batch_size (fixed denominator, so the gradient is linear in w and w_i = 0 is exactly "leave
example i out of its batches"). The optimiser is Adam with its epsilon *inside* the square root,
update = lr_k * m_hat / sqrt(v_hat + eps_root), which keeps the step a smooth function of the gradient (with the
usual eps outside, near-zero second moments make the update, and so the metagradient, explode).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
import torch

from ..errors import ConfigError
from .score_model import ScoreModel, dsm_losses


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 300
    batch_size: int = 256
    lr: float = 1e-2
    schedule: str = "linear"      # "constant", or "linear": linear decay to 0 at the last step
    beta1: float = 0.9
    beta2: float = 0.99
    eps_root: float = 1e-4        # Adam epsilon inside the square root (see the grid in BENCHMARKS.md)
    t_min: float = 1e-3           # training times t ~ U(t_min, 1)
    seed: int = 0                 # data order, times and noises
    dtype: str = "float32"

    def __post_init__(self):
        if int(self.steps) < 1:
            raise ConfigError(f"training steps must be >= 1, got {self.steps}")
        if int(self.batch_size) < 1:
            raise ConfigError(f"batch size must be >= 1, got {self.batch_size}")
        if not self.lr > 0:
            raise ConfigError(f"learning rate must be > 0, got {self.lr}")
        if self.schedule not in ("constant", "linear"):
            raise ConfigError(f"unknown learning-rate schedule {self.schedule!r}; use constant or linear")
        if not (0 <= self.beta1 < 1 and 0 <= self.beta2 < 1):
            raise ConfigError(f"Adam betas must be in [0, 1), got {self.beta1}, {self.beta2}")
        if not self.eps_root > 0:
            raise ConfigError(f"eps_root must be > 0, got {self.eps_root}")
        if not 0 < self.t_min < 1:
            raise ConfigError(f"t_min must be in (0, 1), got {self.t_min}")
        if self.dtype not in ("float32", "float64"):
            raise ConfigError(f"dtype must be float32 or float64, got {self.dtype!r}")

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def torch_dtype(self):
        return torch.float64 if self.dtype == "float64" else torch.float32

    def lr_at(self, k: int) -> float:
        return self.lr if self.schedule == "constant" else self.lr * (1 - k / self.steps)


State = tuple[torch.Tensor, torch.Tensor, torch.Tensor]   # (theta, m, v)


class WeightedRun:
    """The training problem: data (N, D) in [0, 1], a score model, a training recipe."""

    def __init__(self, data: torch.Tensor, model: ScoreModel, config: TrainConfig):
        if data.ndim != 2 or data.shape[1] != model.config.dim:
            raise ConfigError(f"training data must be (N, {model.config.dim}), got {tuple(data.shape)}")
        if config.batch_size > data.shape[0]:
            raise ConfigError(f"batch size {config.batch_size} exceeds the {data.shape[0]} training examples")
        self.config, self.model = config, model
        self.data = data.to(config.torch_dtype)
        self.n = data.shape[0]
        rng = np.random.default_rng(config.seed)
        need = config.steps * config.batch_size
        order = np.concatenate([rng.permutation(self.n) for _ in range(math.ceil(need / self.n))])[:need]
        self.order = torch.from_numpy(order.reshape(config.steps, config.batch_size))

    def batch(self, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(indices (B,), times (B,), noises (B, D)) of step k: a function of (seed, k) only."""
        g = torch.Generator().manual_seed(self.config.seed * 1_000_003 + k + 1)
        b, d = self.config.batch_size, self.model.config.dim
        t = self.config.t_min + (1 - self.config.t_min) * torch.rand(b, generator=g, dtype=torch.float64)
        z = torch.randn(b, d, generator=g, dtype=torch.float64)
        return self.order[k], t.to(self.config.torch_dtype), z.to(self.config.torch_dtype)

    def initial_state(self) -> State:
        theta = self.model.init(self.config.torch_dtype)
        return theta, torch.zeros_like(theta), torch.zeros_like(theta)

    def weighted_loss(self, theta: torch.Tensor, w: torch.Tensor, k: int) -> torch.Tensor:
        idx, t, z = self.batch(k)
        losses = dsm_losses(self.model, theta, self.data[idx], t, z)
        return (w[idx] * losses).sum() / self.config.batch_size

    def step(self, state: State, w: torch.Tensor, k: int, create_graph: bool = False) -> State:
        """One Adam step (eps inside the square root). create_graph keeps it differentiable in state and w."""
        theta, m, v = state
        c = self.config
        with torch.enable_grad():
            if not theta.requires_grad:
                theta = theta.detach().requires_grad_(True)
            loss = self.weighted_loss(theta, w, k)
            (g,) = torch.autograd.grad(loss, theta, create_graph=create_graph)
        m = c.beta1 * m + (1 - c.beta1) * g
        v = c.beta2 * v + (1 - c.beta2) * g * g
        m_hat = m / (1 - c.beta1 ** (k + 1))
        v_hat = v / (1 - c.beta2 ** (k + 1))
        theta = theta - c.lr_at(k) * m_hat / torch.sqrt(v_hat + c.eps_root)
        if not create_graph:
            theta, m, v = theta.detach(), m.detach(), v.detach()
        return theta, m, v

    def check_weights(self, w: torch.Tensor | None) -> torch.Tensor:
        if w is None:
            return torch.ones(self.n, dtype=self.config.torch_dtype)
        w = torch.as_tensor(w, dtype=self.config.torch_dtype)
        if w.shape != (self.n,):
            raise ConfigError(f"need one weight per training example ({self.n}), got shape {tuple(w.shape)}")
        return w

    def train(self, w: torch.Tensor | None = None, progress=None) -> torch.Tensor:
        """Final parameters of the run with weights w (default all ones)."""
        w = self.check_weights(w)
        state = self.initial_state()
        for k in range(self.config.steps):
            state = self.step(state, w, k)
            if progress is not None:
                progress(k + 1, self.config.steps)
        return state[0]

    def train_loss(self, theta: torch.Tensor, n_batches: int = 4, seed: int = 12345) -> float:
        """Mean unweighted DSM loss over a few fixed random batches of the training set (a health figure)."""
        g = torch.Generator().manual_seed(seed)
        total, count = 0.0, 0
        with torch.no_grad():
            for _ in range(n_batches):
                idx = torch.randint(self.n, (min(256, self.n),), generator=g)
                t = self.config.t_min + (1 - self.config.t_min) * torch.rand(len(idx), generator=g,
                                                                            dtype=torch.float64)
                z = torch.randn(len(idx), self.model.config.dim, generator=g, dtype=torch.float64)
                dt = self.config.torch_dtype
                total += float(dsm_losses(self.model, theta, self.data[idx], t.to(dt), z.to(dt)).sum())
                count += len(idx)
        return total / count
