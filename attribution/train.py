"""Training small diffusion models: the D-TRAK paper's recipe, scaled down for a CPU.

T=1000, linear betas 1e-4..0.02, epsilon prediction, MSE loss, AdamW (weight decay 1e-6), a cosine learning-rate
schedule after a linear warm-up over the first 10% of steps, random horizontal flips where the data allows them.
`schedule="flow-matching"` trains a rectified flow instead (models/schedules.py: x_t = (1 - s) x0 + s eps at T=1000
grid times drawn uniformly, the MSE to the velocity eps - x0), with everything else the same. The model comes from
its class (`for_training`, picked by `models.registry.training_kind`): this loop does not ask which kind it trains.
Unlike the paper (dropout 0.1, 200 epochs at lr 1e-4) the shipped models use no dropout and lr 1e-3 so that they
converge in minutes on two CPU cores.

A run folder holds `run.json` (the config, index-set hash, losses) and one `epoch-N/` checkpoint per saved epoch,
each a DDPMPipeline folder written atomically, plus `training_timesteps.npy`: the timestep each training image
was drawn at during that epoch (used by the timestep analysis). Same seed, same machine -> same weights.

Where the random draws come from (`randomness`, recorded in run.json; a run.json without it is a stream run):

- `stream` (every run made before CRN existed, kept bit for bit): the data order, then each batch's timesteps,
  noises and flips, all from one CPU generator seeded by the run's seed, in the order training consumes them.
  Removing one image re-draws everything after it.
- `crn` (common random numbers, the default of banks and counterfactual studies): each epoch's order is a
  permutation of the *full* training split drawn from (seed, epoch), restricted to the images present and then
  batched; each image's timestep, noise and flip come from its own generator keyed by (seed, epoch, its index in
  the full training split). Two runs on subsets that differ by one image draw the same numbers for every image
  they share; only the batches after the removed image's position are composed differently.
- `crn-slots` (common random numbers with fixed batches): the same draws, but the batches are the full run's: the
  full split's permutation is cut into batches of `batch_size` and each batch keeps the images present, so a run on
  any subset takes the full run's number of steps, with the full run's learning-rate schedule, and an image shares
  its batch with the same images in every run that holds them (a batch with none of them is skipped, the schedule
  moving on). Under `crn` a removal shifts every later batch boundary, which on the digits recipe undoes most of
  the gain for removals beyond a few images (BENCHMARKS.md, "Common random numbers in retraining").

Both seed the initial weights (and a LoRA adapter) from the seed alone.

LoRA finetuning (`train-lora`, D-TRAK's SD-LoRA setting) is the same loop with `pipeline` set: a Stable Diffusion
folder gets a fresh LoRA adapter of rank `rank` (the only trainable weights), every training image is conditioned
on its class through `prompt_template`, images are encoded by the pipeline's VAE, and each checkpoint is a LoRA
checkpoint folder (the base's components linked, `lora/`, `prompts.json`; models/latent_sd.py).
"""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from .data import ImageDataset, load_dataset
from .device import resolve_device
from .errors import ConfigError
from .fileio import reason, save_npy, write_json
from .models.adapter import DiffusionModel
from .models.latent_sd import PromptTable, check_template
from .models.latent_sd import prompt_table as make_prompt_table
from .models.presets import PRESETS
from .models.registry import training_kind
from .models.schedules import SCHEDULES
from .options import opt

Progress = Callable[[int, int, str], None]
FLIP_DEFAULT = {"digits": False, "animals": True, "animals-2": True, "cifar10": True, "cifar2": True}


def parse_flip(text: str) -> bool | None:
    """--flip auto | on | off -> None (the dataset's default) | True | False."""
    values = {"auto": None, "on": True, "off": False}
    if text not in values:
        raise ConfigError(f"--flip takes auto, on or off; got {text!r}")
    return values[text]


def parse_epochs(text: str) -> list[int]:
    """'10,20,40' -> [10, 20, 40] (one line for anything else)."""
    try:
        return [int(e) for e in text.replace(" ", "").split(",") if e]
    except ValueError:
        raise ConfigError(f"--save-epochs takes comma-separated epochs such as 10,20,40; got {text!r}") from None


@dataclass
class TrainConfig:
    """Everything that determines a training run (saved as run.json). The fields with help are the `train` and
    `train-lora` commands' options (options.py: argparse from the schema)."""

    dataset: str = field(default="", metadata=opt(
        "dataset spec, e.g. digits, animals-2, folder:PATH (train-lora: one with classes, e.g. animals:cat,dog)",
        required=True))
    out: str = field(default="", metadata=opt("run folder to write (epoch-N/ checkpoints + run.json)",
                                              required=True))
    epochs: int = field(default=40, metadata=opt("training epochs"))
    seed: int = field(default=0, metadata=opt("seed of the initial weights and of every random draw"))
    batch_size: int = field(default=64, metadata=opt("training images per step"))
    lr: float = field(default=1e-3, metadata=opt("peak learning rate (AdamW, after the warm-up, cosine decay)"))
    warmup_fraction: float = field(default=0.1, metadata=opt("share of the steps the learning rate warms up over"))
    weight_decay: float = field(default=1e-6, metadata=opt("AdamW weight decay"))
    checkpoints: int = field(default=5, metadata=opt("number of evenly spaced saved epochs, the last included"))
    flip: bool | None = field(default=None, metadata=opt(  # None: the dataset's default (no flips for digits)
        "random horizontal flips (auto: on except for digits)", parse=parse_flip, choices=("auto", "on", "off")))
    schedule: str = field(default="ddpm", metadata=opt(
        "noise process of the new model: ddpm (epsilon prediction, T=1000 linear betas) or flow-matching "
        "(rectified flow: velocity prediction on x_t = (1-t) x0 + t eps, T=1000 times)", choices=tuple(SCHEDULES)))
    preset: str = field(default="small", metadata=opt(
        "UNet size: small (0.65M parameters), eval (0.36M, the banks' retraining recipe) or tiny (tests)",
                                                      choices=tuple(PRESETS)))
    resolution: int | None = field(default=None, metadata=opt("model resolution (default: the dataset's)"))
    indices: list[int] | None = None  # train on this subset of the training split (LDS / counterfactuals)
    index_file: str | None = field(default=None, metadata=opt(
        "train only on these training-split indices (a .npy or a text file of integers)", flag="--indices",
        metavar="FILE"))
    device: str = field(default="auto", metadata=opt("cpu, cuda, mps or auto"))
    save_epochs: list[int] = field(default_factory=list, metadata=opt(
        "explicit comma-separated epochs to save instead of --checkpoints", parse=parse_epochs, metavar="E,E,.."))
    pipeline: str | None = field(default=None, metadata=opt(  # LoRA-finetune it instead of training a pixel DDPM
        "a local Stable Diffusion folder (model_index.json, unet/, vae/, text_encoder/, tokenizer/, scheduler/)"))
    rank: int = field(default=4, metadata=opt("LoRA rank (the D-TRAK paper uses 128)"))
    prompt_template: str = field(default="a {class} painting", metadata=opt(
        "each training image's prompt, {class} = its class name"))
    randomness: str = field(default="stream", metadata=opt(  # a run.json without it is a stream run
        "where the data order, timesteps, noises and flips come from: stream (one stream from the seed, as every "
        "run made before CRN; a run.json without the field is one), crn-slots (common random numbers: each image's "
        "draws keyed by seed, epoch and image, in the full split's batches, for runs to be compared with subset "
        "retrains, e.g. a bank's --run) or crn (the same draws, re-batched over the images present)",
        choices=lambda: tuple(sorted(DRAWS))))

    def __post_init__(self):
        if not self.dataset or not self.out:
            raise ConfigError("a training run needs a dataset and an output folder (--dataset, --out)")
        if self.randomness not in DRAWS:
            raise ConfigError(f"--randomness must be one of {', '.join(sorted(DRAWS))}, got {self.randomness!r}")
        if self.epochs < 1:
            raise ConfigError(f"--epochs must be at least 1, got {self.epochs}")
        if self.batch_size < 1:
            raise ConfigError(f"--batch-size must be at least 1, got {self.batch_size}")
        if not self.lr > 0:
            raise ConfigError(f"--lr must be positive, got {self.lr}")
        if not 0 <= self.warmup_fraction < 1:
            raise ConfigError(f"warm-up fraction must be in [0, 1), got {self.warmup_fraction}")
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"--schedule must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}")
        if self.preset not in PRESETS:
            raise ConfigError(f"unknown preset {self.preset!r}; use one of: {', '.join(PRESETS)}")
        if not self.save_epochs:
            n = max(1, min(self.checkpoints, self.epochs))
            self.save_epochs = sorted({round(self.epochs * (i + 1) / n) for i in range(n)})
        if self.pipeline is not None:
            if self.schedule != "ddpm":
                raise ConfigError("a LoRA finetune keeps its pipeline's noise process; drop --schedule")
            if self.rank < 1:
                raise ConfigError(f"--rank must be at least 1, got {self.rank}")
            check_template(self.prompt_template)
        bad = [e for e in self.save_epochs if not 1 <= e <= self.epochs]
        if bad:
            raise ConfigError(f"checkpoint epochs must be within 1..{self.epochs}, got {bad}")


INDEX_FILE = "give a .npy of integers or a text file of whitespace- or comma-separated integers"


def read_index_file(path: str | Path) -> list[int]:
    """Indices into the training split: a .npy of integers or a text file of whitespace/comma-separated integers."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"index file not found: {path}")
    try:
        if path.suffix == ".npy":
            arr = np.load(path, allow_pickle=False)
        else:
            arr = np.array(path.read_text().replace(",", " ").split(), dtype=np.int64)
    except Exception as exc:
        raise ConfigError(f"{path} is not a list of integer indices ({reason(exc)}); {INDEX_FILE}") from None
    if arr.ndim != 1 or not np.issubdtype(arr.dtype, np.integer) or arr.size == 0:
        raise ConfigError(f"{path} must hold a non-empty 1-D list of integer indices; {INDEX_FILE}")
    return [int(i) for i in arr]


def index_hash(indices: list[int] | None, n: int) -> str:
    """sha256 (16 hex) of the sorted index set; the full set when `indices` is None."""
    arr = np.arange(n, dtype=np.int64) if indices is None else np.unique(np.asarray(indices, dtype=np.int64))
    return hashlib.sha256(arr.tobytes()).hexdigest()[:16]


def lr_lambda(total_steps: int, warmup_steps: int) -> Callable[[int], float]:
    def f(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return f


def subset_indices(cfg: TrainConfig, n_all: int) -> np.ndarray:
    """The sorted training-split indices a run trains on (all of them without an index file)."""
    if cfg.indices is None:
        return np.arange(n_all)
    idx = np.asarray(cfg.indices, dtype=np.int64)
    if idx.min() < 0 or idx.max() >= n_all:
        raise ConfigError(f"index file has indices outside 0..{n_all - 1} (the {cfg.dataset} training split)")
    return np.unique(idx)


class StreamDraws:
    """`stream` randomness: one CPU generator seeded by the run's seed, consumed in training order (the data order
    of an epoch, then each batch's timesteps, noises and flips)."""

    def __init__(self, seed: int, idx: np.ndarray, n_all: int):
        self.gen = torch.Generator().manual_seed(seed)
        self.n = len(idx)

    def order(self, epoch: int) -> torch.Tensor:
        """The epoch's order: positions into the run's (sorted) training images."""
        return torch.randperm(self.n, generator=self.gen)

    def steps_per_epoch(self, batch_size: int) -> int:
        return math.ceil(self.n / batch_size)

    def batches(self, epoch: int, batch_size: int) -> list[torch.Tensor]:
        """The epoch's batches: positions into the run's training images (the order, cut into batches)."""
        perm = self.order(epoch)
        return [perm[b * batch_size:(b + 1) * batch_size] for b in range(self.steps_per_epoch(batch_size))]

    def batch(self, epoch: int, rows: torch.Tensor, num_timesteps: int, shape: tuple[int, ...], flip: bool,
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(timesteps, noises, flip mask or None) of the images at these positions."""
        t = torch.randint(0, num_timesteps, (len(rows),), generator=self.gen)
        eps = torch.randn((len(rows), *shape), generator=self.gen)
        mask = torch.rand(len(rows), generator=self.gen) < 0.5 if flip else None
        return t, eps, mask


def crn_generator(seed: int, epoch: int, what: str) -> torch.Generator:
    """A CPU generator keyed by (seed, epoch, what): its 63-bit seed is taken from sha256 of the three."""
    digest = hashlib.sha256(f"crn/{seed}/{epoch}/{what}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)


def crn_order(seed: int, epoch: int, n_all: int) -> torch.Tensor:
    """The epoch's permutation of the full training split (indices 0..n_all-1), drawn from (seed, epoch)."""
    return torch.randperm(n_all, generator=crn_generator(seed, epoch, "order"))


def image_draws(seed: int, epoch: int, image: int, num_timesteps: int, shape: tuple[int, ...], flip: bool,
                ) -> tuple[int, torch.Tensor, bool]:
    """(timestep, noise, flipped) of training image `image` (its index in the full split) in `epoch`: a pure
    function of (seed, epoch, image), whichever other images the run trains on."""
    gen = crn_generator(seed, epoch, f"train/{image}")
    t = int(torch.randint(0, num_timesteps, (1,), generator=gen))
    eps = torch.randn(shape, generator=gen)
    return t, eps, bool(torch.rand(1, generator=gen) < 0.5) if flip else False


class CrnDraws:
    """`crn` randomness (common random numbers): the epoch's order is the full split's permutation restricted to
    the run's images; every image's draws come from `image_draws`."""

    def __init__(self, seed: int, idx: np.ndarray, n_all: int):
        self.seed, self.idx, self.n_all = seed, torch.as_tensor(idx, dtype=torch.long), n_all
        self.n = len(idx)
        self.position = torch.full((n_all,), -1, dtype=torch.long)  # full index -> position in idx (-1: absent)
        self.position[self.idx] = torch.arange(len(idx))

    steps_per_epoch = StreamDraws.steps_per_epoch
    batches = StreamDraws.batches

    def order(self, epoch: int) -> torch.Tensor:
        pos = self.position[crn_order(self.seed, epoch, self.n_all)]
        return pos[pos >= 0]

    def batch(self, epoch: int, rows: torch.Tensor, num_timesteps: int, shape: tuple[int, ...], flip: bool,
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        draws = [image_draws(self.seed, epoch, int(i), num_timesteps, shape, flip) for i in self.idx[rows]]
        t = torch.tensor([d[0] for d in draws], dtype=torch.long)
        eps = torch.stack([d[1] for d in draws])
        return t, eps, torch.tensor([d[2] for d in draws]) if flip else None


class CrnSlotDraws(CrnDraws):
    """`crn-slots` randomness: `crn`'s draws in the full run's batches (the full split's permutation cut into
    batches of `batch_size`), each keeping the run's images; a batch may be smaller, or empty."""

    def steps_per_epoch(self, batch_size: int) -> int:
        return math.ceil(self.n_all / batch_size)

    def batches(self, epoch: int, batch_size: int) -> list[torch.Tensor]:
        full = crn_order(self.seed, epoch, self.n_all)
        slots = [self.position[full[b * batch_size:(b + 1) * batch_size]]
                 for b in range(self.steps_per_epoch(batch_size))]
        return [pos[pos >= 0] for pos in slots]


DRAWS = {"crn": CrnDraws, "crn-slots": CrnSlotDraws, "stream": StreamDraws}  # the values of TrainConfig.randomness


def dataset_loader(dataset: str):
    """`load(split, resolution, channels)` for the model classes' `for_training` (models/ does not read data/)."""
    return lambda split, resolution, channels: load_dataset(dataset, split, resolution, channels)


def prompt_table(dataset: str, template: str, resolution: int, channels: int) -> PromptTable:
    """Every training and validation image's prompt: its class name through `template`."""
    return make_prompt_table(dataset_loader(dataset), dataset, template, resolution, channels)


def _model_and_data(cfg: TrainConfig, device) -> tuple[DiffusionModel, ImageDataset]:
    """The model to train, fresh from its class (seed torch first), and its training split at the model's size."""
    return training_kind(cfg).for_training(cfg, dataset_loader(cfg.dataset), device)


def train(cfg: TrainConfig, progress: Progress | None = None) -> Path:
    """Train a DDPM (or LoRA-finetune a pipeline) as configured; return the run folder."""
    device = resolve_device(cfg.device)
    torch.manual_seed(cfg.seed)
    model, data = _model_and_data(cfg, device)
    n_all = len(data)
    idx = subset_indices(cfg, n_all)
    x_all = data.tensors(idx)  # (N, C, R, R) in [-1, 1]
    n = len(x_all)
    keys = np.array([f"train/{i}" for i in idx])  # each image's key, for the model's per-sample condition
    flip = FLIP_DEFAULT.get(cfg.dataset.split(":")[0], False) if cfg.flip is None else cfg.flip

    draws = DRAWS[cfg.randomness](cfg.seed, idx, n_all)  # data order (batches), timesteps, noises, flips
    steps_per_epoch = draws.steps_per_epoch(cfg.batch_size)
    total = steps_per_epoch * cfg.epochs
    opt = torch.optim.AdamW(model.trainable_parameters().values(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    lr_sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(total, max(1, int(cfg.warmup_fraction * total))))

    out = Path(cfg.out)
    skip = ("indices", "device") + (("pipeline", "rank", "prompt_template") if cfg.pipeline is None else ())
    skip += ("schedule",) if cfg.schedule == "ddpm" else ()  # (DDPM runs' keys as before)
    meta = {"config": {k: v for k, v in asdict(cfg).items() if k not in skip},
            "dataset_hash": data.content_hash, "n_train": n, "index_set_hash": index_hash(cfg.indices, n_all),
            "flip": flip, "resolution": data.resolution, "channels": data.channels,
            "lr_schedule": f"AdamW lr {cfg.lr}, linear warm-up {cfg.warmup_fraction:.0%} then cosine to 0",
            "noise_schedule": model.schedule.config, "epoch_loss": [], "checkpoints": [], "model_kind": model.kind,
            "trained_parameters": sum(p.numel() for p in model.trainable_parameters().values())}
    if cfg.pipeline is None:  # (keys as before for pixel runs)
        meta.pop("model_kind")
        meta.pop("trained_parameters")
    if cfg.indices is not None:
        meta["indices"] = [int(i) for i in idx]
    start = time.time()
    for epoch in range(1, cfg.epochs + 1):
        epoch_t = torch.empty(n, dtype=torch.long)
        losses = []
        for bi in draws.batches(epoch, cfg.batch_size):
            if not len(bi):  # crn-slots: none of this batch's images is in the run; the schedule moves on
                lr_sched.step()
                continue
            x0 = x_all[bi]
            t, eps, mask = draws.batch(epoch, bi, model.num_timesteps, tuple(model.latent_shape), flip)
            if flip:
                x0 = torch.where(mask[:, None, None, None], x0.flip(-1), x0)
            epoch_t[bi] = t
            x0, t, eps = x0.to(device), t.to(device), eps.to(device)
            loss = model.training_loss(x0, eps, t, model.condition(keys[bi.tolist()]))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            lr_sched.step()
            losses.append(loss.item())
        meta["epoch_loss"].append(round(float(np.mean(losses)), 5))
        if progress:
            progress(epoch, cfg.epochs, f"loss {meta['epoch_loss'][-1]:.4f}")
        if epoch in cfg.save_epochs:
            ckpt = out / f"epoch-{epoch}"
            model.save(ckpt, {"epoch": epoch, "step": epoch * steps_per_epoch, "lr": lr_sched.get_last_lr()[0],
                              "seed": cfg.seed})
            save_npy(ckpt / "training_timesteps.npy", epoch_t.numpy().astype(np.int16))
            meta["checkpoints"].append({"epoch": epoch, "step": epoch * steps_per_epoch,
                                        "lr": lr_sched.get_last_lr()[0]})
            meta["train_seconds"] = round(time.time() - start, 1)
            write_json(out / "run.json", meta)
    return out
