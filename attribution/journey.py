"""Journey: attribution of each denoising step of one image (Journey-TRAK, Georgiev et al. 2023).

    journey = run_journey(attribution.members[0], JourneyConfig(seed=3, steps=50, every=5, resamples=20), progress)
    result = journey.result(attribution).at(lam)    # engine.Result: (steps chosen, N) scores, instant at any lambda
    f = formation(journey, result.scores, attribution.train)  # analysis/formation.py: how far each step is

At sampling step i (timestep t_i) the model sees x_t and predicts the clean image x̂0(t_i). The step's target
feature is the gradient of the attributor's output function at x̂0(t_i) re-noised to t_i, averaged over R noise
draws ("resamples"), projected like the training features. Only the features (steps x k) are stored: scores for
any lambda are one product with the cached kernel.

An image without a sampling trajectory (an upload) is attributed by noising it forward instead: x_t is the image
noised to each chosen t and x̂0 the model's one-step prediction from it (`forward_trajectory`).

The D-TRAK paper's "Journey TRAK" baseline (its appendix A.3) averages the per-step scores over all sampling steps
into one attribution of the final image; by linearity that is the score of the mean per-step feature
(`baseline_features`, used by `methods/journey_trak.py`).

Results are cached under cache/journey/<checkpoint hash>/ (an .npz of arrays and a .json written last), so the
app's step slider and a repeated command never recompute.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from .data import tensor_to_pixels
from .errors import AttributionError, ConfigError
from .features.gradients import per_sample_gradients
from .features.timesteps import noise_for
from .fileio import read_json, save_npz, write_json
from .models.adapter import prompt_key
from .options import opt
from .sampling import DEFAULT_GUIDANCE, SAMPLERS, Prompt, Trajectory, check_sampling, gen_key, sample
from .store import journey_dir, load_arrays
from .targets import Targets, pixels_key

Progress = Callable[[int, int, str], None]
JOURNEY_VERSION = 1  # bump when the stored arrays change meaning


# -- configuration -------------------------------------------------------------------------------------------------


def parse_steps(text: str | None) -> tuple[int, ...] | None:
    """'0,10,49' -> (0, 10, 49); a one-line ConfigError for anything else."""
    if text is None:
        return None
    try:
        return tuple(int(p) for p in text.replace(" ", "").split(",") if p)
    except ValueError:
        raise ConfigError(f"--at takes comma-separated step indices such as 0,10,49; got {text!r}") from None


@dataclass(frozen=True)
class JourneyConfig:
    """Which trajectory and which of its steps to attribute.

    Attributes:
        seed: the generated image (its own CPU generator, as everywhere: `gen:SEED`).
        steps: sampling steps of the sampler.
        sampler: the model's schedule's: "ddpm" or "ddim" (DDPM), "euler" or "heun" (flow matching); None: its
            default (`for_model` fills it in).
        every: attribute every N-th step, counted back from the last one (so the last step is always included);
            None with `at` None: about 10 steps (every = steps // 10).
        at: explicit step indices in sampling order (0 = the first, noisiest step; steps-1 = the last).
        resamples: R, noise draws of the re-noised x̂0 averaged per step.
        prompt, negative, guidance: what a text-conditional model generates (`sampling.Prompt`); prompt None for
            an unconditional model. An uploaded image's steps are conditioned on `prompt` too.
    """

    seed: int = field(default=0, metadata=opt("the generated image (gen:SEED)", label="Seed"))
    steps: int = field(default=50, metadata=opt("sampling steps", label="Steps"))
    sampler: str | None = field(default=None, metadata=opt(
        "the sampler whose trajectory is attributed (default: the model's, ddpm, or euler for flow matching)",
        choices=SAMPLERS, label="Sampler", noun="sampler"))
    every: int | None = field(default=None, metadata=opt(
        "attribute every N-th step, counted back from the last (default: steps // 10)",
        label="Attribute every N-th step"))
    at: tuple[int, ...] | None = field(default=None, metadata=opt(
        "explicit comma-separated step indices, 0 = the first (noisiest) step", parse=parse_steps, metavar="I,J,..",
        label="Steps to attribute"))
    resamples: int = field(default=20, metadata=opt("R, re-noisings of x̂0 averaged per step",
                                                    label="Re-noisings per step (R)"))
    # (the prompt options are every text-to-image command's: --prompt, --negative-prompt, --guidance)
    prompt: str | None = None
    negative: str = ""
    guidance: float = DEFAULT_GUIDANCE

    def text(self) -> Prompt | None:
        """The `sampling.Prompt` (None without a prompt)."""
        return None if self.prompt is None else Prompt(self.prompt, self.negative, self.guidance)

    def for_model(self, model) -> JourneyConfig:
        """This config with the model's default sampler where none is given."""
        return self if self.sampler is not None else replace(self, sampler=model.schedule.default_sampler)

    def check(self, schedule) -> None:
        """Raise `ConfigError` (one line) for options no run of the schedule's samplers can honour."""
        if self.sampler is not None and self.sampler not in SAMPLERS:
            raise ConfigError(f"unknown sampler {self.sampler!r}; use one of: {', '.join(SAMPLERS)}")
        schedule.check_sampler(self.sampler or schedule.default_sampler)
        schedule.check_steps(self.steps)
        if self.prompt is not None:
            self.text().check()
        if self.resamples < 1:
            raise ConfigError(f"--resamples must be at least 1, got {self.resamples}")
        if self.every is not None and self.at is not None:
            raise ConfigError("give either --every or --at, not both")
        if self.every is not None and self.every < 1:
            raise ConfigError(f"--every must be at least 1, got {self.every}")
        if self.at is not None:
            if not self.at:
                raise ConfigError("--at needs at least one step index")
            bad = [i for i in self.at if not 0 <= i < self.steps]
            if bad:
                raise ConfigError(f"step {bad[0]} is outside the sampler's range 0..{self.steps - 1} "
                                  f"({self.steps} {self.sampler} steps; 0 is the first, noisiest step)")

    def step_indices(self) -> np.ndarray:
        """The chosen step indices, ascending (sampling order)."""
        if self.at is not None:
            return np.array(sorted(set(int(i) for i in self.at)), dtype=np.int64)
        every = self.every if self.every is not None else max(1, self.steps // 10)
        return np.arange((self.steps - 1) % every, self.steps, every, dtype=np.int64)

    def to_dict(self) -> dict:
        out = {"seed": self.seed, "steps": self.steps, "sampler": self.sampler,
               "step_indices": self.step_indices().tolist(), "resamples": self.resamples}
        if self.prompt is not None:  # (absent for unconditional models: their cache keys stay as they were)
            out.update(self.text().to_dict())
        return out


# -- trajectories ----------------------------------------------------------------------------------------------------


def sampled_trajectory(model, cfg: JourneyConfig, progress: Progress | None = None) -> Trajectory:
    """The sampling run of image `cfg.seed` (x_t and x̂0 at every step)."""
    cfg = cfg.for_model(model)
    cfg.check(model.schedule)
    check_sampling(model, 1, cfg.steps, cfg.sampler, cfg.text())
    return sample(model, 1, cfg.seed, cfg.steps, cfg.sampler, progress=progress, prompt=cfg.text())


@torch.no_grad()
def forward_trajectory(model, image: torch.Tensor, cfg: JourneyConfig, key: str) -> Trajectory:
    """A trajectory for an image that has none: x_t = the image (encoded) noised to each sampling timestep (noise
    keyed by `key`), x̂0 = the model's one-step prediction from x_t, decoded and clipped to [-1, 1]; `final` is the
    image itself."""
    cfg = cfg.for_model(model)
    cfg.check(model.schedule)
    ts = model.schedule.sampler(cfg.sampler, cfg.steps).timesteps
    x0 = image.reshape(1, *image.shape[-3:]).float()
    z0 = model.encode(x0.to(model.device)).float().cpu()
    eps = noise_for([key], ts, tuple(z0.shape[1:]), seed=0)[0]  # (S, *latent_shape)
    xt = model.schedule.add_noise(z0.expand_as(eps), eps, ts).float()
    cond = model.condition([key])
    preds = []
    for s in range(0, len(ts), 16):
        t = ts[s:s + 16]
        c = model.repeat_condition(model.condition_rows(cond, 0), len(t))
        raw = model.predict_raw(xt[s:s + 16].to(model.device), t.to(model.device), c).float().cpu()
        preds.append(model.decode(model.schedule.x0_from_raw(raw, xt[s:s + 16], t).to(model.device)).float().cpu())
    x0_pred = torch.cat(preds).clamp(-1, 1)
    return Trajectory(ts.numpy().astype(np.int64), xt[:, None].numpy(), x0_pred[:, None].numpy(),
                      x0.clamp(-1, 1).numpy(), np.array([-1], dtype=np.int64), cfg.sampler)


# -- the result ----------------------------------------------------------------------------------------------------


@dataclass
class Journey:
    """Per-step target features of one image along its trajectory (only the chosen steps are kept).

    Attributes:
        steps: int64 (n,), the chosen step indices in sampling order.
        timesteps: int64 (n,), their model timesteps (high t first).
        xt: float32 (n, C, H, W), the noisy input at each chosen step.
        x0: float32 (n, C, H, W), the predicted clean image x̂0 at each chosen step.
        final: float32 (C, H, W) in [-1, 1], the final image.
        features: float32 (n, k), the projected per-step target features.
        meta: JSON-able description (config, source, name, feature identity, seconds).
        xt_view: float32 (n, C, H, W), x_t decoded to an image, for a latent model (whose x_t are latents);
            None for a pixel model (x_t is already an image).
    """

    steps: np.ndarray
    timesteps: np.ndarray
    xt: np.ndarray
    x0: np.ndarray
    final: np.ndarray
    features: np.ndarray
    meta: dict
    xt_view: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.steps)

    def targets(self) -> Targets:
        """The chosen steps as targets: x̂0 of each, named "step S"."""
        name = self.meta.get("name", "journey")
        names = [f"step {int(s)}" for s in self.steps]
        return Targets(torch.from_numpy(np.ascontiguousarray(self.x0)), [f"{name}@{n}" for n in names], names,
                       [None] * len(self))

    def result(self, attribution):
        """The steps' `engine.Result` under `attribution` (one checkpoint: the attributor whose features these
        are): scores (n, N) at the default lambda, `.at(lam)` at any other in milliseconds (the lifecycle's last
        steps, `Attribution.result`, on these per-step features)."""
        if len(attribution.members) != 1:
            raise ConfigError("a journey is attributed with one checkpoint, not an ensemble or a run's checkpoints")
        return attribution.result(self.targets(), [self.features])

    def x0_distance(self) -> np.ndarray:
        """Root-mean-square pixel distance of x̂0 at each step to the final image ([-1, 1] units)."""
        diff = (self.x0 - self.final[None]).reshape(len(self), -1).astype(np.float64)
        return np.sqrt((diff**2).mean(1))

    def arrays(self) -> dict[str, np.ndarray]:
        out = {"steps": self.steps, "timesteps": self.timesteps, "xt": self.xt, "x0": self.x0,
               "final": self.final, "features": self.features}
        if self.xt_view is not None:
            out["xt_view"] = self.xt_view
        return out

    def xt_images(self) -> np.ndarray:
        """x_t of each chosen step as an image in about [-1, 1] (decoded for a latent model)."""
        return self.xt if self.xt_view is None else self.xt_view

    def save(self, path: Path) -> None:
        """npz first, then the json (the completion marker), both atomically."""
        save_npz(path.with_suffix(".npz"), **self.arrays())
        write_json(path.with_suffix(".json"), self.meta)

    @classmethod
    def load(cls, path: Path) -> Journey | None:
        npz, meta = path.with_suffix(".npz"), path.with_suffix(".json")
        if not (npz.exists() and meta.exists()):
            return None
        arrays = load_arrays(npz)
        try:
            return None if arrays is None else cls(meta=read_json(meta), **arrays)
        except (AttributionError, TypeError):  # a damaged cache entry: recomputed and saved over
            return None


def journey_path(att, cfg: JourneyConfig, source: str, cache: str | None = None, sampled_by: str | None = None,
                 ) -> Path:
    """cache/journey/<checkpoint hash>/<readable slug>-<hash of everything the result depends on> (no suffix).
    `sampled_by`: the weights hash of another checkpoint that sampled the trajectory (an ensemble member)."""
    cfg = cfg.for_model(att.model)
    ident = {"version": JOURNEY_VERSION, "features": att.identity, "journey": cfg.to_dict(), "source": source}
    if sampled_by is not None and sampled_by != att.identity["checkpoint"]:
        ident["sampled_by"] = sampled_by
    slug = f"{source.split('/p=')[0].replace('/', '-')}-{cfg.sampler}{cfg.steps}-{att.cfg.fn}-R{cfg.resamples}"
    return journey_dir(att.identity["checkpoint"], slug, ident, cache)


def journey_source(cfg: JourneyConfig, image: torch.Tensor | None = None) -> str:
    """What a journey's cache entry and noise keys are named by: generated image `cfg.seed`, or `image` (C, H, W)
    noised forward, by its pixels."""
    if image is not None:
        return prompt_key(pixels_key(tensor_to_pixels(image.reshape(-1, *image.shape[-2:]))), cfg.prompt)
    return gen_key(cfg.seed, cfg.text())


def journey_cached(att, cfg: JourneyConfig, cache: str | None = None, image: torch.Tensor | None = None) -> bool:
    """Whether `run_journey(att, cfg, image=image)` is on disk: of generated image `cfg.seed` (sampled by `att`'s
    model), or of `image` noised forward."""
    path = journey_path(att, cfg, journey_source(cfg, image), cache)
    return path.with_suffix(".npz").exists() and path.with_suffix(".json").exists()


def step_features(att, x0: np.ndarray, timesteps: np.ndarray, keys: list[str], resamples: int,
                  progress: Progress | None = None) -> np.ndarray:
    """Projected features of images x0 (n, C, H, W), each re-noised at its own timestep with R draws: (n, k)."""
    spec = dataclasses.replace(att.featurizer.grad_spec, draws=int(resamples))
    out = []
    for s in range(0, len(x0), att.batch_size):
        rows = slice(s, s + att.batch_size)
        ts = torch.as_tensor(np.asarray(timesteps[rows]), dtype=torch.long)[:, None]
        g = per_sample_gradients(att.model, torch.from_numpy(np.ascontiguousarray(x0[rows])), keys[rows], spec,
                                 timesteps=ts)
        out.append(att.featurizer.projector.project(g).cpu().numpy())
        if progress:
            done = min(len(x0), s + att.batch_size)
            progress(done, len(x0), f"step features {done}/{len(x0)}")
    return np.concatenate(out).astype(np.float32)


def run_journey(att, cfg: JourneyConfig, progress: Progress | None = None, cache: str | None = None,
                image: torch.Tensor | None = None, name: str | None = None, use_cache: bool = True,
                sampler_model=None) -> Journey:
    """The journey of image `cfg.seed` (sampled) or of `image` (C, H, W) in [-1, 1] (noised forward), loaded from
    the cache when it was computed before with the same checkpoint, features and options.

    `sampler_model` samples the trajectory instead of `att.model` (default): an ensemble's members score the one
    trajectory of the image the target checkpoint generates, each with its own gradients."""
    sampler_model = sampler_model or att.model
    cfg = cfg.for_model(att.model)
    cfg.check(att.model.schedule)
    source = journey_source(cfg, image)
    sampled_by = sampler_model.identity() if image is None and sampler_model is not att.model else None
    path = journey_path(att, cfg, source, cache, sampled_by)
    if use_cache:
        found = Journey.load(path)
        if found is not None:
            if progress:
                progress(1, 1, "cached")
            return found
    start = time.perf_counter()
    idx = cfg.step_indices()
    total = cfg.steps + len(idx)

    def staged(offset: int) -> Progress | None:
        return None if progress is None else (lambda d, _t, msg="": progress(offset + d, total, msg))

    if image is None:
        traj = sampled_trajectory(sampler_model, cfg, staged(0))
    else:
        traj = forward_trajectory(att.model, image, cfg, source)
        if progress:
            progress(cfg.steps, total, "noised forward")
    ts = traj.timesteps[idx]
    keys = [f"{source}/step{int(t)}" for t in ts]
    x0 = traj.x0_pred[idx, 0]
    feats = step_features(att, x0, ts, keys, cfg.resamples, staged(cfg.steps))
    meta = {"config": cfg.to_dict(), "source": source, "mode": "forward" if image is not None else "sampled",
            "name": name or (f"gen:{cfg.seed}" if image is None else source), "checkpoint": att.model.spec,
            "sampled_by": sampler_model.spec if image is None else None,
            "checkpoint_hash": att.identity["checkpoint"], "dataset": att.train.spec, "fn": att.cfg.fn,
            "feature_store": str(att.store_path), "proj_dim": att.proj_dim,
            "seconds": round(time.perf_counter() - start, 2), "version": JOURNEY_VERSION}
    xt = traj.xt[idx, 0]
    view = None
    if xt.shape[1:] != traj.final.shape[1:]:  # latents: decoded for display
        with torch.no_grad():
            view = att.model.decode(torch.from_numpy(np.ascontiguousarray(xt)).to(att.model.device)).float().cpu()
        view = view.clamp(-1, 1).numpy()
    journey = Journey(idx, ts.astype(np.int64), xt, x0, traj.final[0], feats, meta, view)
    if use_cache:
        journey.save(path)
    return journey


# -- the "Journey TRAK" baseline (D-TRAK paper, appendix A.3) ---------------------------------------------------


def baseline_features(att, seed: int, steps: int = 50, sampler: str | None = None, resamples: int = 1,
                      progress: Progress | None = None, cache: str | None = None, sampler_model=None,
                      prompt: Prompt | None = None) -> np.ndarray:
    """Mean of the per-step features over every sampling step of image `seed` (sampled by `sampler_model`, default
    `att.model`): (k,). Its scores are the mean of the per-step scores (scores are linear in the feature)."""
    text = {} if prompt is None else {"prompt": prompt.text, "negative": prompt.negative, "guidance": prompt.guidance}
    cfg = JourneyConfig(seed=seed, steps=steps, sampler=sampler, every=1, resamples=resamples, **text)
    return run_journey(att, cfg, progress, cache, sampler_model=sampler_model).features.mean(0)


def require_trajectories(targets, method_title: str = "Journey TRAK") -> None:
    """One-line ConfigError unless every target is a generated image with a known seed (and so a trajectory)."""
    gen = getattr(targets, "generated", None) or [None] * len(targets)
    for name, g in zip(targets.names, gen):
        if g is None:
            raise ConfigError(f"{method_title} needs a generated target with a sampling trajectory (gen:SEED); "
                              f"{name} has none: use another method, or the journey command (--image) to attribute "
                              "it by noising it forward")


def trajectory_features(att, targets, progress: Progress | None = None, cache: str | None = None,
                        sampler_model=None) -> np.ndarray:
    """Journey-TRAK baseline features of generated targets, (M, k): the trajectories `sampler_model` (default
    `att.model`) samples, with `att`'s gradients."""
    require_trajectories(targets)
    return np.stack([baseline_features(att, g.seed, g.steps, g.sampler, progress=progress, cache=cache,
                                       sampler_model=sampler_model, prompt=g.prompt)
                     for g in targets.generated]).astype(np.float32)
