"""Counterfactual evaluation (D-TRAK paper, section 4.4, Figures 3-4): remove the training images a method ranks as
the strongest proponents of a generated image, retrain with the same recipe and seed, regenerate the image from the
same seed (same sampler, same noise) and measure how much it changed.

    source = source_from_bank("digits")                     # or source_from_checkpoint("runs/x")
    spec = StudySpec(targets=(0, 1, 2), methods=("random", "dtrak"), removals=(0.05,))
    folder = run_study(source, spec, progress=...)          # retrains on Ray; resumable; a rerun is instant
    study = Study.load(folder)                              # cells, before/after images (counterfactual_stats)

A *cell* is one (target, method, direction, K, retraining seed): the K training images removed (the top proponents,
or with `opponents` the top opponents, or for "random" K images drawn by the generator (target seed, K)), the model
retrained on the rest, the target regenerated and compared with the original (`image_metrics`: pixel L2, SSIM, CLIP
cosine when weights are given). Retrained models are keyed by (recipe key, hash of the kept indices, seed)
(`store.retrain_dir`, the same folders a ground-truth bank uses): a removal set that two methods, two studies or a
bank share is trained once. Retraining seeds are the model's own seed, then seed + 1, ...: the second seed retrains
the same removal again, so the change a seed alone makes is measured beside the change the removal makes.
`controls` adds the unchanged training set retrained at each seed: at the model's own seed it must regenerate the
original image bit for bit (the retraining is the same procedure as the original training), at the next seed it
shows the retraining-seed noise of an unchanged training set.

Retrains use `randomness` (train.py; `crn-slots` by default: the paper's protocol with common random numbers in
the full run's batches, so that a removal changes only which images are present). The "before" model must be
trained the same way as the removals:
when the source's model was trained with the other randomness (a stream bank or run), the source's recipe is
retrained on the full split at its seed with the asked randomness, once (the cache folder a bank of that recipe
shares), and that model is the one attributed, regenerated and compared with.

On disk (a bank's studies in `banks/<name>/counterfactual/`, a checkpoint's in the cache, `store.counterfactual_dir`):

    study.json                      identity (model, recipe, sampler, feature options) and what was asked for
    before/gen-S.npz                the original 8-bit image of seed S
    scores/<method>.npz             seeds (T,) and scores (T, N) float32 of each target against the training set
    cells/<cell>.npz                removed indices (in rank order) and the regenerated 8-bit image
    cells/<cell>.json               its metrics and provenance (written last: the cell's completion marker)

Everything is written atomically; a killed run keeps every finished model and cell and a rerun resumes there.
"""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from ..data import load_dataset
from ..data.images import tensor_to_pixels
from ..engine import open_attribution
from ..errors import AttributionError, ConfigError, one_line
from ..features.embeddings import ClipEmbedder
from ..fileio import read_json, read_npz, save_npz, write_json
from ..methods import METHODS, parse_method_entry
from ..options import fields_of, opt
from ..run_options import FEATURE_DEFAULTS, FEATURE_OPTIONS, RunOptions, comparison_options
from ..models import SCHEDULES, load_model
from ..models.checkpoint import resolve_checkpoint
from ..sampling import SAMPLERS, sample
from ..store import counterfactual_dir, identity_differences, identity_hash, load_arrays
from ..targets import Generated, Targets
from ..train import DRAWS
from .bank import Bank, retrain_job, train_task
from .image_metrics import clip_cosines, pixel_l2, ssim, to_tensor
from .ray_engine import (
    ProgressMeter,
    RayCluster,
    hardware,
    probe_address,
    single_thread,
)
from .recipes import Recipe, recipe_from_run

RANDOM = "random"
CONTROL = "none"
DIRECTIONS = ("proponents", "opponents")
RANDOM_TAG = 20231  # the random removals' generator is (RANDOM_TAG, target seed, K)


# -- what to study -------------------------------------------------------------------------------------------------

def parse_targets(spec: str) -> tuple[int, ...]:
    """`gen:0-9`, `gen:3`, or several comma-separated: the seeds of generated targets. Anything else (a dataset
    image, an upload) has no seed to regenerate from: one ConfigError line."""
    seeds: list[int] = []
    for part in [p.strip() for p in str(spec).split(",") if p.strip()]:
        m = re.fullmatch(r"gen:(\d+)(?:-(\d+))?", part)
        if not m:
            raise ConfigError(f"target {part!r} cannot be regenerated: only generated targets (gen:SEED or gen:A-B) "
                              "have a seed to regenerate from after retraining; uploads and dataset images do not")
        first, last = int(m.group(1)), int(m.group(2) or m.group(1))
        if last < first:
            raise ConfigError(f"target {part!r}: the seed range must go upwards (gen:A-B with A <= B)")
        seeds += range(first, last + 1)
    if not seeds:
        raise ConfigError("give at least one target, e.g. --targets gen:0-9")
    return tuple(dict.fromkeys(seeds))


def parse_removals(text: str) -> tuple[float, ...]:
    """`100` (a count), `0.05` (a fraction of the training set), or a comma-separated grid of either."""
    out = []
    for part in [p.strip() for p in str(text).split(",") if p.strip()]:
        try:
            out.append(float(part))
        except ValueError:
            raise ConfigError(f"--remove {part!r} is neither a count (e.g. 100) nor a fraction (e.g. 0.05)") from None
    if not out:
        raise ConfigError("give a removal size, e.g. --remove 0.05 or --remove 100")
    return tuple(out)


def removal_count(value: float, n: int) -> int:
    """K images of N: a fraction in (0, 1) is rounded to a count; a count must be a whole number; 1 <= K < N."""
    if not np.isfinite(value) or value <= 0:
        raise ConfigError(f"--remove {value:g}: remove at least one image (a count >= 1 or a fraction in (0, 1))")
    if value < 1:
        k = int(round(value * n))
        what = f"{value:g} of the {n} training images is {k}"
    else:
        if value != int(value):
            raise ConfigError(f"--remove {value:g}: a count must be a whole number (a fraction must be below 1)")
        k = int(value)
        what = f"{k}"
    if not 1 <= k < n:
        raise ConfigError(f"--remove {what}: K must be at least 1 and below the training set size {n} (the "
                          "retrained model needs at least one image)")
    return k


def parse_methods(text: str) -> tuple[str, ...]:
    """`random,trak,dtrak:avg` -> the entries, each once, in order."""
    return tuple(dict.fromkeys(m.strip() for m in text.split(",") if m.strip()))


@dataclass(frozen=True)
class StudySpec:
    """What to compute (validated; bad values raise one ConfigError line). The fields with help are the
    `counterfactual` command's options (options.py: argparse from the schema)."""

    targets: tuple[int, ...] = field(default=tuple(range(10)), metadata=opt(
        "generated targets: gen:0-9, gen:3, gen:1,gen:7 (default gen:0-9); only generated images can be regenerated",
        parse=parse_targets, metavar="gen:SEEDS", label="Targets"))
    methods: tuple[str, ...] = field(default=(RANDOM, "trak", "dtrak"), metadata=opt(
        "comma-separated: random (K random images) and any method, METHOD:FN for an output function, e.g. "
        "dtrak:avg (default random,trak,dtrak)", parse=parse_methods, metavar="M1,M2,..", label="Methods"))
    removals: tuple[float, ...] = field(default=(0.05,), metadata=opt(
        "K: a count (100) or a fraction of the training set (0.05); several for a dose-response, e.g. 0.05,0.1,0.2 "
        "(default 0.05)", parse=parse_removals, flag="--remove", metavar="K[,K..]", label="Removal sizes"))
    opponents: bool = field(default=False, metadata=opt("also remove the top opponents (the reverse test)",
                                                        label="Also remove opponents"))
    seeds: int = field(default=1, metadata=opt(
        "retraining seeds per removal: the model's own, then the next ones (2 measures the retraining-seed noise)",
        label="Retraining seeds"))
    controls: bool = field(default=False, metadata=opt(
        "also retrain the unchanged training set at each seed (at the model's seed it must reproduce the original)",
        label="Controls"))
    steps: int = field(default=50, metadata=opt("sampling steps (a bank's study: the bank's own unless given)",
                                                  label="Steps"))
    sampler: str | None = field(default=None, metadata=opt(
        "the sampler that regenerates the targets (default: the model's, ddpm, or euler for a flow-matching model)",
        choices=SAMPLERS, label="Sampler", noun="sampler"))
    # The methods' feature options (RunOptions fields: timesteps, proj_dim, projector, seed, fn, noises, ..., and
    # clip_weights / clip_model, which also add the CLIP measure), those given: each method takes those of its kind.
    features: dict = field(default_factory=dict)
    randomness: str = field(default="crn-slots", metadata=opt(
        "of every retrain: crn-slots (common random numbers in the full run's batches: a removal changes only which "
        "images are present), crn (re-batched) or stream; a model trained the other way is first retrained on the "
        "full split at its seed to be the 'before'", choices=lambda: tuple(sorted(DRAWS)), label="Randomness",
        noun="--randomness"))

    def __post_init__(self):
        if self.randomness not in DRAWS:
            raise ConfigError(f"--randomness must be one of {', '.join(sorted(DRAWS))}, got {self.randomness!r}")

        if not self.targets:
            raise ConfigError("give at least one target, e.g. --targets gen:0-9")
        if any(int(t) < 0 for t in self.targets):
            raise ConfigError("target seeds must be >= 0")
        if not self.methods:
            raise ConfigError("give at least one method, e.g. --methods random,dtrak")
        for m in self.methods:
            if m != RANDOM and m.partition(":")[0] not in METHODS:
                raise ConfigError(f"unknown method {m!r}; use random or one of: {', '.join(METHODS)} (METHOD:FN "
                                  "for an output function, e.g. dtrak:avg)")
            if m != RANDOM:
                parse_method_entry(m)  # an output function the method does not have: one line
        if not self.removals:
            raise ConfigError("give a removal size, e.g. --remove 0.05")
        for r in self.removals:
            removal_count(r, 10 ** 9)  # the sign and form; the size is checked against the training set later
        if not 1 <= self.seeds <= 8:
            raise ConfigError(f"--seeds must be within 1..8 (retraining seeds per removal), got {self.seeds}")
        if self.sampler is not None and self.sampler not in SAMPLERS:
            raise ConfigError(f"unknown sampler {self.sampler!r}; use one of: {', '.join(SAMPLERS)}")
        if not 1 <= self.steps <= 1000:
            raise ConfigError(f"--steps must be within 1..1000, got {self.steps}")
        unknown = set(self.features) - set(FEATURE_OPTIONS)
        if unknown:
            raise ConfigError(f"not a feature option of a study: {', '.join(sorted(unknown))}")
        self.method_options()  # each method's options, by the schema: one line for a bad or unusable one

    @property
    def directions(self) -> tuple[str, ...]:
        return DIRECTIONS if self.opponents else DIRECTIONS[:1]

    def method_options(self) -> dict[str, RunOptions]:
        """The options of each method of the study (`run_options.comparison_options`)."""
        return comparison_options([m for m in self.methods if m != RANDOM], exempt=("clip_weights", "clip_model"),
                                  **self.features)

    @property
    def clip_weights(self) -> str | None:
        """The CLIP weights file of the CLIP measure (and of clip-dot / clip-cos), if given."""
        return self.features.get("clip_weights")

    @property
    def clip_model(self) -> str:
        return self.features.get("clip_model", FEATURE_DEFAULTS.clip_model)

    def feature_options(self) -> dict:
        """The feature options in the study's identity: K, k, the projector and the seed always (as studies made
        before the other options were offered recorded them), then any other option given except the CLIP weights
        and model (the CLIP measure can be added to a study's finished cells)."""
        base = {"timesteps": FEATURE_DEFAULTS.timesteps, "proj_dim": FEATURE_DEFAULTS.proj_dim, "projector": "auto",
                "seed": 0}
        return {**base, **{k: v for k, v in self.features.items()
                           if v is not None and k not in ("clip_weights", "clip_model")}}


@dataclass(frozen=True)
class Source:
    """The model a study attributes and how to retrain it: its recipe, its own training seed, its training data."""

    model_spec: str
    model_hash: str
    recipe: Recipe
    seed: int
    label: str  # what the CLI names it with: "--bank digits" or "--checkpoint PATH"
    studies_root: Path | None = None  # a bank's own counterfactual/ folder; None: the cache

    def resolve(self, spec: StudySpec) -> StudySpec:
        """`spec` with the sampler of this model's schedule where none is given (one line for another's)."""
        schedule = SCHEDULES[self.recipe.schedule]
        if spec.sampler is None:
            return replace(spec, sampler=schedule.samplers[0])
        schedule.check_sampler(spec.sampler)
        return spec

    def identity(self, spec: StudySpec, dataset_hash: str) -> dict:
        spec = self.resolve(spec)
        return {"model": self.model_hash, "recipe": self.recipe.identity(),
                "recipe_key": self.recipe.key(dataset_hash), "dataset_hash": dataset_hash, "seed": self.seed,
                "steps": spec.steps, "sampler": spec.sampler, "features": spec.feature_options()}


def source_from_bank(name_or_path: str) -> Source:
    """A bank's model and recipe (the model was trained by the recipe on the full split at the bank's seed)."""

    bank = Bank.load(name_or_path)
    meta = bank.meta
    if not isinstance(meta.get("identity", {}).get("recipe"), dict):
        raise ConfigError(f"bank {meta.get('name', name_or_path)} does not record the recipe its model was trained "
                          "with, so its removals cannot be retrained; use --checkpoint RUN_FOLDER")
    recipe = Recipe(name=meta.get("recipe_name", "bank"), **meta["identity"]["recipe"])
    model = meta.get("model", {})
    return Source(bank.model_spec, model.get("content_hash") or _weights_hash(bank.model_spec), recipe,
                  int(model.get("seed", 0) or 0), f"--bank {meta['name']}", bank.path / "counterfactual")


def source_from_checkpoint(spec: str) -> Source:
    """A training run's final checkpoint and the recipe and seed in its run.json."""

    info = resolve_checkpoint(spec)
    if info.run_dir is None or not (info.run_dir / "run.json").is_file():
        raise ConfigError(f"{spec} is not a training run folder (no run.json names its recipe and seed); give a "
                          "folder made by `python -m attribution train`, or --bank NAME")
    recipe = recipe_from_run(info.run_dir)
    if info.epoch != recipe.epochs:
        raise ConfigError(f"{info.spec} is not the run's final checkpoint (epoch-{recipe.epochs}); a retrain "
                          "reproduces the final one, so give the run folder itself")
    seed = int(read_json(info.run_dir / "run.json")["config"].get("seed", 0))
    return Source(str(info.run_dir), info.content_hash(), recipe, seed, f"--checkpoint {spec}")


def study_source(source: Source, randomness: str, n: int, dataset_hash: str, cache: str | None = None,
                 log=print) -> Source:
    """The source whose model is the study's "before": `source` itself when its model was trained with
    `randomness`, else its recipe retrained with `randomness` on the full split at its seed (in this process, once:
    the cache folder a bank of that recipe shares)."""
    if source.recipe.randomness == randomness:
        return source
    recipe = replace(source.recipe, randomness=randomness)
    job = retrain_job(recipe, recipe.key(dataset_hash), None, n, source.seed, "full split (the study's before)",
                      cache)
    if not (Path(job["run_dir"]) / "retrain.json").is_file():
        log(f"{source.label}'s model was trained with {source.recipe.randomness} randomness: retraining its recipe "
            f"{recipe.name} with {randomness} on the full split at seed {source.seed} as the study's 'before' model "
            "(once; the removals are retrained the same way)")
    threads = torch.get_num_threads()
    try:
        train_task(job)  # one thread, like every retrain on Ray: the same bits as a bank's full model
    finally:
        torch.set_num_threads(threads)
    return Source(job["run_dir"], _weights_hash(job["run_dir"]), recipe, source.seed, source.label,
                  source.studies_root)


def _weights_hash(model_spec: str) -> str:

    return resolve_checkpoint(model_spec).content_hash()


def study_folder(source: Source, spec: StudySpec, dataset_hash: str, cache: str | None = None) -> Path:

    spec = source.resolve(spec)
    identity = source.identity(spec, dataset_hash)
    slug = f"{source.recipe.name}-{spec.sampler}{spec.steps}" + ("" if source.recipe.randomness == "stream"
                                                                  else f"-{source.recipe.randomness}")
    if source.studies_root is not None:
        return source.studies_root / f"{slug.replace(':', '_')}-{identity_hash(identity)}"
    return counterfactual_dir(source.model_hash, slug, identity, cache)


# -- cells ---------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Cell:
    target: int
    method: str  # a registered method, "random", or "none" (a control: nothing removed)
    direction: str  # "proponents", "opponents" or "control"
    k: int
    seed: int

    @property
    def name(self) -> str:
        return f"gen-{self.target}__{file_label(self.method)}__{self.direction}__k{self.k}__seed-{self.seed}"

    @classmethod
    def parse(cls, name: str) -> "Cell":
        m = re.fullmatch(r"gen-(\d+)__(.+)__(proponents|opponents|control)__k(\d+)__seed-(\d+)", name)
        if not m:
            raise ValueError(name)
        return cls(int(m.group(1)), m.group(2), m.group(3), int(m.group(4)), int(m.group(5)))


def file_label(method: str) -> str:
    """A method entry as it appears in file names ("dtrak:avg" -> "dtrak-avg": no colons, which some file systems
    refuse)."""
    return method.replace(":", "-")


def removed_indices(cell: Cell, n: int, scores: np.ndarray | None) -> np.ndarray:
    """The removed training indices of a cell, in rank order (strongest first; ties by index)."""
    if cell.method == CONTROL:
        return np.zeros(0, dtype=np.int64)
    if cell.method == RANDOM:
        return np.random.default_rng([RANDOM_TAG, cell.target, cell.k]).choice(n, cell.k, replace=False)
    order = np.argsort(-scores if cell.direction == "proponents" else scores, kind="stable")
    return order[:cell.k].astype(np.int64)


def emptied_classes(removed: np.ndarray, labels: np.ndarray, names: list[str]) -> list[str]:
    """Classes of the training set that a removal leaves without a single image."""
    labels = np.asarray(labels)
    keep = np.ones(len(labels), dtype=bool)
    keep[removed] = False
    present = set(np.unique(labels[labels >= 0]).tolist())
    left = set(np.unique(labels[keep & (labels >= 0)]).tolist())
    return [names[c] if 0 <= c < len(names) else str(c) for c in sorted(present - left)]


def regenerate(model, seeds, steps: int, sampler: str) -> np.ndarray:
    """uint8 (len(seeds), H, W, C): each seed's image sampled alone on one torch thread, as 8-bit pixels (the same
    call for the original and every retrained model, so an unchanged model gives the same bits)."""

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return np.stack([tensor_to_pixels(torch.from_numpy(sample(model, 1, int(s), steps, sampler).final))[0]
                         for s in seeds])
    finally:
        torch.set_num_threads(threads)


def retrain_generate_task(job: dict, seeds: list[int], steps: int, sampler: str) -> dict:
    """Ray task: train the model of one removal set (unless its completion marker exists), then regenerate the
    targets that need it. Returns the train record, the images and whether it trained now."""

    if job["device"] == "cpu":
        single_thread()
    trained_now = not (Path(job["run_dir"]) / "retrain.json").is_file()
    record = train_task(job)
    model = load_model(job["run_dir"], "cpu")
    start = time.time()
    pixels = regenerate(model, seeds, steps, sampler)
    return {"record": record, "pixels": pixels, "trained_now": trained_now, "model_hash": model.identity(),
            "generate_seconds": round(time.time() - start, 1), "hardware": hardware(job["device"])}


# -- running -------------------------------------------------------------------------------------------------------

@dataclass
class RunReport:
    folder: Path
    cells_total: int
    cells_done_before: int
    models_trained: int
    models_reused: int
    warnings: list[str] = field(default_factory=list)
    seconds: float = 0.0


def run_study(source: Source, spec: StudySpec, folder: str | Path | None = None, address: str | None = None,
              num_cpus: int | None = None, progress=None, log=print, cache: str | None = None,
              cluster: RayCluster | None = None) -> RunReport:
    """Compute every missing cell of `spec` (see the module docstring); return what was done."""

    spec = source.resolve(spec)
    start = time.time()
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address and cluster is None:
        probe_address(address)  # before anything is computed or written
    data = load_dataset(source.recipe.dataset, "train", source.recipe.resolution)
    n, dataset_hash = len(data), data.content_hash
    counts = sorted({removal_count(r, n) for r in spec.removals})
    if folder and (Path(folder) / "study.json").is_file():  # resuming: refused before any retraining
        had = read_json(Path(folder) / "study.json").get("randomness", "stream")
        if had != spec.randomness:
            raise ConfigError(f"{folder} holds a study retrained with {had} randomness; resume it with --randomness "
                              f"{had}, or give another --out for a {spec.randomness} study")
    embedder = None
    if spec.clip_weights:

        embedder = ClipEmbedder.from_file(spec.clip_weights, spec.clip_model)  # one line when missing
    methods = [m for m in spec.methods if m != RANDOM]
    if source.recipe.randomness != spec.randomness:
        _open_attributions(source, spec, methods, cache)  # bad method options: one line before retraining
    source = study_source(source, spec.randomness, n, dataset_hash, cache, log)
    recipe = source.recipe
    identity = source.identity(spec, dataset_hash)
    folder = Path(folder) if folder else study_folder(source, spec, dataset_hash, cache)
    meta_path = folder / "study.json"
    meta = read_json(meta_path) if meta_path.is_file() else {}
    if meta and meta.get("identity") != identity:
        raise ConfigError(f"{folder} holds a study made another way "
                          f"({'; '.join(identity_differences(meta.get('identity', {}), identity)[:3])}); use another "
                          "--out or delete it")
    attributions = _open_attributions(source, spec, methods, cache)  # validates (weights, options) first
    model = load_model(source.model_spec, "cpu")

    # the original images
    before = {}
    for s in spec.targets:
        path = folder / "before" / f"gen-{s}.npz"
        stored = load_arrays(path)  # a damaged file is regenerated and saved over
        if stored is not None and "pixels" in stored:
            before[s] = stored["pixels"]
        else:
            before[s] = regenerate(model, [s], spec.steps, spec.sampler)[0]
            save_npz(path, pixels=before[s], seed=np.array(s))
    # every method's scores of every target (cached per method)
    scores = {m: _method_scores(folder, m, attributions[m], spec, before, progress, log) for m in methods}

    cells = [Cell(t, m, d, k, source.seed + i) for t in spec.targets for m in spec.methods for d in spec.directions
             for k in counts for i in range(spec.seeds)]
    if spec.controls:
        cells += [Cell(t, CONTROL, "control", 0, source.seed + i) for t in spec.targets for i in range(spec.seeds)]
    key = recipe.key(dataset_hash)
    warnings: list[str] = []
    groups: dict[str, dict] = {}
    done_before = 0
    for cell in cells:
        if (folder / "cells" / f"{cell.name}.json").is_file():
            done_before += 1
            continue
        removed = removed_indices(cell, n, scores[cell.method][spec.targets.index(cell.target)]
                                  if cell.method in scores else None)
        empty = emptied_classes(removed, data.labels, list(getattr(data, "class_names", []) or []))
        if empty:
            warnings.append(f"warning: {cell.method} removing {cell.k} images for gen:{cell.target} leaves no "
                            f"image of class {', '.join(empty)}")
        kept = [int(i) for i in np.setdiff1d(np.arange(n), removed)]
        job = retrain_job(recipe, key, kept, n, cell.seed, f"counterfactual {cell.method} k={cell.k}", cache)
        g = groups.setdefault(job["run_dir"], {"job": job, "cells": [], "removed": {}})
        g["cells"].append(cell)
        g["removed"][cell] = removed
    for w in dict.fromkeys(warnings):
        log(w)
    trained = reused = 0
    log(f"counterfactual study: {len(spec.targets)} targets x {len(spec.methods)} methods x "
        f"{len(spec.directions)} direction(s) x K in {counts} x {spec.seeds} seed(s) of {recipe.name} "
        f"({source.label}); {done_before} of {len(cells)} cells done, {len(groups)} models to train or reuse -> "
        f"{folder}")
    write_json(meta_path, {**meta, "identity": identity, "source": source.label, "recipe_name": recipe.name,
                           "randomness": recipe.randomness, "n_train": n, "dataset": recipe.dataset,
                           "asked": {**asdict(spec), "counts": counts}, "status": "running"})
    failures: list[str] = []
    if groups:
        import ray  # lazy: importing Ray takes seconds; only a running cluster needs it

        with contextlib.nullcontext(cluster) if cluster else RayCluster(address, num_cpus) as cl:
            log(f"running on {cl.describe()}")
            device = "cuda" if cl.uses_gpu() else "cpu"
            remote = ray.remote(retrain_generate_task).options(**cl.task_options())
            in_flight = {}
            for g in groups.values():
                g["job"]["device"] = device
                seeds = sorted({c.target for c in g["cells"]})
                in_flight[remote.remote(g["job"], seeds, spec.steps, spec.sampler)] = (g, seeds)
            meter = ProgressMeter(len(in_flight), progress, "models")
            while in_flight:
                ready, _ = ray.wait(list(in_flight), num_returns=1)
                g, seeds = in_flight.pop(ready[0])
                try:
                    result = ray.get(ready[0])
                except Exception as exc:  # retries exhausted: report, keep the rest going
                    failures.append(f"{g['job']['subset']}: {one_line(exc)}")
                    meter.step(note="FAILED")
                    continue
                trained += result["trained_now"]
                reused += not result["trained_now"]
                for cell in g["cells"]:
                    after = result["pixels"][seeds.index(cell.target)]
                    _write_cell(folder, cell, g["removed"][cell], after, before[cell.target], result, g["job"])
                note = (f"trained in {result['record'].get('train_seconds')}s" if result["trained_now"]
                        else "reused a trained model")
                meter.step(note=note)
    if embedder is not None:
        _add_clip(folder, embedder, before)
    status = "complete" if not failures else "partial"
    write_json(meta_path, {**read_json(meta_path), "status": status, "warnings": list(dict.fromkeys(warnings)),
                           "seconds": round(read_json(meta_path).get("seconds", 0) + time.time() - start, 1)})
    if failures:
        raise ConfigError(f"{len(failures)} retrain(s) failed after retries, e.g. {failures[0]}; rerun to retry "
                          "them (finished cells are kept)")
    return RunReport(folder, len(cells), done_before, trained, reused, list(dict.fromkeys(warnings)),
                     round(time.time() - start, 1))


def _open_attributions(source: Source, spec: StudySpec, methods: list[str], cache: str | None) -> dict:

    chosen = spec.method_options()
    return {m: open_attribution(replace(chosen[m], checkpoint=source.model_spec, device="cpu",
                                        dataset=source.recipe.dataset, cache=cache)) for m in methods}


def _method_scores(folder: Path, method: str, attribution, spec: StudySpec, before: dict, progress, log,
                   ) -> np.ndarray:
    """(T, N) float32 scores of the study's targets (in spec.targets order), cached in scores/<method>.npz."""

    path = folder / "scores" / f"{file_label(method)}.npz"
    have: dict[int, np.ndarray] = {}
    stored = load_arrays(path)  # a damaged file is rescored and saved over
    if stored is not None and {"seeds", "scores"} <= stored.keys():
        have = {int(s): row for s, row in zip(stored["seeds"], stored["scores"])}
    missing = [s for s in spec.targets if s not in have]
    if missing:
        log(f"{method}: scoring {len(missing)} target(s) (training features cached after the first run)")
        targets = Targets(to_tensor(np.stack([before[s] for s in missing])), [f"gen/{s}" for s in missing],
                          [f"gen:{s}" for s in missing], [None] * len(missing),
                          generated=[Generated(s, spec.steps, spec.sampler) for s in missing])
        new = attribution.run(targets, progress=(lambda member: progress) if progress else None).scores
        new = new.astype(np.float32)
        have.update({s: row for s, row in zip(missing, new)})
        seeds = sorted(have)
        save_npz(path, seeds=np.array(seeds), scores=np.stack([have[s] for s in seeds]))
    return np.stack([have[s] for s in spec.targets])


def _write_cell(folder: Path, cell: Cell, removed: np.ndarray, after: np.ndarray, before: np.ndarray,
                result: dict, job: dict) -> None:

    save_npz(folder / "cells" / f"{cell.name}.npz", removed=removed.astype(np.int32), after=after)
    record = result["record"]
    write_json(folder / "cells" / f"{cell.name}.json", {
        **asdict(cell), "l2": pixel_l2(before, after), "ssim": ssim(before, after),
        "identical": bool(np.array_equal(before, after)), "index_set_hash": job["index_set_hash"],
        "model_hash": result["model_hash"], "train_seconds": record.get("train_seconds"),
        "generate_seconds": result["generate_seconds"], "hardware": record.get("hardware")})


def _add_clip(folder: Path, embedder, before: dict) -> None:
    """CLIP cosine of every finished cell that lacks it for this embedder."""

    todo = []
    for p in sorted((folder / "cells").glob("*.json")):
        rec = read_json(p)
        if rec.get("clip_identity") != embedder.identity and int(rec["target"]) in before:
            todo.append((p, rec))
    if not todo:
        return
    afters = []
    for p, _ in todo:
        with np.load(p.with_suffix(".npz"), allow_pickle=False) as z:
            afters.append(z["after"])
    cos = clip_cosines(embedder, np.stack([before[int(r["target"])] for _, r in todo]), np.stack(afters))
    for (p, rec), c in zip(todo, cos):
        write_json(p, {**rec, "clip": float(c), "clip_identity": embedder.identity})


# -- reading -------------------------------------------------------------------------------------------------------

@dataclass
class Study:
    """A study on disk: its metadata, finished cells (one dict each) and images."""

    folder: Path
    meta: dict
    cells: list[dict]

    @classmethod
    def load(cls, folder: str | Path) -> "Study":
        folder = Path(folder)
        if not (folder / "study.json").is_file():
            raise ConfigError(f"{folder} is not a counterfactual study (no study.json); run "
                              "`python -m attribution counterfactual` first")
        cells = [read_json(p) for p in sorted((folder / "cells").glob("*.json"))]
        return cls(folder, read_json(folder / "study.json"), cells)

    @property
    def name(self) -> str:
        return f"{self.meta.get('source', '?')} · {self.folder.name}"

    def before(self, target: int) -> np.ndarray:
        return read_npz(self.folder / "before" / f"gen-{target}.npz", ["pixels"],
                        "delete it and rerun the study to regenerate it")["pixels"]

    def cell_arrays(self, cell: dict) -> tuple[np.ndarray, np.ndarray]:
        """(removed indices in rank order, regenerated image) of a cell record."""
        name = Cell(int(cell["target"]), cell["method"], cell["direction"], int(cell["k"]), int(cell["seed"])).name
        z = read_npz(self.folder / "cells" / f"{name}.npz", ["removed", "after"],
                     f"delete cells/{name}.* and rerun the study to remake it (its retrained model is cached)")
        return z["removed"], z["after"]

    def cli_line(self) -> str:
        a = self.meta.get("asked", {})
        seeds = sorted({int(c["target"]) for c in self.cells}) or list(a.get("targets", []))
        targets = f"gen:{seeds[0]}-{seeds[-1]}" if seeds == list(range(seeds[0], seeds[-1] + 1)) else \
            ",".join(f"gen:{s}" for s in seeds)
        methods = ",".join(a.get("methods", []))
        removes = ",".join(f"{r:g}" for r in a.get("removals", []))
        line = f"python -m attribution counterfactual {self.meta.get('source', '')} --targets {targets} " \
               f"--methods {methods} --remove {removes}"
        line += " --opponents" if a.get("opponents") else ""
        line += f" --seeds {a['seeds']}" if a.get("seeds", 1) > 1 else ""
        line += " --controls" if a.get("controls") else ""
        # the feature options given (studies from before they were a dict recorded K, k, projector, feature_seed)
        given = a.get("features", {k: a[old] for k, old in (("timesteps", "timesteps"), ("proj_dim", "proj_dim"),
                                                             ("projector", "projector"), ("seed", "feature_seed"))
                                   if old in a})
        for spec in fields_of(RunOptions):
            value = given.get(spec.name)
            if value is not None and value != spec.default:
                line += f" {spec.flag} {shlex.quote(str(value))}"
        return line + f" --randomness {self.meta.get('randomness', 'stream')}"


def list_studies(roots: list[Path]) -> list[Path]:
    """Study folders under the given roots (a bank's counterfactual/ folder, the cache's counterfactual/): first
    those retrained with common random numbers (only the removal differs between before and after, so they can
    tell methods apart: BENCHMARKS.md), then the others (studies from before CRN say no `randomness`: the stream),
    each group by path. A study.json that cannot be read sorts with the others; loading it gives its one line."""
    out = set()
    for root in roots:
        out |= {p.parent for p in Path(root).glob("**/study.json")}

    def stream(folder: Path) -> bool:
        try:
            return read_json(folder / "study.json").get("randomness", "stream") == "stream"
        except (AttributionError, AttributeError):  # unreadable, or not a JSON object
            return True

    return sorted(out, key=lambda f: (stream(f), f))
