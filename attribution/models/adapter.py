"""The model adapter: everything the attribution methods need to know about a diffusion model.

Methods never touch the UNet directly. They ask the adapter to
- `encode` images into the space the diffusion runs in (identity for pixel DDPMs; a VAE for latent models),
- build the `condition` keyword arguments for a batch (none for unconditional models; class labels or prompt
  embeddings for conditional ones),
- name the `parameters` that get gradients (all of them, or a named subset such as LoRA weights),
- predict the noise with `eps(params, x_t, t, cond)` as a pure function of the parameters, so `torch.func` can
  take per-sample gradients; `raw` is the UNet's own output (noise or velocity) and `prediction_target` what it
  was trained to predict, which the output functions compare.

A latent, text-conditioned model plugs in as another subclass without changing any method.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import torch
from torch.func import functional_call

from ..device import resolve_device
from ..errors import ConfigError
from .checkpoint import CheckpointInfo, load_schedule_config, load_unet, resolve_checkpoint


@dataclass
class NoiseSchedule:
    """The DDPM forward process: x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps."""

    betas: torch.Tensor  # (T,) float64
    prediction_type: str
    config: dict

    @classmethod
    def from_config(cls, cfg: dict) -> "NoiseSchedule":
        from diffusers import DDPMScheduler

        sched = DDPMScheduler.from_config(cfg)
        return cls(sched.betas.double(), cfg.get("prediction_type", "epsilon"), dict(cfg))

    @property
    def num_timesteps(self) -> int:
        return int(self.betas.shape[0])

    @property
    def alphas_cumprod(self) -> torch.Tensor:
        return torch.cumprod(1.0 - self.betas, 0)

    def add_noise(self, x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x_t for a batch; `t` is an int tensor of shape (B,) or ()."""
        abar = self.alphas_cumprod.to(x0.device)[t].to(x0.dtype)
        abar = abar.reshape(abar.shape + (1,) * (x0.dim() - abar.dim()))
        return abar.sqrt() * x0 + (1 - abar).sqrt() * eps

    def elbo_weight(self, t: torch.Tensor) -> torch.Tensor:
        """w_t = beta_t / (2 alpha_t (1 - abar_t)), the ELBO weight of the epsilon MSE (D-TRAK's convention)."""
        betas = self.betas.to(t.device)
        abar = self.alphas_cumprod.to(t.device)
        return (betas[t] / (2 * (1 - betas[t]) * (1 - abar[t]))).float()

    def make_scheduler(self, sampler: str):
        """A fresh diffusers scheduler for sampling: 'ddim' (deterministic, eta=0) or 'ddpm'."""
        from diffusers import DDIMScheduler, DDPMScheduler

        if sampler == "ddim":
            return DDIMScheduler.from_config(self.config, clip_sample=self.config.get("clip_sample", True),
                                             set_alpha_to_one=False)
        if sampler == "ddpm":
            return DDPMScheduler.from_config(self.config)
        raise ConfigError(f"unknown sampler {sampler!r}; use ddim or ddpm")


class DiffusionModel:
    """A pixel-space, unconditional DDPM around a diffusers `UNet2DModel`."""

    def __init__(self, unet, schedule: NoiseSchedule, info: CheckpointInfo | None = None,
                 device: torch.device | str = "cpu"):
        from diffusers.models.attention_processor import Attention, AttnProcessor

        # The classic attention processor (no fused SDPA kernel) supports vmap and higher-order autograd; this
        # is set on this model's attention modules only, nothing in torch is patched.
        for module in unet.modules():
            if isinstance(module, Attention):
                module.set_processor(AttnProcessor())
        self.device = resolve_device(device)
        self.unet = unet.to(self.device).eval().requires_grad_(False)
        self.schedule = schedule
        self.info = info
        # `eps` runs the UNet through `functional_call`, which puts the given parameters into the module for the
        # length of the forward pass; threads sharing this model (the app's sessions) take turns there.
        self._lock = threading.RLock()
        self._identity = info.content_hash() if info is not None else None
        if schedule.prediction_type not in ("epsilon", "v_prediction"):
            raise ConfigError(f"prediction_type {schedule.prediction_type!r} is not supported; "
                              "use an epsilon- or v-prediction model")

    @property
    def resolution(self) -> int:
        size = self.unet.config.sample_size
        return int(size if isinstance(size, int) else size[0])

    @property
    def channels(self) -> int:
        return int(self.unet.config.in_channels)

    @property
    def num_timesteps(self) -> int:
        return self.schedule.num_timesteps

    @property
    def spec(self) -> str:
        return self.info.spec if self.info else "(in memory)"

    def identity(self) -> str:
        """A content hash of the weights (cache key), computed once: a run folder retrained in place while this
        model is loaded must not lend the new hash to the old weights."""
        if getattr(self, "_identity", None) is None:
            self._identity = self._hash_weights()
        return self._identity

    def _hash_weights(self) -> str:
        if self.info is not None:
            return self.info.content_hash()
        import hashlib

        h = hashlib.sha256()
        for k, v in sorted(self.unet.state_dict().items()):
            h.update(k.encode())
            h.update(v.detach().cpu().contiguous().numpy().tobytes())
        return h.hexdigest()[:16]

    # -- the adapter interface used by features/ ------------------------------------------------------------

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] -> the space the diffusion runs in (identity for pixel models)."""
        return x

    def condition(self, batch_size: int) -> dict:
        """Extra keyword arguments for the UNet (none: unconditional)."""
        return {}

    def parameters(self, subset: str | None = None) -> dict[str, torch.Tensor]:
        """Parameters that get gradients: all, or those whose name starts with one of the comma-separated prefixes."""
        params = dict(self.unet.named_parameters())
        if not subset:
            return {k: v.detach() for k, v in params.items()}
        prefixes = tuple(p.strip() for p in subset.split(",") if p.strip())
        chosen = {k: v.detach() for k, v in params.items() if k.startswith(prefixes)}
        if not chosen:
            tops = sorted({k.split(".")[0] for k in params})
            raise ConfigError(f"no parameters match {subset!r}; top-level modules are: {', '.join(tops)}")
        return chosen

    def buffers(self) -> dict[str, torch.Tensor]:
        return dict(self.unet.named_buffers())

    def raw(self, params: dict[str, torch.Tensor], x_t: torch.Tensor, t: torch.Tensor, cond: dict | None = None,
            ) -> torch.Tensor:
        """The UNet's output (noise for epsilon models, velocity for v-prediction), a pure function of `params`.
        Output functions act on this against `prediction_target`, as the model was trained (and as D-TRAK does).

        Thread-safe: `functional_call` swaps `params` into the shared UNet while the forward pass runs, so the pass
        holds this model's lock (the backward pass of a gradient does not touch the module and runs unlocked).
        """
        with self._lock:
            return functional_call(self.unet, (params, self.buffers()), (x_t, t),
                                   dict(cond or {}, return_dict=False), strict=False)[0]

    def prediction_target(self, x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """What `raw` is trained to predict: eps, or v = sqrt(abar_t) eps - sqrt(1 - abar_t) x0 for v-prediction."""
        if self.schedule.prediction_type != "v_prediction":
            return eps
        abar = self.schedule.alphas_cumprod.to(eps.device)[t].to(eps.dtype)
        abar = abar.reshape(abar.shape + (1,) * (eps.dim() - abar.dim()))
        return abar.sqrt() * eps - (1 - abar).sqrt() * x0

    def eps(self, params: dict[str, torch.Tensor], x_t: torch.Tensor, t: torch.Tensor, cond: dict | None = None,
            ) -> torch.Tensor:
        """Predicted noise for a batch, as a pure function of `params` (others stay at their checkpoint values)."""
        out = self.raw(params, x_t, t, cond)
        if self.schedule.prediction_type == "v_prediction":
            abar = self.schedule.alphas_cumprod.to(x_t.device)[t].to(x_t.dtype)
            abar = abar.reshape(abar.shape + (1,) * (x_t.dim() - abar.dim()))
            out = abar.sqrt() * out + (1 - abar).sqrt() * x_t
        return out

    @torch.no_grad()
    def predict_eps(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.eps(self.parameters(), x_t, t)


def load_model(spec: str, device: str | torch.device = "auto") -> DiffusionModel:
    """Resolve a checkpoint spec, load its UNet and noise schedule, and wrap them in the adapter."""
    info = resolve_checkpoint(spec)
    unet = load_unet(info)
    schedule = NoiseSchedule.from_config(load_schedule_config(info))
    return DiffusionModel(unet, schedule, info, device)
