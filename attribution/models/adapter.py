"""The model adapter: everything training, sampling, the features and Journey need to know about a diffusion model.

Nothing outside attribution/models/ touches a UNet, a VAE or a diffusers scheduler directly. They ask the adapter
(`DiffusionModel`) to
- `encode` images in [-1, 1] into the space the diffusion runs in and `decode` back (identity for pixel DDPMs; a
  VAE for latent models); `latent_shape` is the per-sample shape there, `resolution`/`channels` the image's;
- noise: `schedule` (a `schedules.Schedule`: DDPM or flow matching; add-noise, the training target, x̂0 from the
  network's output, ELBO weights, the time grid, samplers);
- build per-sample `condition`s from noise keys (none for unconditional models; class labels or prompt embeddings
  for conditional ones), as UNet keyword arguments with one row per sample;
- name the `parameters` that get gradients (all, a named subset, or what the implementation trains: LoRA weights)
  and the `trainable_parameters` that training updates;
- run the network: `raw(params, x_t, t, cond)` as a pure function of the parameters (so `torch.func` can take
  per-sample gradients) and `forward` for training; `prediction_target` is what `raw` was trained to predict.

An implementation (one file, e.g. `pixel_ddpm.py`) supplies the network and its loading; `registry.load_model` picks
the implementation that accepts a checkpoint folder, so a latent or conditional model is one more file there and
no method changes.

Concurrency: the network is shared by every thread that holds this model (the app's sessions). `raw` swaps
parameters into the module for the length of its forward pass, so every forward pass through the shared module
(`raw`, `forward`, and an implementation's encoder or decoder) holds `self._lock`.
"""

from __future__ import annotations

import hashlib
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch.func import functional_call

from ..device import resolve_device
from ..errors import ConfigError
from .checkpoint import CheckpointInfo
from .schedules import Schedule

Condition = dict[str, torch.Tensor] | None
# Reads a dataset split for training (split, resolution, channels; None: the dataset's own) -> a data.ImageDataset
# (models/ sits beside data/, so the training command hands the reader in).
Loader = Callable[[str, int | None, int | None], object]

# A noise key may carry the prompt of its sample: "gen/3/p=a cat painting" (and, for a Journey step,
# "gen/3/p=a cat painting/step500"). Text-conditional models read it in `condition`; the noise derived from the key
# then depends on the prompt too, as the image does.
PROMPT_MARK = "/p="


def prompt_key(key: str, prompt: str | None) -> str:
    """`key` with `prompt` attached (unchanged for None: unconditional sampling)."""
    return key if prompt is None else f"{key}{PROMPT_MARK}{prompt}"


def key_prompt(key: str) -> str | None:
    """The prompt a key carries (without a Journey "/stepT" suffix), or None."""
    if PROMPT_MARK not in key:
        return None
    text = key.split(PROMPT_MARK, 1)[1]
    head, _, tail = text.rpartition("/step")
    return head if head and tail.isdigit() else text


def sample_side(config) -> int:
    """The side of a diffusers network's square input (its config's `sample_size`: an int or a pair)."""
    size = config.sample_size
    return int(size if isinstance(size, int) else size[0])


def use_classic_attention(module: torch.nn.Module) -> None:
    """Give the module's diffusers attention layers the classic processor (no fused SDPA kernel), which supports
    vmap and higher-order autograd. Set on this module only; nothing in torch is patched."""
    from diffusers.models.attention_processor import Attention, AttnProcessor  # lazy: diffusers takes seconds to import

    for m in module.modules():
        if isinstance(m, Attention):
            m.set_processor(AttnProcessor())


# At the last timestep x_t is all but pure noise (sqrt(abar) = 0.0064 for the default schedule), so a trained
# epsilon-prediction network returns nearly x_t itself (cosine ~0.99 on the shipped models), while a v-prediction
# network returns about -x0 (uncorrelated with the noise) and an untrained one something unrelated.
NOISE_COSINE = 0.5


@torch.no_grad()
def noise_cosine(model: "DiffusionModel", n: int = 4) -> float:
    """Cosine between the network's output at t = T-1 and its input, on n seeded pure-noise samples (unconditional:
    the empty prompt for a text-conditional model)."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn((n, *model.latent_shape), generator=gen).to(model.device)
    t = torch.full((n,), model.num_timesteps - 1, dtype=torch.long, device=model.device)
    cond = model.prompt_condition([""] * n) if model.conditional else model.condition([f"gen/{i}" for i in range(n)])
    out = model.raw(model.parameters(), x, t, cond).double().flatten()
    return float(out @ x.double().flatten() / (out.norm() * x.double().norm()).clamp_min(1e-30))


def check_predicts_noise(model: "DiffusionModel", config_path: Path) -> None:
    """One ConfigError line when a model read as epsilon-prediction (no `prediction_type` given) does not predict
    the noise, so that a v-prediction checkpoint is never sampled or attributed as an epsilon one."""
    cos = noise_cosine(model)
    if cos < NOISE_COSINE:
        raise ConfigError(f"{model.spec}: no prediction_type is given ({config_path} has none) and the network does "
                          f"not predict the noise (its output at t={model.num_timesteps - 1} has cosine {cos:.2f} "
                          "with pure-noise input; an epsilon model's is ~1): if it is a v-prediction model, write "
                          "\"prediction_type\": \"v_prediction\" there, else \"epsilon\"")


class DiffusionModel(ABC):
    """A diffusion model as the attribution library sees it (see the module docstring).

    Subclasses implement `kind`, `accepts`, `load`, `module`, `latent_shape`, `resolution`, `channels`, `save`
    and, where they differ from a pixel model, `encode`/`decode`/`condition`/`trainable_parameters`.
    """

    kind: str = ""  # the registry name, e.g. "pixel-ddpm"
    conditional: bool = False  # conditional: generation takes a prompt (`prompt_condition`)
    conditioned_on: str = "prompt"  # what that prompt is: free text, or a "class" name (a class-conditional model)

    def __init__(self, schedule: Schedule, info: CheckpointInfo | None, device: torch.device | str):
        self.device = resolve_device(device)
        self.schedule = schedule
        self.info = info
        self._lock = threading.RLock()
        self._identity = info.content_hash() if info is not None else None

    # -- what an implementation provides ----------------------------------------------------------------------

    @classmethod
    @abstractmethod
    def accepts(cls, info: CheckpointInfo) -> bool:
        """Whether this implementation loads the checkpoint folder (read from its files, e.g. model_index.json)."""

    @classmethod
    @abstractmethod
    def load(cls, info: CheckpointInfo, device: str | torch.device = "auto") -> DiffusionModel:
        """Load the checkpoint (weights only from safetensors or torch.load(weights_only=True))."""

    @classmethod
    def trains(cls, cfg) -> bool:
        """Whether `train` builds this kind of model for a training config (a `train.TrainConfig`)."""
        return False

    @classmethod
    def for_training(cls, cfg, load: Loader, device: torch.device) -> tuple[DiffusionModel, object]:
        """A fresh, trainable model for the config (seed torch's global generator first: its initial weights come
        from it) and its training split, read with `load(split, resolution, channels)` (None: the dataset's own)
        at the model's size."""
        raise ConfigError(f"{cls.kind} models are not trained by this tool")

    @abstractmethod
    def save(self, target: Path, extra: dict | None = None) -> None:
        """Write a checkpoint folder that `load` (through `registry.load_model`) reads back, atomically."""

    @property
    @abstractmethod
    def module(self) -> torch.nn.Module:
        """The network whose parameters `raw` takes (the UNet)."""

    @property
    @abstractmethod
    def resolution(self) -> int:
        """Side of the square images the model generates and attributes (image space)."""

    @property
    @abstractmethod
    def channels(self) -> int:
        """Channels of those images (image space)."""

    @property
    def latent_shape(self) -> tuple[int, ...]:
        """Shape of one sample in the space the diffusion runs in, (C, H, W): the network's input channels and
        side (a diffusers config's `in_channels` and `sample_size`)."""
        side = sample_side(self.module.config)
        return (int(self.module.config.in_channels), side, side)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Images (B, C, H, W) in [-1, 1] -> the diffusion space (identity for pixel models)."""
        return x

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """The diffusion space -> images in (about) [-1, 1] (identity for pixel models)."""
        return z

    def condition(self, keys: Sequence[str]) -> Condition:
        """UNet keyword arguments for samples named by their noise keys ("train/I", "val/I", "gen/SEED",
        "file/HASH", each possibly followed by "/stepT" for a Journey step), each tensor with one row per key; None
        for an unconditional model. A conditional implementation maps a key to its class label or prompt."""
        return None

    def prompt_condition(self, prompts: Sequence[str]) -> Condition:
        """UNet keyword arguments for free-text prompts, one row each (an empty prompt is the unconditional one, as
        classifier-free guidance uses it); only text-conditional models take prompts."""
        raise ConfigError(f"{self.spec} is not conditional: prompts do not apply to it")

    def class_prompts(self) -> list[str]:
        """The prompt of each class of the training set, for a text-conditional model that records them (its
        finetuning set's template); empty otherwise."""
        return []

    def check_training_set(self, train) -> None:
        """Raise a ConfigError (one line) when this model cannot be attributed against `train` (a `data.ImageDataset`,
        the training split chosen for it). Pixel models accept any set, as their training images need nothing
        recorded per index; a model that reads per-image information by index (a LoRA finetune's prompt table)
        checks that it was recorded for these images."""
        return None

    def describe_parameters(self) -> str:
        """What attribution differentiates, for people: "all N parameters" (a LoRA model says "LoRA, N ...")."""
        return f"all {sum(p.numel() for p in self.trainable_parameters().values()):,} parameters"

    def trainable_parameters(self) -> dict[str, torch.nn.Parameter]:
        """The parameters training updates and attribution differentiates by default (all; LoRA: the LoRA ones)."""
        return dict(self.module.named_parameters())

    # -- derived, shared by every implementation --------------------------------------------------------------

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

        h = hashlib.sha256()
        for k, v in sorted(self.module.state_dict().items()):
            h.update(k.encode())
            h.update(v.detach().cpu().contiguous().numpy().tobytes())
        return h.hexdigest()[:16]

    def parameters(self, subset: str | None = None) -> dict[str, torch.Tensor]:
        """Parameters that get gradients (detached): the trainable ones, or those whose name starts with one of the
        comma-separated prefixes."""
        if not subset:
            return {k: v.detach() for k, v in self.trainable_parameters().items()}
        params = dict(self.module.named_parameters())
        prefixes = tuple(p.strip() for p in subset.split(",") if p.strip())
        chosen = {k: v.detach() for k, v in params.items() if k.startswith(prefixes)}
        if not chosen:
            tops = sorted({k.split(".")[0] for k in params})
            raise ConfigError(f"no parameters match {subset!r}; top-level modules are: {', '.join(tops)}")
        return chosen

    def buffers(self) -> dict[str, torch.Tensor]:
        return dict(self.module.named_buffers())

    def network_inputs(self, x_t: torch.Tensor, time: torch.Tensor, cond: Condition) -> tuple[tuple, dict]:
        """The network's (positional, keyword) arguments for a batch at network time `time`: (x_t, time) and the
        condition's keywords, as a UNet's or a DiT's forward takes them; a network with another order overrides."""
        return (x_t, time), dict(cond or {})

    def _call(self, x_t: torch.Tensor, t: torch.Tensor, cond: Condition) -> torch.Tensor:
        """The module's forward pass on a batch at grid times t (caller holds the lock); returns its output tensor."""
        args, kwargs = self.network_inputs(x_t, self.schedule.model_time(t), cond)
        return self.module(*args, **kwargs, return_dict=False)[0]

    def raw(self, params: dict[str, torch.Tensor], x_t: torch.Tensor, t: torch.Tensor, cond: Condition = None,
            ) -> torch.Tensor:
        """The network's output at grid times t (noise for epsilon models, v for v-prediction, the velocity eps - x0
        for flow matching; the network is told `schedule.model_time(t)`), a pure function of `params` (others stay
        at their checkpoint values). Output functions act on it against `prediction_target`, as the model was
        trained (and as D-TRAK does).

        Thread-safe: `functional_call` swaps `params` into the shared module while the forward pass runs, so the pass
        holds this model's lock (the backward pass of a gradient does not touch the module and runs unlocked).
        """
        args, kwargs = self.network_inputs(x_t, self.schedule.model_time(t), cond)
        with self._lock:
            return functional_call(self.module, (params, self.buffers()), args, dict(kwargs, return_dict=False),
                                   strict=False)[0]

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, cond: Condition = None) -> torch.Tensor:
        """The network's output with its own parameters, differentiable (training), under the lock."""
        with self._lock:
            return self._call(x_t, t, cond)

    def prediction_target(self, z0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.schedule.prediction_target(z0, eps, t)

    def eps(self, params: dict[str, torch.Tensor], x_t: torch.Tensor, t: torch.Tensor, cond: Condition = None,
            ) -> torch.Tensor:
        """Predicted noise for a batch, as a pure function of `params`."""
        return self.schedule.eps_from_raw(self.raw(params, x_t, t, cond), x_t, t)

    @torch.no_grad()
    def predict_raw(self, x_t: torch.Tensor, t: torch.Tensor, cond: Condition = None) -> torch.Tensor:
        """The network's output with its own parameters, without gradients."""
        return self.raw(self.parameters(), x_t, t, cond)

    def training_loss(self, x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor, cond: Condition = None,
                      ) -> torch.Tensor:
        """The training objective on a batch of images x0 (image space) with noise `eps` (diffusion space): the
        MSE between the network's output and its prediction target, differentiable in `trainable_parameters`."""
        z0 = self.encode(x0)
        x_t = self.schedule.add_noise(z0, eps, t, as_trained=True)
        return torch.nn.functional.mse_loss(self.forward(x_t, t, cond), self.prediction_target(z0, eps, t))

    @staticmethod
    def repeat_condition(cond: Condition, n: int) -> Condition:
        """One sample's condition (rows without the batch dimension, as `vmap` hands them) repeated for its n
        noisy copies."""
        if cond is None:
            return None
        return {k: v.unsqueeze(0).expand(n, *v.shape) for k, v in cond.items()}

    @staticmethod
    def condition_rows(cond: Condition, rows) -> Condition:
        """The rows (an index tensor or a slice) of a batch's condition."""
        return None if cond is None else {k: v[rows] for k, v in cond.items()}
