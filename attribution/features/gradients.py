"""Per-sample gradients of an output function, averaged over timesteps and noise draws.

For each sample x0 the feature gradient is

    g(x0) = (1 / K) sum_k g_k,   g_k = (1 / D) sum_d grad_theta f(theta; x0, t_k, eps_{k,d})

computed with `torch.func` (`vmap` over samples of `grad` of a function that runs the UNet on a sample's noisy
copies at once, with the sample's own condition from `model.condition(keys)`), over the model's trainable
parameters or a named subset. Projection happens afterwards, once (it is linear, so
projecting the average equals averaging the projections).

Timesteps are shared by every sample (`GradientSpec.timesteps`) or given per sample (a (B, K) tensor: a training
image at the timestep it was drawn at in training, a Journey step at its own t). With `normalize` (Diffusion-ReTrac)
each per-timestep gradient g_k is divided by its norm before the average; `gradient_norms` returns the norms
||g_k|| themselves (the gradient-norm-versus-timestep analysis). Both need one gradient per (sample, timestep),
so they vmap over (sample, timestep) pairs instead of over samples: the same UNet work, more gradient memory.

`GradientFeatures` is the feature kind (`featurizer.Featurizer`) built on them: the gradients of D-TRAK, TRAK and
every gradient method, projected (`projectors.py`).
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np
import torch
from torch.func import grad, vmap

from ..errors import ConfigError
from ..models.adapter import DiffusionModel
from .featurizer import Featurizer
from .outputs import OUTPUT_FUNCTIONS, output_value
from .projectors import GRASS_MASK_FACTOR, make_projector, matrix_identity
from .timesteps import noise_for, training_timesteps

# Roughly how many noisy images one vmap call pushes through the UNet (bounds activation memory).
IMAGES_PER_CALL = 64
# The memory a featurizing process holds besides its model and buffers (interpreter, torch, diffusers): measured
# 0.9 GiB on the CPU (BENCHMARKS.md, "Paper-sized models within memory").
PROCESS_BYTES = int(0.9 * 2**30)
# Measured peaks were 0.85-1.27x `memory_estimate` (BENCHMARKS.md): a budget is met with this margin.
MEMORY_MARGIN = 1.3


@dataclass(frozen=True)
class GradientSpec:
    """What to differentiate: output function, timesteps and noise.

    Attributes:
        fn: output function (see `outputs.OUTPUT_FUNCTIONS`).
        timesteps: the K timesteps every sample is taken at (unless a call gives per-sample timesteps).
        draws: noise draws per timestep, D.
        seed: noise seed.
        eta: interpolation weight of fn="interp".
        params: comma-separated parameter-name prefixes (None: all parameters).
        normalize: unit-normalise each per-timestep gradient before averaging (Diffusion-ReTrac).
    """

    fn: str
    timesteps: tuple[int, ...]
    draws: int = 1
    seed: int = 0
    eta: float = 1.0
    params: str | None = None
    normalize: bool = False

    def __post_init__(self):
        assert self.fn in OUTPUT_FUNCTIONS, self.fn


def param_count(model: DiffusionModel, subset: str | None = None) -> int:
    return sum(p.numel() for p in model.parameters(subset).values())


def per_sample_gradients(model: DiffusionModel, x0: torch.Tensor, keys: list[str], spec: GradientSpec,
                         timesteps: torch.Tensor | None = None, images_per_call: int = IMAGES_PER_CALL,
                         ) -> torch.Tensor:
    """Flattened per-sample gradients, shape (B, P) float32, in `named_parameters` order.

    Args:
        model: the adapter (its `eps` is differentiated functionally).
        x0: images in [-1, 1], shape (B, C, H, W).
        keys: one noise key per image (see `timesteps.noise_for`).
        spec: output function, timesteps, noise draws and seed, parameter subset, normalisation.
        timesteps: optional int (B, K): per-sample timesteps replacing `spec.timesteps`.
        images_per_call: noisy images one vmap call pushes through the network (bounds activation memory; the
            result does not depend on it beyond float32 summation order).
    """
    mean, _ = _gradients(model, x0, keys, spec, timesteps, per_timestep=spec.normalize,
                         images_per_call=images_per_call)
    return mean


def gradient_norms(model: DiffusionModel, x0: torch.Tensor, keys: list[str], spec: GradientSpec,
                   timesteps: torch.Tensor | None = None, fixed_noise: bool = False) -> torch.Tensor:
    """||g_k|| for every sample and timestep, shape (B, K) float32 (g_k averaged over the D noise draws).

    With `fixed_noise` a sample sees the same D noise draws at every timestep (those keyed to its first
    timestep), so a norm-versus-timestep curve varies with t only.
    """
    _, norms = _gradients(model, x0, keys, spec, timesteps, per_timestep=True, fixed_noise=fixed_noise)
    return norms


def _noise(keys: list[str], ts: torch.Tensor, shape: tuple[int, ...], seed: int, draws: int) -> torch.Tensor:
    if bool((ts == ts[:1]).all()):  # shared timesteps: one call
        return noise_for(keys, ts[0], shape, seed, draws)
    return torch.cat([noise_for([k], row, shape, seed, draws) for k, row in zip(keys, ts)])


def _output(model, spec: GradientSpec, p, z0_i, eps_i, t_i, w_i, cond_i):
    """The output function summed over one sample's noisy copies: on the model's raw output (noise, or velocity for
    v-prediction models) against the prediction-type target, so Simple is exactly the training loss. `cond_i` is
    the sample's condition (rows without the batch dimension, or None), repeated for its copies."""
    z0s = z0_i.expand_as(eps_i)
    x_t = model.schedule.add_noise(z0s, eps_i, t_i)
    cond = model.repeat_condition(cond_i, len(eps_i))
    return output_value(spec.fn, model.raw(p, x_t, t_i, cond), model.prediction_target(z0s, eps_i, t_i), w_i,
                        spec.eta)


@torch.no_grad()
def output_values(model: DiffusionModel, x0: torch.Tensor, keys: list[str], spec: GradientSpec,
                  params: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
    """f itself (not its gradient) for each sample, averaged over the K timesteps and D noise draws exactly as
    `per_sample_gradients` averages its gradients: (B,) float64. With fn="simple" this is the sample's training
    loss at those timesteps and noises; `params` replaces the model's parameters (e.g. after an SGD step)."""
    p = dict(model.parameters()) if params is None else params
    z0 = model.encode(x0.to(model.device))
    b = z0.shape[0]
    ts = torch.tensor(spec.timesteps, dtype=torch.long).expand(b, -1)
    noise = _noise(keys, ts, tuple(z0.shape[1:]), spec.seed, spec.draws).to(model.device)
    t_all = ts.repeat_interleave(spec.draws, dim=1).to(model.device)
    w_all = model.schedule.elbo_weight(t_all)
    cond = model.condition(keys)
    n = t_all.shape[1]
    return torch.stack([_output(model, spec, p, z0[i], noise[i], t_all[i], w_all[i],
                                model.condition_rows(cond, i)).double() / n for i in range(b)])


def _gradients(model, x0, keys, spec, timesteps, per_timestep: bool, fixed_noise: bool = False,
               images_per_call: int = IMAGES_PER_CALL):
    device = model.device
    params = model.parameters(spec.params)
    names = list(params)
    z0 = model.encode(x0.to(device))
    b = z0.shape[0]
    ts = (torch.tensor(spec.timesteps, dtype=torch.long).expand(b, -1) if timesteps is None
          else torch.as_tensor(timesteps, dtype=torch.long).reshape(b, -1))
    k, d = ts.shape[1], spec.draws
    if fixed_noise:
        noise = _noise(keys, ts[:, :1], tuple(z0.shape[1:]), spec.seed, d).repeat(1, k, 1, 1, 1).to(device)
    else:
        noise = _noise(keys, ts, tuple(z0.shape[1:]), spec.seed, d).to(device)  # (B, K*D, C, H, W)
    t_all = ts.repeat_interleave(d, dim=1).to(device)  # (B, K*D)
    w_all = model.schedule.elbo_weight(t_all)
    cond = model.condition(keys)  # None, or UNet kwargs with one row per sample (vmapped with the sample)
    cond_dim = None if cond is None else 0
    dim = sum(p.numel() for p in params.values())

    def f(p, z0_i, eps_i, t_i, w_i, scale, cond_i):  # z0_i (C, H, W), eps_i (n, C, H, W), t_i / w_i (n,)
        return _output(model, spec, p, z0_i, eps_i, t_i, w_i, cond_i) * scale

    def flat(g, rows):
        return torch.cat([g[n].reshape(rows, -1) for n in names], 1)

    acc = torch.zeros(b, dim, device=device)
    if not per_timestep:  # vmap over samples, each call a chunk of every sample's K*D noisy copies
        per_sample = vmap(grad(f), in_dims=(None, 0, 0, 0, 0, None, cond_dim))
        step = max(1, images_per_call // b)
        for s in range(0, k * d, step):
            acc += flat(per_sample(params, z0, noise[:, s:s + step], t_all[:, s:s + step], w_all[:, s:s + step],
                                   1.0 / (k * d), cond), b)
        return acc, None
    # vmap over (sample, timestep) pairs, each with its D noisy copies
    per_item = vmap(grad(f), in_dims=(None, 0, 0, 0, 0, None, cond_dim))
    owner = torch.arange(b, device=device).repeat_interleave(k)
    cond_items = model.condition_rows(cond, owner)
    z_items = z0.repeat_interleave(k, dim=0)
    eps_items = noise.reshape(b * k, d, *noise.shape[2:])
    t_items, w_items = t_all.reshape(b * k, d), w_all.reshape(b * k, d)
    norms = torch.empty(b * k, device=device)
    step = max(1, images_per_call // d)
    for s in range(0, b * k, step):
        sl = slice(s, s + step)
        g = flat(per_item(params, z_items[sl], eps_items[sl], t_items[sl], w_items[sl], 1.0 / d,
                          model.condition_rows(cond_items, sl)), len(z_items[sl]))
        n = g.norm(dim=1)
        norms[sl] = n
        if spec.normalize:
            g = g / n.clamp_min(1e-30)[:, None]
        acc.index_add_(0, owner[sl], g / k)
    return acc, norms.reshape(b, k)


class GradientFeatures(Featurizer):
    """Projected per-sample gradients of the configured output function, averaged over its K timesteps and noise
    draws (training rows of the "training" strategy at their own training timestep)."""

    kind = "gradients"
    description = "plain gradient features"
    option_groups = frozenset({"gradients"})

    # -- the configuration's side

    @classmethod
    def config_dict(cls, cfg) -> dict:
        d = {name: getattr(cfg, name) for name in ("fn", "eta", "timesteps", "strategy", "noises", "proj_dim",
                                                   "projector", "seed", "params", "normalize", "proj_seed")}
        if cfg.projector == "identity":
            d["proj_dim"] = None
        if cfg.fn != "interp":
            d.pop("eta")
        if not cfg.normalize:  # absent from configs made before the option existed: their caches stay valid
            d.pop("normalize")
        if cfg.proj_seed is None:  # absent unless set: caches made before the option stay valid
            d.pop("proj_seed")
        if cfg.strategy == "training":  # K applies to targets only: training rows use their own timestep
            d.pop("timesteps")
        return d

    @classmethod
    def slug(cls, cfg) -> str:
        k = "exact" if cfg.projector == "identity" else f"k{cfg.proj_dim}"
        fn = f"interp{cfg.eta:g}" if cfg.fn == "interp" else cfg.fn
        unit = "-unit" if cfg.normalize else ""
        ts = "Ttrain" if cfg.strategy == "training" else f"K{cfg.timesteps}{cfg.strategy[0]}"
        ps = "" if cfg.proj_seed is None else f"-p{cfg.proj_seed}"
        return f"{fn}-{ts}-n{cfg.noises}{unit}{cls.slug_infix(cfg)}-{cfg.projector}-{k}-s{cfg.seed}{ps}"

    @classmethod
    def slug_infix(cls, cfg) -> str:
        """What a subclass adds to the folder name after the timesteps and noises (EK-FAC: its damping)."""
        return ""

    @classmethod
    def cost_kind(cls, cfg) -> str:
        proj = cfg.projector if cfg.projector == "identity" else f"{cfg.projector}{cfg.proj_dim}"
        return "-".join([cfg.fn, proj, *cls.cost_parts(cfg), *(["normalize"] if cfg.normalize else [])])

    @classmethod
    def cost_parts(cls, cfg) -> list[str]:
        """What a subclass adds to the cost of a sample (EK-FAC: its whitening)."""
        return []

    # -- one checkpoint and training set

    def __init__(self, model, train, cfg, cache_dir, batch_size=16):
        super().__init__(model, train, cfg, cache_dir, batch_size)
        self.grad_spec = cfg.gradient_spec(model.num_timesteps)
        self.grad_dim = self.gradient_dim()
        if cfg.projector != "identity" and cfg.proj_dim > self.grad_dim:
            raise ConfigError(f"k = {cfg.proj_dim} is more than the {self.grad_dim:,} parameters whose gradient it "
                              f"projects: choose k <= {self.grad_dim} (--proj-dim) or the identity projector "
                              "(--projector identity: the exact gradients, no larger)")
        self.proj_dim = self.grad_dim if cfg.projector == "identity" else cfg.proj_dim
        self.train_timesteps = self.train_timesteps_source = None
        if cfg.strategy == "training":
            self.train_timesteps, self.train_timesteps_source = training_timesteps(model, train, cfg.seed)
        self._projector = None
        self._projector_lock = threading.Lock()  # sessions share a featurizer: one builds the projector, once
        self.images_per_call = IMAGES_PER_CALL

    def gradient_dim(self) -> int:
        """The dimension of a gradient before the projection."""
        return param_count(self.model, self.cfg.params)

    @property
    def projector(self):
        if self._projector is None:
            with self._projector_lock:
                if self._projector is None:
                    self._projector = make_projector(self.cfg.projector, self.grad_dim, self.proj_dim,
                                                     self.cfg.projection_seed, self.model.device)
        return self._projector

    def identity(self) -> dict:
        out = {}
        matrix = matrix_identity(self.cfg.projector, self.model.device)
        if matrix is not None:  # only trak-cuda: CPU-generated matrices keep the identity (and folder) they had
            out["projection"] = matrix
        if self.train_timesteps is not None:
            digest = hashlib.sha256(self.train_timesteps.astype(np.int64).tobytes()).hexdigest()[:16]
            out["train_timesteps"] = {"source": self.train_timesteps_source, "hash": digest}
        return out

    def provenance(self) -> dict:
        return {"projector": self.projector.describe(),
                "timesteps": (f"each training image at its {self.train_timesteps_source} timestep"
                              if self.train_timesteps is not None else list(self.grad_spec.timesteps))}

    def samples_per_row(self) -> int:
        return (1 if self.train_timesteps is not None else len(self.grad_spec.timesteps)) * self.cfg.noises

    def samples_per_target(self) -> int:
        return len(self.grad_spec.timesteps) * self.cfg.noises

    def train_rows(self, rows: np.ndarray) -> np.ndarray:
        ts = None if self.train_timesteps is None else self.train_timesteps[rows]
        return self.rows(self.train.tensors(rows), self.train_keys(rows), timesteps=ts)

    def rows(self, images: torch.Tensor, keys: Sequence[str], fn: str | None = None,
             timesteps: np.ndarray | None = None) -> np.ndarray:
        """`timesteps` (M, K) replaces the configured timesteps per image (training rows of the "training"
        strategy)."""
        spec = self.grad_spec if fn is None else replace(self.grad_spec, fn=fn)
        out = []
        for s in range(0, len(images), self.batch_size):
            ts = None if timesteps is None else torch.as_tensor(timesteps[s:s + self.batch_size]).reshape(-1, 1)
            g = per_sample_gradients(self.model, images[s:s + self.batch_size], list(keys[s:s + self.batch_size]),
                                     spec, ts, self.images_per_call)
            out.append(self.projector.project(self.transform(g)).cpu().numpy())
        return np.concatenate(out).astype(np.float32)

    def transform(self, g: torch.Tensor) -> torch.Tensor:
        """What a subclass does to a batch of flat gradients before the projection (EK-FAC: whitens them)."""
        return g

    def memory_estimate(self, batch: int, images_per_call: int, activation: int) -> int:
        """Peak bytes of featurizing `batch` images per call, `images_per_call` noisy images per vmap call, with
        `activation` bytes per noisy image (`activation_bytes`):

            PROCESS_BYTES + 4 P (weights) + projector + 12 P B (accumulator, per-sample gradients, flattened copy)
            + n A,   n = B x min(K D, max(1, images_per_call // B)) noisy images per call, A per image,

        the projector's hash 5 s P bytes for `sjlt` (5 s m for `grass`, m kept coordinates; nothing for the
        identity), P the parameters taken. A model for choosing chunks, checked against measured peaks in
        BENCHMARKS.md, not a bound."""
        P, kd = self.gradient_dim(), max(1, len(self.grad_spec.timesteps)) * self.cfg.noises
        if self.cfg.projector in ("sjlt", "grass"):
            hashed = P if self.cfg.projector == "sjlt" else min(P, GRASS_MASK_FACTOR * self.proj_dim)
            projector = 5 * 4 * hashed
        else:
            projector = 4 * P * 2 if self.cfg.projector == "gaussian" else 0  # a dense block at a time, roughly
        n = batch * min(kd, max(1, images_per_call // batch))
        return PROCESS_BYTES + 4 * P + projector + 12 * P * batch + n * activation

    def fit_memory(self, budget_bytes: int) -> tuple[int, int]:
        """Choose the largest (batch size, noisy images per call) up to the configured ones whose
        `memory_estimate`, times `MEMORY_MARGIN`, fits `budget_bytes`, fewer images per call first; one line when
        even one image at a time does not fit. Features do not depend on the choice (beyond float32 summation
        order)."""
        activation = activation_bytes(self.model)
        for batch in range(self.batch_size, 0, -1):
            for per_call in sorted({min(self.images_per_call, v) for v in (self.images_per_call, 32, 16, 8, 4, 2,
                                                                              1)}, reverse=True):
                if MEMORY_MARGIN * self.memory_estimate(batch, per_call, activation) <= budget_bytes:
                    self.batch_size, self.images_per_call = batch, per_call
                    return batch, per_call
        need = MEMORY_MARGIN * self.memory_estimate(1, 1, activation) / 2**30
        raise ConfigError(f"featurizing {self.gradient_dim():,} parameters needs about {need:.1f} GiB even one image "
                          f"and one noisy copy at a time, over the --memory-budget of {budget_bytes / 2**30:.1f} GiB; "
                          "give a larger budget, or fewer parameters (--params)")


def activation_bytes(model: DiffusionModel) -> int:
    """Bytes autograd keeps for the backward of one noisy image's forward pass (what a vmap call holds per image),
    counted on one zero image with saved-tensor hooks: the activation memory per noisy image."""
    x = torch.zeros(1, model.channels, model.resolution, model.resolution, device=model.device)
    params = {k: v.detach().requires_grad_(True) for k, v in model.parameters().items()}
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        z = model.encode(x)
        t = torch.full((1,), model.num_timesteps // 2, dtype=torch.long, device=model.device)
        model.raw(params, z, t, model.condition(["train/0"]))
    return total
