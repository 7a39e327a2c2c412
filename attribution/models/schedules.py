"""Noise processes ("schedules"), in the manner of diffusers' `SchedulerMixin`: how training noises an image, what
the network is trained to predict, the clean image that a prediction implies, the ELBO weight of the loss, the time
the network is told, and the samplers that walk back from noise.

Every schedule indexes its times by an integer grid t = 0..T-1 (low noise first), the grid that the features, the
banks' F, Journey and training draw from, so that nothing downstream asks which process it is:

| | `DDPMSchedule` | `FlowMatchingSchedule` (rectified flow) |
|---|---|---|
| time of index t | the diffusion step t (abar_t) | s_t = shift(u) with u = (t + 1) / T, in (0, 1], s = 1 pure noise |
| x_t | sqrt(abar_t) x0 + sqrt(1 - abar_t) eps | (1 - s) x0 + s eps |
| network output, its training target | eps, v or x0-free: epsilon / v_prediction | velocity v = eps - x0 |
| x̂0 from the output | (x_t - sqrt(1 - abar_t) epŝ) / sqrt(abar_t) | x_t - s v̂ |
| the network's time input | t | s T (as diffusers and SD3 pass sigma x 1000) |
| ELBO weight of the output MSE | beta_t / (2 alpha_t (1 - abar_t)) (noise MSE) | (1 - s) / (s T) (velocity MSE) |
| samplers | ddpm (the default), ddim | euler (the default), heun |

The flow-matching ELBO weight is the continuous-time ELBO's density on the velocity error, per grid step: with
SNR(s) = ((1 - s) / s)^2 and x0 - x̂0 = s (v̂ - v), -1/2 dSNR/ds ||x0 - x̂0||^2 = (1 - s) / s ||v - v̂||^2; it is 0 at
pure noise, about 1 at the least noisy step. `shift` is diffusers' time shift (SD3 uses 3.0:
shift(u) = shift u / (1 + (shift - 1) u)); the sampler's times are diffusers' `FlowMatchEulerDiscreteScheduler`'s,
snapped to the nearest grid time (they lie on it at shift 1 whenever (T - 1) / (steps - 1) is a whole number).

`load_schedule(info)` reads a checkpoint's scheduler config and picks the schedule whose diffusers classes name it;
a class no schedule drives is one line naming it and the supported ones. Adding a schedule (e.g. EDM) is one class
(in this file or its own in models/, imported by models/__init__.py) with its `name` and `scheduler_classes`: it
registers itself in `SCHEDULES`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch

from ..errors import CheckpointError, ConfigError
from .checkpoint import CheckpointInfo, read_config

DEFAULT_SCHEDULE = {"num_train_timesteps": 1000, "beta_start": 1e-4, "beta_end": 0.02,
                    "beta_schedule": "linear", "prediction_type": "epsilon"}
DEFAULT_FLOW_SCHEDULE = {"num_train_timesteps": 1000, "shift": 1.0}

# The network's output at a batch's grid times, for a sampler step (guidance already applied).
Predict = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _per_sample(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Schedule values at a batch's timesteps, shaped to broadcast against `like` ((B,) -> (B, 1, 1, 1))."""
    return values.reshape(values.shape + (1,) * (like.dim() - values.dim()))


class Sampler(ABC):
    """One sampling run's walk from noise: `timesteps` (int64 grid indices, sampling order, high t first) and
    `step`, which takes the network (as `predict(x, t)`) and returns (x at the next step, x̂0 at this one)."""

    stochastic: bool = False  # draws noise at every step (from each image's generator)

    timesteps: torch.Tensor

    @abstractmethod
    def step(self, predict: Predict, i: int, x: torch.Tensor, generators: Sequence[torch.Generator],
             ) -> tuple[torch.Tensor, torch.Tensor]:
        """Step i from x (on the model's device); x̂0 is the clean sample the network's output at step i implies."""


SCHEDULES: dict[str, type[Schedule]] = {}  # by name; a subclass with a `name` registers itself when defined


class Schedule(ABC):
    """A noise process (see the module docstring). Subclasses are dataclasses built from a scheduler config; one
    with a `name` is registered in `SCHEDULES` when its module is imported (models/__init__.py imports them)."""

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if cls.name:
            SCHEDULES[cls.name] = cls

    name: ClassVar[str] = ""  # what `train --schedule` calls it
    title: ClassVar[str] = ""  # for people: "DDPM", "flow-matching"
    samplers: ClassVar[tuple[str, ...]] = ()  # the first is the default
    scheduler_classes: ClassVar[tuple[str, ...]] = ()  # diffusers scheduler classes whose config it reads
    scheduler_class: ClassVar[str] = ""  # the class it writes in a checkpoint's scheduler_config.json
    default_config: ClassVar[dict] = {}  # a fresh model's (`train --schedule NAME`)

    config: dict
    prediction_type: str

    @classmethod
    @abstractmethod
    def from_config(cls, cfg: dict) -> Schedule:
        """The schedule from a scheduler config (diffusers' keys; unknown keys ignored)."""

    @property
    @abstractmethod
    def num_timesteps(self) -> int:
        """T, the size of the time grid."""

    @property
    def default_sampler(self) -> str:
        return self.samplers[0]

    @classmethod
    def check_sampler(cls, sampler: str) -> None:
        if sampler not in cls.samplers:
            raise ConfigError(f"a {cls.title} model samples with {' or '.join(cls.samplers)}, not {sampler!r}")

    @abstractmethod
    def add_noise(self, x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor, as_trained: bool = False,
                  ) -> torch.Tensor:
        """x_t for a batch; `t` an int tensor (B,) or (). `as_trained`: exactly as training noised."""

    @abstractmethod
    def prediction_target(self, x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """What the network is trained to predict."""

    @abstractmethod
    def x0_from_raw(self, raw: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The clean sample the network's output implies."""

    @abstractmethod
    def eps_from_raw(self, raw: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The noise the network's output implies."""

    @abstractmethod
    def elbo_weight(self, t: torch.Tensor) -> torch.Tensor:
        """The ELBO weight of the output MSE at grid times t (float32)."""

    def model_time(self, t: torch.Tensor) -> torch.Tensor:
        """The time input the network takes at grid times t (the index itself unless the process says otherwise)."""
        return t

    @abstractmethod
    def f_pair(self, raw: torch.Tensor, x0: torch.Tensor, eps: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor,
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """(prediction, target) whose mean squared difference is the banks' measured loss F: the noise error for
        DDPM (the D-TRAK paper's F), the velocity error, the training loss, for flow matching."""

    @abstractmethod
    def sampler(self, name: str, steps: int) -> Sampler:
        """A sampler of `steps` steps (`check_sampler` first)."""

    def check_steps(self, steps: int) -> None:
        if not 1 <= steps <= self.num_timesteps:
            raise ConfigError(f"--steps must be within 1..{self.num_timesteps}, got {steps}")


# -- DDPM (variance preserving) --------------------------------------------------------------------------------------


class DiffusersSampler(Sampler):
    """diffusers' DDPM or DDIM step, told "epsilon" (the output is converted with `eps_from_raw` first)."""

    def __init__(self, schedule: DDPMSchedule, name: str, steps: int):
        self.schedule, self.name = schedule, name
        self.stochastic = name == "ddpm"
        self.sched = schedule.make_scheduler(name)
        self.sched.set_timesteps(steps)
        self.timesteps = self.sched.timesteps.to(torch.long)

    def step(self, predict, i, x, generators):
        t = self.sched.timesteps[i]
        tt = torch.full((len(x),), int(t), device=x.device, dtype=torch.long)
        eps = self.schedule.eps_from_raw(predict(x, tt), x, tt)
        if self.stochastic:  # diffusers draws the step's noise from each image's CPU generator
            out = self.sched.step(eps.cpu(), t, x.cpu(), generator=list(generators))
        else:
            out = self.sched.step(eps, t, x)
        return out.prev_sample.to(x.device), out.pred_original_sample.to(x.device)


@dataclass
class DDPMSchedule(Schedule):
    """The DDPM forward process: x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps.

    abar_t is the float64 cumulative product of the betas (exact to float32 rounding when cast). Training uses
    diffusers' own float32 product (`add_noise(..., as_trained=True)`), which differs from it by up to 2.4e-7: the
    shipped models were trained with that one, and cached features were computed with this one, so both stay.
    """

    betas: torch.Tensor  # (T,) float64
    prediction_type: str
    config: dict

    name: ClassVar[str] = "ddpm"
    title: ClassVar[str] = "DDPM"
    samplers: ClassVar[tuple[str, ...]] = ("ddpm", "ddim")
    # Scheduler classes whose config describes the discrete DDPM (variance-preserving) process by its betas: any of
    # them may name a checkpoint's schedule (the sampler drives it with diffusers' DDPM and DDIM steps).
    scheduler_classes: ClassVar[tuple[str, ...]] = (
        "DDPMScheduler", "DDIMScheduler", "PNDMScheduler", "LMSDiscreteScheduler", "EulerDiscreteScheduler",
        "EulerAncestralDiscreteScheduler", "HeunDiscreteScheduler", "KDPM2DiscreteScheduler",
        "KDPM2AncestralDiscreteScheduler", "DPMSolverMultistepScheduler", "DPMSolverSinglestepScheduler",
        "DPMSolverSDEScheduler", "UniPCMultistepScheduler", "DEISMultistepScheduler", "DDPMParallelScheduler",
        "DDIMParallelScheduler", "LCMScheduler", "TCDScheduler", "DDPMWuerstchenScheduler")
    scheduler_class: ClassVar[str] = "DDPMScheduler"
    default_config: ClassVar[dict] = DEFAULT_SCHEDULE
    config_keys: ClassVar[tuple[str, ...]] = (
        "num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "prediction_type", "trained_betas",
        "clip_sample", "clip_sample_range", "rescale_betas_zero_snr")

    def __post_init__(self):
        if self.prediction_type not in ("epsilon", "v_prediction"):
            raise ConfigError(f"prediction_type {self.prediction_type!r} is not supported; "
                              "use an epsilon- or v-prediction model")

    @classmethod
    def from_config(cls, cfg: dict) -> DDPMSchedule:
        from diffusers import DDPMScheduler  # lazy: diffusers takes seconds to import

        sched = DDPMScheduler.from_config(cfg)
        return cls(sched.betas.double(), cfg.get("prediction_type", "epsilon"), dict(cfg))

    @property
    def num_timesteps(self) -> int:
        return int(self.betas.shape[0])

    @property
    def alphas_cumprod(self) -> torch.Tensor:
        return torch.cumprod(1.0 - self.betas, 0)

    @property
    def training_alphas_cumprod(self) -> torch.Tensor:
        """abar_t as diffusers' `DDPMScheduler` computes it (float32 throughout), the table training noised with."""
        return torch.cumprod(1.0 - self.betas.float(), 0)

    def _abar(self, t: torch.Tensor, like: torch.Tensor, as_trained: bool = False) -> torch.Tensor:
        table = self.training_alphas_cumprod if as_trained else self.alphas_cumprod
        return _per_sample(table.to(like.device)[t].to(like.dtype), like)

    def add_noise(self, x0, eps, t, as_trained=False):
        abar = self._abar(t, x0, as_trained)
        return abar.sqrt() * x0 + (1 - abar).sqrt() * eps

    def predict_x0(self, x_t: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The clean sample implied by a noise prediction: (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t)."""
        abar = self._abar(t, x_t)
        return (x_t - (1 - abar).sqrt() * eps) / abar.sqrt()

    def x0_from_raw(self, raw, x_t, t):
        return self.predict_x0(x_t, self.eps_from_raw(raw, x_t, t), t)

    def prediction_target(self, x0, eps, t):
        """eps, or v = sqrt(abar_t) eps - sqrt(1 - abar_t) x0."""
        if self.prediction_type != "v_prediction":
            return eps
        abar = self._abar(t, eps)
        return abar.sqrt() * eps - (1 - abar).sqrt() * x0

    def eps_from_raw(self, raw, x_t, t):
        """The output itself for epsilon models."""
        if self.prediction_type != "v_prediction":
            return raw
        abar = self._abar(t, x_t)
        return abar.sqrt() * raw + (1 - abar).sqrt() * x_t

    def elbo_weight(self, t):
        """w_t = beta_t / (2 alpha_t (1 - abar_t)), the ELBO weight of the epsilon MSE (D-TRAK's convention)."""
        betas = self.betas.to(t.device)
        abar = self.alphas_cumprod.to(t.device)
        return (betas[t] / (2 * (1 - betas[t]) * (1 - abar[t]))).float()

    def f_pair(self, raw, x0, eps, x_t, t):
        return self.eps_from_raw(raw, x_t, t), eps

    def make_scheduler(self, sampler: str):
        """A fresh diffusers scheduler for sampling: 'ddim' (deterministic, eta=0) or 'ddpm'.

        Its `step` takes a noise prediction: the sampler converts the network's output with `eps_from_raw` first
        (and combines guided predictions before), so the scheduler is told "epsilon" whatever the checkpoint's
        `prediction_type`; handing a v-prediction scheduler epsilon would silently predict the wrong x0."""
        from diffusers import DDIMScheduler, DDPMScheduler  # lazy: diffusers takes seconds to import

        self.check_sampler(sampler)
        if sampler == "ddim":
            return DDIMScheduler.from_config(self.config, clip_sample=self.config.get("clip_sample", True),
                                             set_alpha_to_one=False, prediction_type="epsilon")
        return DDPMScheduler.from_config(self.config, prediction_type="epsilon")

    def sampler(self, name, steps):
        return DiffusersSampler(self, name, steps)


# -- flow matching (rectified flow) ---------------------------------------------------------------------------------


class FlowSampler(Sampler):
    """Euler (or Heun: the mean of the velocities at both ends, Euler on the last step) on the schedule's grid."""

    def __init__(self, schedule: FlowMatchingSchedule, name: str, steps: int):
        self.schedule, self.heun = schedule, name == "heun"
        self.timesteps = schedule.sampling_timesteps(steps)
        grid = schedule.sigmas().double()
        self.times = torch.cat([grid[self.timesteps], torch.zeros(1, dtype=torch.float64)])

    def step(self, predict, i, x, generators):
        t = torch.full((len(x),), int(self.timesteps[i]), device=x.device, dtype=torch.long)
        s, s_next = float(self.times[i]), float(self.times[i + 1])
        v = predict(x, t)
        x0 = x - s * v
        if self.heun and i + 1 < len(self.timesteps):
            x_euler = x + (s_next - s) * v
            t_next = torch.full_like(t, int(self.timesteps[i + 1]))
            v = (v + predict(x_euler, t_next)) / 2
        return x + (s_next - s) * v, x0


@dataclass
class FlowMatchingSchedule(Schedule):
    """Rectified flow: x_t = (1 - s) x0 + s eps at s = shift((t + 1) / T); the network predicts v = eps - x0."""

    config: dict
    prediction_type: str = "flow"

    name: ClassVar[str] = "flow-matching"
    title: ClassVar[str] = "flow-matching"
    samplers: ClassVar[tuple[str, ...]] = ("euler", "heun")
    scheduler_classes: ClassVar[tuple[str, ...]] = ("FlowMatchEulerDiscreteScheduler",
                                                    "FlowMatchHeunDiscreteScheduler")
    scheduler_class: ClassVar[str] = "FlowMatchEulerDiscreteScheduler"
    default_config: ClassVar[dict] = DEFAULT_FLOW_SCHEDULE
    config_keys: ClassVar[tuple[str, ...]] = ("num_train_timesteps", "shift")

    def __post_init__(self):
        self.config = {**DEFAULT_FLOW_SCHEDULE, **{k: self.config[k] for k in self.config_keys
                                                   if self.config.get(k) is not None}}
        if int(self.config["num_train_timesteps"]) < 2:
            raise ConfigError(f"num_train_timesteps must be at least 2, got {self.config['num_train_timesteps']}")
        if not float(self.config["shift"]) > 0:
            raise ConfigError(f"the time shift must be positive, got {self.config['shift']}")

    @classmethod
    def from_config(cls, cfg: dict) -> FlowMatchingSchedule:
        unsupported = [k for k in ("use_dynamic_shifting", "invert_sigmas", "use_karras_sigmas",
                                   "use_exponential_sigmas", "use_beta_sigmas", "stochastic_sampling")
                       if cfg.get(k)] + (["shift_terminal"] if cfg.get("shift_terminal") else [])
        if unsupported:
            raise ConfigError(f"a flow-matching scheduler with {unsupported[0]} set is not supported (its times "
                              "depend on more than the step); supported: a fixed shift")
        return cls(dict(cfg))

    @property
    def num_timesteps(self) -> int:
        return int(self.config["num_train_timesteps"])

    @property
    def shift(self) -> float:
        return float(self.config["shift"])

    def sigmas(self) -> torch.Tensor:
        """s_t for t = 0..T-1 (float32, ascending): diffusers' training sigmas, in grid order."""
        u = torch.arange(1, self.num_timesteps + 1, dtype=torch.float32) / self.num_timesteps
        return self.shift * u / (1 + (self.shift - 1) * u)

    def _s(self, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return _per_sample(self.sigmas().to(like.device)[t].to(like.dtype), like)

    def add_noise(self, x0, eps, t, as_trained=False):
        s = self._s(t, x0)
        return (1 - s) * x0 + s * eps

    def prediction_target(self, x0, eps, t):
        return eps - x0

    def x0_from_raw(self, raw, x_t, t):
        return x_t - self._s(t, x_t) * raw

    def eps_from_raw(self, raw, x_t, t):
        return x_t + (1 - self._s(t, x_t)) * raw

    def elbo_weight(self, t):
        s = self.sigmas().double().to(t.device)[t]
        return ((1 - s) / (s * self.num_timesteps)).float()

    def model_time(self, t):
        return self.sigmas().to(t.device)[t] * self.num_timesteps

    def f_pair(self, raw, x0, eps, x_t, t):
        return raw, self.prediction_target(x0, eps, t)

    def sampling_timesteps(self, steps: int) -> torch.Tensor:
        """The grid indices of a `steps`-step run: diffusers' sampling sigmas (`FlowMatchEulerDiscreteScheduler.
        set_timesteps`), each snapped to the nearest grid time; one line if two land on the same one."""
        from diffusers import FlowMatchEulerDiscreteScheduler  # lazy: diffusers takes seconds to import

        self.check_steps(steps)
        sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=self.num_timesteps, shift=self.shift)
        sched.set_timesteps(steps)
        wanted = sched.sigmas[:-1].double().numpy()
        grid = self.sigmas().double().numpy()
        idx = np.abs(grid[None, :] - wanted[:, None]).argmin(1)
        if len(np.unique(idx)) < len(idx):
            raise ConfigError(f"{steps} steps at shift {self.shift:g} put two steps on one of the model's "
                              f"{self.num_timesteps} times; use fewer steps")
        return torch.from_numpy(idx.astype(np.int64))

    def sampler(self, name, steps):
        self.check_sampler(name)
        return FlowSampler(self, name, steps)


# -- a checkpoint's schedule -----------------------------------------------------------------------------------------



def schedule_for_class(name: str | None) -> type[Schedule]:
    """The schedule that drives a diffusers scheduler class (None: DDPM, diffusers' default)."""
    if name is None:
        return DDPMSchedule
    for cls in SCHEDULES.values():
        if name in cls.scheduler_classes:
            return cls
    supported = "; ".join(f"{cls.title} ({', '.join(cls.scheduler_classes[:3])}"
                          f"{', ...' if len(cls.scheduler_classes) > 3 else ''})" for cls in SCHEDULES.values())
    raise CheckpointError(f"{name} is a noise process this tool cannot sample or attribute; supported: {supported}")


def read_scheduler_config(info: CheckpointInfo) -> dict | None:
    """The checkpoint's `scheduler_config.json` as written (None without one); one CheckpointError line when it is
    unreadable or names a scheduler class that no schedule drives."""
    if info.scheduler_config is None:
        return None
    cfg = read_config(info.scheduler_config)
    try:
        schedule_for_class(cfg.get("_class_name"))
    except CheckpointError as exc:
        raise CheckpointError(f"{info.scheduler_config}: {exc}") from None
    return cfg


def states_prediction_type(info: CheckpointInfo) -> bool:
    """Whether the checkpoint's scheduler config says what the network predicts (`prediction_type`; a flow-matching
    scheduler always does: the velocity)."""
    cfg = read_scheduler_config(info)
    return cfg is not None and (cfg.get("prediction_type") is not None
                                or schedule_for_class(cfg.get("_class_name")) is not DDPMSchedule)


def load_schedule_config(info: CheckpointInfo) -> dict:
    """The DDPM noise-schedule config: the checkpoint's own when it has one, else `DEFAULT_SCHEDULE`."""
    cfg = read_scheduler_config(info)
    if cfg is None:
        return dict(DEFAULT_SCHEDULE)
    out = dict(DEFAULT_SCHEDULE)
    out.update({k: cfg[k] for k in DDPMSchedule.config_keys if k in cfg and cfg[k] is not None})
    return out


def load_schedule(info: CheckpointInfo) -> Schedule:
    """The checkpoint's schedule (DDPM's default without a scheduler config)."""
    cfg = read_scheduler_config(info)
    cls = schedule_for_class(None if cfg is None else cfg.get("_class_name"))
    if cls is DDPMSchedule:
        return DDPMSchedule.from_config(load_schedule_config(info))
    try:
        return cls.from_config(cfg)
    except ConfigError as exc:
        raise CheckpointError(f"{info.scheduler_config}: {exc}") from None


def new_schedule(name: str) -> Schedule:
    """A fresh schedule for training, by its `train --schedule` name, with its default config."""
    if name not in SCHEDULES:
        raise ConfigError(f"unknown schedule {name!r}; use one of: {', '.join(SCHEDULES)}")
    return SCHEDULES[name].from_config(dict(SCHEDULES[name].default_config))
