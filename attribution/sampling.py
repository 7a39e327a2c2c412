"""Generation with the full sampling trajectory kept.

Image i of a call with `seed=S` is generated from its own CPU generator seeded with S + i (initial noise and, for
DDPM, every step's noise), so an image depends only on its seed: `gen:S` names the same image everywhere, on any
device and in any batch.

The loop runs in the model's diffusion space (`latent_shape`, its per-sample `condition` for keys "gen/SEED") and
hands back images through the model's `decode`: a latent model returns decoded images, its trajectory's x_t stay
latents.

A text-conditional model samples with a `Prompt`: the prompt's condition (the image's key carries the prompt,
"gen/SEED/p=TEXT"), and classifier-free guidance against the negative prompt (empty: the unconditional
embedding) with scale `guidance` on the network's output: out = out_neg + guidance * (out_prompt - out_neg).

The walk itself is the model's schedule's (`Schedule.sampler`): diffusers' DDPM or DDIM step for DDPM models, Euler or
Heun on the time grid for flow-matching models.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from .errors import ConfigError
from .models.adapter import DiffusionModel, prompt_key

# Every sampler of every schedule (a model takes its schedule's: `model.schedule.samplers`, the first its default).
# DDPM first: on the small CPU-trained models DDIM's deterministic path gives visibly blurrier samples than DDPM at
# the same 50 steps. Flow-matching models sample with an ODE solver: Euler (the default) or Heun. All are
# deterministic given the seed.
SAMPLERS = ("ddpm", "ddim", "euler", "heun")
DEFAULT_GUIDANCE = 7.5  # Stable Diffusion's default classifier-free guidance scale


@dataclass(frozen=True)
class Prompt:
    """What a text-conditional model generates: the prompt, a negative prompt and the guidance scale (>= 1;
    1 = no guidance)."""

    text: str
    negative: str = ""
    guidance: float = DEFAULT_GUIDANCE

    def check(self) -> None:
        if not self.text.strip():
            raise ConfigError("the prompt is empty; a text-conditional model needs one (--prompt)")
        if not self.guidance >= 1:
            raise ConfigError(f"the guidance scale must be at least 1 (1 = no classifier-free guidance), "
                              f"got {self.guidance}")

    def to_dict(self) -> dict:
        return {"prompt": self.text, "negative": self.negative, "guidance": self.guidance}


def gen_key(seed: int, prompt: Prompt | None = None) -> str:
    """The noise key of generated image `seed` ("gen/SEED", with its prompt for a conditional model)."""
    return prompt_key(f"gen/{int(seed)}", None if prompt is None else prompt.text)


def check_prompt(model: DiffusionModel, prompt: Prompt | None) -> None:
    """One-line ConfigError when a conditional model gets no prompt, an unconditional one gets one, or the prompt
    is invalid."""
    if prompt is None:
        if model.conditional:
            if model.conditioned_on == "class":
                shown = ", ".join(model.class_prompts()[:12])
                raise ConfigError(f"{model.spec} is class-conditional: give a prompt, the class name (--prompt CLASS, "
                                  f"one of {shown})")
            raise ConfigError(f"{model.spec} is text-conditional: give a prompt (--prompt)")
        return
    if not model.conditional:
        raise ConfigError(f"{model.spec} is not conditional: drop the prompt")
    prompt.check()


@dataclass
class Trajectory:
    """A sampling run, kept whole for per-step (Journey) attribution.

    Attributes:
        timesteps: int64 (S,), the model timestep of each sampling step, in sampling order (high t first).
        xt: float32 (S, N, *latent_shape), the noisy input x_t the model saw at each step (diffusion space).
        x0_pred: float32 (S, N, C, H, W), the model's prediction of the clean image at each step, decoded.
        final: float32 (N, C, H, W) in [-1, 1], the generated images.
        seeds: int64 (N,), the seed of each image.
    """

    timesteps: np.ndarray
    xt: np.ndarray
    x0_pred: np.ndarray
    final: np.ndarray
    seeds: np.ndarray
    sampler: str

    def arrays(self) -> dict[str, np.ndarray]:
        return {"timesteps": self.timesteps, "xt": self.xt, "x0_pred": self.x0_pred, "images": self.final,
                "seeds": self.seeds}


def check_sampling(model: DiffusionModel, n: int, steps: int, sampler: str, prompt: Prompt | None = None) -> None:
    """Raise `ConfigError` (one line) for options `sample` cannot honour."""
    check_prompt(model, prompt)
    if sampler not in SAMPLERS:
        raise ConfigError(f"unknown sampler {sampler!r}; use one of: {', '.join(SAMPLERS)}")
    model.schedule.check_sampler(sampler)
    if n < 1:
        raise ConfigError(f"--n must be at least 1, got {n}")
    model.schedule.check_steps(steps)


@torch.no_grad()
def sample(model: DiffusionModel, n: int, seed: int = 0, steps: int = 50, sampler: str | None = None,
           progress: Callable[[int, int, str], None] | None = None, prompt: Prompt | None = None) -> Trajectory:
    """Generate `n` images with seeds seed..seed+n-1, keeping x_t and the predicted x0 at every step (with
    `prompt`, and classifier-free guidance, for a text-conditional model); `sampler` None: the schedule's
    default."""
    sampler = sampler or model.schedule.default_sampler
    check_sampling(model, n, steps, sampler, prompt)
    walk = model.schedule.sampler(sampler, steps)
    seeds = np.arange(seed, seed + n, dtype=np.int64)
    gens = [torch.Generator().manual_seed(int(s)) for s in seeds]
    x = torch.stack([torch.randn(model.latent_shape, generator=g) for g in gens]).to(model.device)
    params = model.parameters()
    cond = model.condition([gen_key(s, prompt) for s in seeds])
    guided = prompt is not None and prompt.guidance != 1
    negative = model.prompt_condition([prompt.negative] * n) if guided else None

    def predict(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The network's output, guided: out_neg + guidance (out - out_neg) (the noise and the velocity are both
        affine in the output at fixed x_t, so guiding the output guides them)."""
        out = model.raw(params, x_t, t, cond)
        if not guided:
            return out
        out_neg = model.raw(params, x_t, t, negative)
        return out_neg + prompt.guidance * (out - out_neg)

    xts, x0s = [], []
    total = len(walk.timesteps)
    for i, t in enumerate(walk.timesteps.tolist()):
        xts.append(x.float().cpu())
        x, x0 = walk.step(predict, i, x, gens)
        x0s.append(model.decode(x0).float().cpu())
        if progress:
            progress(i + 1, total, f"step {i + 1}/{total} (t={t})")
    final = model.decode(x).float().cpu().clamp(-1, 1)
    return Trajectory(walk.timesteps.numpy().astype(np.int64), torch.stack(xts).numpy(),
                      torch.stack(x0s).numpy(), final.numpy(), seeds, sampler)
