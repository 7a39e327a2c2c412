"""The options of an attribution, defined once: what `engine.open_attribution` and `engine.open_attributor` take.

`RunOptions` is the one schema (see options.py) behind the engine commands' argparse options (featurize, score,
self-influence, journey, influential, norms: `add_run_options`), the values they read back (`from_args`), the
command line a page shows for its result (`RunOptions.command_line`), the app's option widgets (labels, help
and choices from `fields_of(RunOptions)`) and the evaluation's options per method (`RunOptions.for_method`).
Choices come from the registries (methods, output functions, timestep strategies, projectors, checkpoint
weightings); a value outside them, or an option the method cannot use, is refused in one line when the options are
made. Frozen and hashable: the app keys its caches by it. The feature defaults are `FeatureConfig`'s.

    opts = RunOptions("digits", method="trak", timesteps=2, proj_dim=512)
    attribution = open_attribution(opts)            # engine: the Attribution these options define
    print(opts.command_line("score", cfg=attribution.cfg, dataset=attribution.train.spec,
                            extra=[("--target", "gen:1")]))
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from dataclasses import dataclass, field, fields, replace
from typing import Any

from .features.config import FeatureConfig
from .features.curvature import DAMPING_RULES, DEFAULT_SAMPLES
from .features.embeddings import CLIP_HELP
from .features.outputs import OUTPUT_FUNCTIONS
from .features.projectors import PROJECTORS
from .features.timesteps import STRATEGIES
from .methods import CURVATURE_OPTIONS, DEFAULT_METHOD, METHODS, curvature_options, get_method, parse_method_entry
from .methods.over_checkpoints import CHECKPOINT_WEIGHTS
from .errors import ConfigError
from .options import add_arguments, command_line, from_args, not_applicable, opt, validate

FEATURE_DEFAULTS = FeatureConfig()  # each feature option's default, declared once (there)
CHECKPOINT_HELP = ("digits, animals-2, NAME@epoch-N or a folder; several separated by commas = an ensemble "
                   "(checkpoint methods: the run's checkpoints up to the one given, or the list given)")
# What a journey's training features take (the `journey` command's --seed names the generated image; the
# features' seed is its --feature-seed).
JOURNEY_OPTIONS = ("checkpoint", "dataset", "method", "timesteps", "proj_dim", "projector", "cache", "device")
# The options that define a method's features (what a comparison of methods passes to each: lds, estimators, a
# counterfactual study).
FEATURE_OPTIONS = ("fn", "eta", "timesteps", "strategy", "noises", "proj_dim", "projector", "seed", "params",
                   "clip_model", "clip_weights", "damping", "damping_rule", "curvature_samples")
GRADIENT_FIELDS = ("fn", "eta", "timesteps", "strategy", "noises", "proj_dim", "projector", "seed", "params")
# What an option of each kind (`opt(applies=...)`) applies to, for the one-line refusal of one set for another method.
APPLIES_TO = {"gradients": "the gradient methods (a similarity baseline compares images: no gradients)",
              "clip": "clip-dot and clip-cos", "curvature": "the EK-FAC influence methods (ekfac, ekfac-elbo) only",
              "checkpoints": "the checkpoint methods"}


def _method_help() -> str:
    return "; ".join(f"{name}: {cls.summary}" for name, cls in METHODS.items())


@dataclass(frozen=True)
class RunOptions:
    """Everything that defines an attribution: the model and training set, the method and its features (what the
    user picks in the Attribute form and on the command line), and how to compute it (run-only: cache, store,
    batch size, device)."""

    checkpoint: str = field(default="", metadata=opt(CHECKPOINT_HELP, required=True, label="Checkpoint"))
    dataset: str | None = field(default=None, metadata=opt(
        "training set spec (default: the one the checkpoint was trained on)", label="Training set"))
    method: str = field(default=DEFAULT_METHOD, metadata=opt(_method_help(), choices=lambda: tuple(METHODS),
                                                             metavar="METHOD", label="Method"))
    fn: str | None = field(default=None, metadata=opt(
        "output function (D-TRAK only; default: the method's)", choices=OUTPUT_FUNCTIONS, label="Output function",
        noun="output function", applies="gradients"))
    eta: float | None = field(default=None, metadata=opt(
        "Simple/Square interpolation weight in [0, 1] (implies --fn interp)", label="η (interp)", applies="gradients"))
    timesteps: int = field(default=FEATURE_DEFAULTS.timesteps, metadata=opt(
        "K, timesteps averaged over", label="Timesteps K", applies="gradients"))
    strategy: str = field(default=FEATURE_DEFAULTS.strategy, metadata=opt(
        "uniform (0, T/K, ...), cumulative (0..K-1) or training (training images at their training timestep)",
        choices=STRATEGIES, label="Timestep strategy", noun="timestep strategy", applies="gradients"))
    noises: int = field(default=FEATURE_DEFAULTS.noises, metadata=opt(
        "noise draws per timestep", label="Noise draws", applies="gradients"))
    proj_dim: int = field(default=FEATURE_DEFAULTS.proj_dim, metadata=opt(
        "k, the projection dimension", label="Projection k", applies="gradients"))
    projector: str = field(default="auto", metadata=opt(
        "auto: trak-cuda on a GPU with fast_jl, else sjlt", choices=("auto", *PROJECTORS), label="Projector",
        noun="projector", applies="gradients"))
    seed: int = field(default=FEATURE_DEFAULTS.seed, metadata=opt(
        "noise and projection seed", label="Seed", applies="gradients"))
    params: str | None = field(default=None, metadata=opt(
        "take gradients only over parameters with these comma-separated name prefixes", label="Parameters",
        applies="gradients"))
    clip_model: str = field(default=FEATURE_DEFAULTS.clip_model, metadata=opt(
        "open_clip architecture of --clip-weights (the paper's CLIP ViT-B/32)", label="CLIP model", applies="clip"))
    clip_weights: str | None = field(default=None, metadata=opt("clip-dot/clip-cos: " + CLIP_HELP, metavar="FILE",
                                                                label="CLIP weights", applies="clip"))
    damping: float | None = field(default=None, metadata=opt(
        "ekfac, ekfac-elbo: damping as a multiple of the mean EK-FAC eigenvalue (default 0.1)", label="Damping",
        applies="curvature"))
    damping_rule: str | None = field(default=None, metadata=opt(
        "ekfac, ekfac-elbo: global (default: damping x the mean eigenvalue of all tracked layers, one lambda) or "
        "module (damping x each layer's own mean eigenvalue: kronfluence's heuristic)", choices=DAMPING_RULES,
        label="Damping rule", noun="EK-FAC damping rule", applies="curvature"))
    curvature_samples: int | None = field(default=None, metadata=opt(
        f"ekfac, ekfac-elbo: noisy copies per training image for the EK-FAC factors (default {DEFAULT_SAMPLES})",
        label="Curvature copies per image", applies="curvature"))
    checkpoint_weights: str | None = field(default=None, metadata=opt(
        "checkpoint methods: lr (default) weights each checkpoint by the learning rate x epochs since the previous "
        "one, all projected with --seed; uniform is TracInCP/GAS as the D-TRAK paper runs them (appendix A.3): the "
        "mean over the checkpoints, checkpoint c projected with seed + c", choices=tuple(CHECKPOINT_WEIGHTS),
        metavar="lr|uniform", label="Checkpoint weights", noun="--checkpoint-weights", applies="checkpoints"))
    cache: str | None = field(default=None, metadata=opt("cache root (default: cache/ or $ATTRIBUTION_CACHE)",
                                                         run_only=True))
    store: str | None = field(default=None, metadata=opt(
        "use this feature-store folder instead of the automatic one", run_only=True))
    batch_size: int = field(default=16, metadata=opt("training images per gradient batch", run_only=True))
    memory_budget: float | None = field(default=None, metadata=opt(
        "featurize within about this many GiB: fewer images and noisy copies per call as needed (the estimate of "
        "`GradientFeatures.memory_estimate`); refused in one line when one image at a time does not fit",
        metavar="GIB", run_only=True))
    device: str = field(default="auto", metadata=opt("cpu, cuda, mps or auto", run_only=True))

    def __post_init__(self):
        validate(self)
        for spec in not_applicable(self, METHODS[self.method].option_groups()):
            raise ConfigError(f"{spec.flag} applies to {APPLIES_TO[spec.applies]}, not {self.method}")
        curvature_options([self.method], **{k: getattr(self, k) for k in CURVATURE_OPTIONS})

    @classmethod
    def for_method(cls, method: str, **values) -> RunOptions:
        """The options of `method` from values meant for several methods at once (a comparison: the Attribute
        page's second column, `lds --method dtrak,pixel-cos --timesteps 1`): the values of options of a kind the
        method does not use (`applies`) are left out, so they keep their defaults instead of being refused."""
        groups = METHODS[method].option_groups()
        skip = {spec.name for spec in not_applicable(cls, groups, values)}
        return cls(method=method, **{k: v for k, v in values.items() if k not in skip})

    def feature_options(self) -> dict[str, Any]:
        """The options of the method's features (`Method.feature_config`): output function, timesteps, noises,
        projection, seed, parameters, CLIP and EK-FAC options; the projector as given ("auto" is resolved by the
        engine for the model's device)."""
        return {"fn": self.fn, "eta": self.eta, "timesteps": self.timesteps, "strategy": self.strategy,
                "noises": self.noises, "proj_dim": self.proj_dim, "seed": self.seed, "params": self.params,
                "clip_model": self.clip_model, "clip_weights": self.clip_weights,
                **{k: getattr(self, k) for k in CURVATURE_OPTIONS}}

    def command_line(self, command: str, cfg: FeatureConfig | None = None, dataset: str | None = None,
                     extra: Sequence[tuple[str, Any]] = (), only: Sequence[str] | None = None) -> str:
        """`python -m attribution COMMAND ...` with these options (those in `only` if given) then `extra`. With
        the resolved feature configuration `cfg` (what was computed: the method's output function, the projector
        "auto" chose) and the training set's `dataset` spec, the line names what was computed rather than what
        was asked for, and leaves out what does not apply (gradient options for the similarity baselines, η
        outside interp, k for the identity projector, CLIP options outside CLIP)."""
        opts, skip = self, set()
        if dataset is not None:
            opts = replace(opts, dataset=dataset)
        if cfg is not None:
            groups = cfg.featurizer.option_groups
            if "gradients" in groups:
                opts = replace(opts, fn=cfg.fn, eta=cfg.eta if cfg.fn == "interp" else None,
                               strategy=cfg.strategy, projector=cfg.projector)
                if cfg.projector == "identity":
                    skip.add("proj_dim")
            else:
                skip |= set(GRADIENT_FIELDS)
            if "clip" in groups:  # (pixel similarity has no CLIP options to name)
                opts = replace(opts, clip_weights=opts.clip_weights or cfg.clip_weights or "CLIP_WEIGHTS_FILE")
            else:
                skip |= {"clip_model", "clip_weights"}
        if only is not None:
            skip |= {f.name for f in fields(self)} - set(only)
        return command_line(command, [opts], extra, exclude=sorted(skip))


def comparison_options(entries: Sequence[str], exempt: Sequence[str] = (), **values) -> dict[str, RunOptions]:
    """The options of each method of a comparison (`entries`: METHOD or METHOD:FN, e.g. dtrak:avg) from `values`
    (RunOptions fields) meant for all of them, as `lds`, `estimators` and a counterfactual study take them: each
    method keeps those of its kind (`RunOptions.for_method`; the entry's output function wins, and an --fn or --eta
    it cannot take is left out for it). An option that none of them can use is refused in one line before any work
    (unless `exempt`: a study uses --clip-weights for its CLIP measure too), and every value is checked by the
    schema."""
    names = {entry: parse_method_entry(entry) for entry in entries}  # unknown methods or functions: one line
    groups = set().union(*(METHODS[name].option_groups() for name, _ in names.values()))
    for spec in not_applicable(RunOptions, groups, {k: v for k, v in values.items() if k not in exempt}):
        raise ConfigError(f"{spec.flag} applies to {APPLIES_TO[spec.applies]}, none of: "
                          f"{', '.join(entries) or 'no method given'}")
    curvature_options([name for name, _ in names.values()], **{k: values.get(k) for k in CURVATURE_OPTIONS})
    out = {}
    for entry, (name, fn) in names.items():
        choices = get_method(name).fn_choices()
        out[entry] = RunOptions.for_method(name, **{
            **values, "fn": fn or (values.get("fn") if values.get("fn") in choices else None),
            "eta": values.get("eta") if "interp" in choices else None})
    return out


def add_run_options(parser: argparse.ArgumentParser, only: Sequence[str] | None = None) -> None:
    """The argparse options of `RunOptions` (those in `only` if given); values outside their choices are refused
    in one line when `run_options` makes the options, not with argparse's usage message."""
    add_arguments(parser, RunOptions, only=only, argparse_choices=False)


def given_options(args: argparse.Namespace, names: Sequence[str]) -> dict[str, Any]:
    """The RunOptions fields among `names` that the command line set to something other than their default."""
    defaults = {f.name: f.default for f in fields(RunOptions)}
    return {name: getattr(args, name) for name in names if getattr(args, name) != defaults[name]}


def run_options(args: argparse.Namespace, **overrides) -> RunOptions:
    """`RunOptions` from parsed arguments (fields a command does not offer keep their defaults)."""
    return from_args(RunOptions, args, **overrides)
