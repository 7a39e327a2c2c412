"""Checkpoints: naming, loading and saving diffusers `UNet2DModel` DDPMs, safely and offline.

A checkpoint spec is one of:
- a shipped alias: `digits`, `animals-2`, `digits-latent` (the models under `models/` in this repository);
- a training run folder (made by `python -m attribution train`), whose `epoch-NNNN/` subfolders are checkpoints;
- a `DDPMPipeline` folder (`model_index.json`, `unet/`, optional `scheduler/`), e.g. a downloaded
  google/ddpm-cifar10-32;
- a bare `UNet2DModel` folder (`config.json` + `diffusion_pytorch_model.safetensors`).

Any of them may end in `@epoch-N` (an intermediate checkpoint of a run) or `@final` (the last, the default).

Weights are read only from safetensors, or from a PyTorch .bin with `torch.load(weights_only=True)`, so a
checkpoint cannot run code. Nothing is ever downloaded.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from ..errors import CheckpointError
from ..fileio import atomic_dir

REPO_ROOT = Path(__file__).resolve().parents[2]
SHIPPED_DIR = REPO_ROOT / "models"
SHIPPED = {"digits": SHIPPED_DIR / "digits", "animals-2": SHIPPED_DIR / "animals-2",
           # a tiny latent text-to-image model LoRA-finetuned on digits 5-9 (bench/tiny_latent.py)
           "digits-latent": SHIPPED_DIR / "digits-latent"}
WEIGHT_NAMES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
DEFAULT_SCHEDULE = {"num_train_timesteps": 1000, "beta_start": 1e-4, "beta_end": 0.02,
                    "beta_schedule": "linear", "prediction_type": "epsilon"}
# Besides the UNet weights, what a checkpoint's identity covers where present (a latent pipeline's other components,
# a LoRA checkpoint's adapter weights and prompt table); pixel DDPM folders have none, so their hashes are unchanged.
IDENTITY_EXTRAS = ("vae", "text_encoder", "tokenizer", "lora", "prompts.json")
_EPOCH_RE = re.compile(r"^epoch-(\d+)$")


@dataclass
class CheckpointInfo:
    """Where a checkpoint lives and what it is.

    Attributes:
        spec: the spec as the user wrote it (normalised, e.g. "digits@epoch-20").
        unet_dir: folder holding the UNet `config.json` and weights.
        scheduler_config: path of a `scheduler_config.json`, or None (the DDPM default schedule applies).
        run_dir: the training-run folder it belongs to, if any (its `run.json` has the training metadata).
        epoch: the training epoch of a run checkpoint, else None.
        siblings: the specs of all checkpoints of the same run, oldest first.
    """

    spec: str
    unet_dir: Path
    scheduler_config: Path | None
    run_dir: Path | None = None
    epoch: int | None = None
    siblings: list[str] = field(default_factory=list)

    @property
    def weights_path(self) -> Path:
        for name in WEIGHT_NAMES:
            if (self.unet_dir / name).is_file():
                return self.unet_dir / name
        raise CheckpointError(f"{self.unet_dir} has no weights file ({' or '.join(WEIGHT_NAMES)})")

    @property
    def schedule_note(self) -> str:
        if self.scheduler_config is not None:
            return f"noise schedule from {self.scheduler_config}"
        return "no scheduler_config.json found: using the DDPM default (T=1000, linear betas 1e-4..0.02, epsilon)"

    def content_hash(self) -> str:
        """sha256 of the weights file (first 16 hex digits): the checkpoint's identity in cache keys. A folder with
        adapter weights or a prompt table beside the UNet (`IDENTITY_EXTRAS`: a LoRA checkpoint) hashes those too."""
        h = hashlib.sha256()
        weights = self.weights_path  # a property: a new Path at each access, so compare by value below
        extras = sorted(p for name in IDENTITY_EXTRAS for p in
                        ((self.pipeline_dir / name).rglob("*") if (self.pipeline_dir / name).is_dir()
                         else [self.pipeline_dir / name]) if p.is_file())
        for path in [weights, *extras]:
            if path != weights:  # a pixel checkpoint's hash stays the weights file's own sha256
                h.update(path.relative_to(self.pipeline_dir).as_posix().encode())
            with open(path, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    h.update(block)
        return h.hexdigest()[:16]

    def training_timesteps(self) -> np.ndarray | None:
        """The timestep each training image was drawn at in the epoch this checkpoint closed (int64 (N,), in
        training-set order), when the training run recorded it (`training_timesteps.npy` beside `unet/`)."""
        path = self.unet_dir.parent / "training_timesteps.npy"
        return np.load(path, allow_pickle=False).astype(np.int64) if path.is_file() else None

    @property
    def pipeline_dir(self) -> Path:
        """The pipeline folder (holding `model_index.json`, `unet/`, ...), or the bare UNet folder."""
        return self.unet_dir.parent if self.unet_dir.name == "unet" else self.unet_dir

    def pipeline_class(self) -> str | None:
        """The `_class_name` of the folder's `model_index.json` (e.g. "DDPMPipeline"), None without one: what the
        model registry reads to pick an implementation."""
        index = self.pipeline_dir / "model_index.json"
        return _read_config(index).get("_class_name") if index.is_file() else None

    def unet_config(self) -> dict:
        """The UNet's `config.json`."""
        return _read_config(self.unet_dir / "config.json")

    def run_metadata(self) -> dict:
        if self.run_dir and (self.run_dir / "run.json").is_file():
            return json.loads((self.run_dir / "run.json").read_text())
        return {}

    def demo(self) -> Demo:
        """The demo defaults recorded beside the checkpoint (`demo.json` in its run folder, else in its pipeline
        folder); the plain defaults when there is none."""
        for folder in (self.run_dir, self.pipeline_dir):
            if folder is not None and (folder / DEMO_FILE).is_file():
                return Demo.read(folder / DEMO_FILE)
        return Demo()


DEMO_FILE = "demo.json"


@dataclass(frozen=True)
class Demo:
    """What the app starts a model's pages on, recorded by hand in `demo.json` beside a shipped model: a seed whose
    image shows the model well and, for a text-conditional model, a prompt and the guidance scale that make good
    images of it (`note`: how they were chosen)."""

    seed: int = 0
    prompt: str | None = None
    guidance: float | None = None
    note: str = ""

    @classmethod
    def read(cls, path: Path) -> Demo:
        d = _read_config(path)
        unknown = sorted(set(d) - {"seed", "prompt", "guidance", "note"})
        if unknown:
            raise CheckpointError(f"{path} has unknown fields {', '.join(unknown)} (seed, prompt, guidance, note)")
        try:
            demo = cls(int(d.get("seed", 0)), d.get("prompt"),
                       None if d.get("guidance") is None else float(d["guidance"]), str(d.get("note", "")))
        except (TypeError, ValueError):
            raise CheckpointError(f"{path}: seed must be a whole number and guidance a number") from None
        if demo.seed < 0 or (demo.guidance is not None and demo.guidance < 1):
            raise CheckpointError(f"{path}: seed must be at least 0 and guidance at least 1")
        return demo


def _read_config(path: Path) -> dict:
    try:
        cfg = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path} is not valid JSON ({exc})") from None
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{path} is not a JSON object")
    return cfg


def _run_epochs(run_dir: Path) -> list[tuple[int, Path]]:
    eps = []
    for p in run_dir.iterdir() if run_dir.is_dir() else []:
        m = _EPOCH_RE.match(p.name)
        if m and p.is_dir():
            eps.append((int(m.group(1)), p))
    return sorted(eps)


def _pipeline_parts(folder: Path) -> tuple[Path, Path | None]:
    """(unet_dir, scheduler_config or None) for a pipeline folder or a bare UNet folder."""
    if (folder / "unet").is_dir():
        unet_dir = folder / "unet"
        sched = folder / "scheduler" / "scheduler_config.json"
    else:
        unet_dir = folder
        sched = folder / "scheduler_config.json"
        if not sched.is_file():
            sched = folder.parent / "scheduler" / "scheduler_config.json"
    if not (unet_dir / "config.json").is_file():
        raise CheckpointError(f"{folder} is not a diffusers UNet2DModel or DDPMPipeline folder: "
                              f"missing {unet_dir / 'config.json'}")
    if not any((unet_dir / n).is_file() for n in WEIGHT_NAMES):
        raise CheckpointError(f"{unet_dir} has config.json but no weights ({' or '.join(WEIGHT_NAMES)})")
    return unet_dir, sched if sched.is_file() else None


def resolve_checkpoint(spec: str) -> CheckpointInfo:
    """Turn a checkpoint spec into a `CheckpointInfo`; raise `CheckpointError` naming what is missing."""
    spec = str(spec).strip()
    base, _, which = spec.partition("@")
    folder = SHIPPED.get(base, Path(base).expanduser())
    if base in SHIPPED and not folder.is_dir():
        raise CheckpointError(f"the shipped model {base!r} is missing from {folder}; re-clone the repository")
    if not folder.exists():
        raise CheckpointError(f"checkpoint not found: {base!r} is neither a shipped model "
                              f"({', '.join(SHIPPED)}) nor an existing folder")
    if not folder.is_dir():
        raise CheckpointError(f"checkpoint {base!r} is a file; give the folder that holds config.json and the weights")
    epochs = _run_epochs(folder)
    if epochs:
        siblings = [f"{base}@epoch-{e}" for e, _ in epochs]
        if which in ("", "final", "last"):
            epoch, path = epochs[-1]
        else:
            m = re.fullmatch(r"epoch-?(\d+)", which)
            match = [p for e, p in epochs if m and e == int(m.group(1))]
            if not match:
                raise CheckpointError(f"{base} has no checkpoint {which!r}; available: "
                                      f"{', '.join(f'epoch-{e}' for e, _ in epochs)}")
            epoch, path = int(m.group(1)), match[0]
        unet_dir, sched = _pipeline_parts(path)
        return CheckpointInfo(f"{base}@epoch-{epoch}", unet_dir, sched, folder, epoch, siblings)
    if which not in ("", "final", "last"):
        raise CheckpointError(f"{base} is a single checkpoint, not a training run; drop '@{which}'")
    unet_dir, sched = _pipeline_parts(folder)
    return CheckpointInfo(base, unet_dir, sched, None, None, [base])


def _read_weights(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        try:
            return load_file(str(path))
        except Exception as exc:
            raise CheckpointError(f"{path} is not a readable safetensors file ({exc})") from None
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"{path} could not be loaded safely with weights_only=True ({type(exc).__name__}); "
                              "convert it to safetensors") from None


def load_unet(info: CheckpointInfo):
    """Build the `UNet2DModel` from its config and load its weights (eval mode, CPU, float32)."""
    from diffusers import UNet2DModel  # lazy: diffusers takes seconds to import

    try:
        config = json.loads((info.unet_dir / "config.json").read_text())
        unet = UNet2DModel.from_config(config)
    except Exception as exc:
        raise CheckpointError(f"{info.unet_dir / 'config.json'} is not a UNet2DModel config ({exc})") from None
    state = _read_weights(info.weights_path)
    try:
        missing, unexpected = unet.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # tensors whose shapes differ from the config's (strict=False only skips names)
        first = next((ln.strip() for ln in str(exc).splitlines() if "size mismatch" in ln), type(exc).__name__)
        raise CheckpointError(f"weights in {info.weights_path} do not match its config.json ({first})") from None
    if missing or unexpected:
        raise CheckpointError(f"weights in {info.weights_path} do not match its config.json "
                              f"({len(missing)} missing, {len(unexpected)} unexpected tensors, "
                              f"e.g. {(missing or unexpected)[0]})")
    return unet.float().eval()


# Scheduler classes whose config describes the discrete DDPM (variance-preserving) noise process by its betas, the
# process the sampler drives (with diffusers' DDPM and DDIM steps): any of them may name a checkpoint's schedule.
# Others (flow matching, variance-exploding or EDM sigma schedules, consistency models) define another process.
VP_SCHEDULERS = ("DDPMScheduler", "DDIMScheduler", "PNDMScheduler", "LMSDiscreteScheduler", "EulerDiscreteScheduler",
                 "EulerAncestralDiscreteScheduler", "HeunDiscreteScheduler", "KDPM2DiscreteScheduler",
                 "KDPM2AncestralDiscreteScheduler", "DPMSolverMultistepScheduler", "DPMSolverSinglestepScheduler",
                 "DPMSolverSDEScheduler", "UniPCMultistepScheduler", "DEISMultistepScheduler", "DDPMParallelScheduler",
                 "DDIMParallelScheduler", "LCMScheduler", "TCDScheduler", "DDPMWuerstchenScheduler")


def read_scheduler_config(info: CheckpointInfo) -> dict | None:
    """The checkpoint's `scheduler_config.json` as written (None without one); one CheckpointError line when it is
    unreadable or names a scheduler class whose noise process the sampler cannot drive."""
    if info.scheduler_config is None:
        return None
    cfg = _read_config(info.scheduler_config)
    name = cfg.get("_class_name")
    if name is not None and name not in VP_SCHEDULERS:
        raise CheckpointError(f"{info.scheduler_config} names {name}, a noise process this tool cannot sample or "
                              f"attribute; supported are the DDPM-family schedulers ({', '.join(VP_SCHEDULERS[:3])}, "
                              "Euler, DPM-Solver, ...), whose config gives the betas")
    return cfg


def states_prediction_type(info: CheckpointInfo) -> bool:
    """Whether the checkpoint's scheduler config says what the network predicts (`prediction_type`)."""
    cfg = read_scheduler_config(info)
    return cfg is not None and cfg.get("prediction_type") is not None


def load_schedule_config(info: CheckpointInfo) -> dict:
    """The DDPM noise-schedule config: the checkpoint's own when it has one, else `DEFAULT_SCHEDULE`."""
    cfg = read_scheduler_config(info)
    if cfg is None:
        return dict(DEFAULT_SCHEDULE)
    keys = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "prediction_type", "trained_betas",
            "clip_sample", "clip_sample_range", "rescale_betas_zero_snr")
    out = dict(DEFAULT_SCHEDULE)
    out.update({k: cfg[k] for k in keys if k in cfg and cfg[k] is not None})
    return out


def save_checkpoint(target: Path, unet, schedule: dict, extra: dict | None = None) -> None:
    """Write a DDPMPipeline-style folder atomically: model_index.json, unet/, scheduler/, attribution.json."""
    with atomic_dir(target) as tmp:
        (tmp / "unet").mkdir()
        (tmp / "scheduler").mkdir()
        (tmp / "unet" / "config.json").write_text(json.dumps(dict(unet.config), indent=2, default=list) + "\n")
        state = {k: v.detach().cpu().contiguous() for k, v in unet.state_dict().items()}
        save_file(state, str(tmp / "unet" / "diffusion_pytorch_model.safetensors"))
        sched = {"_class_name": "DDPMScheduler", **schedule}
        (tmp / "scheduler" / "scheduler_config.json").write_text(json.dumps(sched, indent=2) + "\n")
        index = {"_class_name": "DDPMPipeline", "unet": ["diffusers", "UNet2DModel"],
                 "scheduler": ["diffusers", "DDPMScheduler"]}
        (tmp / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
        if extra:
            (tmp / "attribution.json").write_text(json.dumps(extra, indent=2, sort_keys=True) + "\n")


def list_shipped() -> list[str]:
    """Every shipped checkpoint spec, final first, then intermediate ones."""
    out = []
    for alias, folder in SHIPPED.items():
        if folder.is_dir():
            out.append(alias)
            out.extend(f"{alias}@epoch-{e}" for e, _ in _run_epochs(folder)[:-1])
    return out
