"""Checkpoints: naming, loading and saving diffusers `UNet2DModel` DDPMs, safely and offline.

A checkpoint spec is one of:
- a shipped alias: `digits`, `animals-2`, `digits-latent`, `digits-flow` (the models under `models/` in this
  repository);
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
           "digits-latent": SHIPPED_DIR / "digits-latent",
           # a rectified-flow (flow-matching) model of the digits, trained by `train --schedule flow-matching`
           "digits-flow": SHIPPED_DIR / "digits-flow"}
WEIGHT_NAMES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
NETWORK_FOLDERS = ("unet", "transformer")  # a pipeline folder's denoising network (UNet or diffusion transformer)
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
        """The pipeline folder (holding `model_index.json`, `unet/` or `transformer/`, ...), or the bare network
        folder."""
        return self.unet_dir.parent if self.unet_dir.name in NETWORK_FOLDERS else self.unet_dir

    def pipeline_class(self) -> str | None:
        """The `_class_name` of the folder's `model_index.json` (e.g. "DDPMPipeline"), None without one: what the
        model registry reads to pick an implementation."""
        index = self.pipeline_dir / "model_index.json"
        return read_config(index).get("_class_name") if index.is_file() else None

    def unet_config(self) -> dict:
        """The UNet's `config.json`."""
        return read_config(self.unet_dir / "config.json")

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
        d = read_config(path)
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


def read_config(path: Path) -> dict:
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
    """(unet_dir, scheduler_config or None) for a pipeline folder (its `unet/` or `transformer/`: the network) or a
    bare network folder."""
    network = next((folder / n for n in NETWORK_FOLDERS if (folder / n).is_dir()), None)
    if network is not None:
        unet_dir = network
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


def load_unet(info: CheckpointInfo, network_class: str = "UNet2DModel"):
    """Build the network (a diffusers `UNet2DModel`, or another diffusers model class named by `network_class`)
    from its config and load its weights (eval mode, CPU, float32)."""
    import diffusers  # lazy: diffusers takes seconds to import

    try:
        config = json.loads((info.unet_dir / "config.json").read_text())
        unet = getattr(diffusers, network_class).from_config(config)
    except Exception as exc:
        raise CheckpointError(f"{info.unet_dir / 'config.json'} is not a {network_class} config ({exc})") from None
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


def save_checkpoint(target: Path, unet, schedule: dict, extra: dict | None = None,
                    scheduler_class: str = "DDPMScheduler", pipeline_class: str = "DDPMPipeline",
                    network_folder: str = "unet", index_extra: dict | None = None,
                    files: dict[str, str] | None = None) -> None:
    """Write a pipeline folder atomically: model_index.json (`pipeline_class`, its components and `index_extra`),
    the network in `network_folder`/ (config + safetensors), scheduler/ (`schedule` as the config of
    `scheduler_class`), attribution.json (`extra`) and any other `files` (name -> text)."""
    with atomic_dir(target) as tmp:
        (tmp / network_folder).mkdir()
        (tmp / "scheduler").mkdir()
        config = {"_class_name": type(unet).__name__, **dict(unet.config)}  # as diffusers writes it
        (tmp / network_folder / "config.json").write_text(json.dumps(config, indent=2, default=list) + "\n")
        state = {k: v.detach().cpu().contiguous() for k, v in unet.state_dict().items()}
        save_file(state, str(tmp / network_folder / "diffusion_pytorch_model.safetensors"))
        sched = {"_class_name": scheduler_class, **schedule}
        (tmp / "scheduler" / "scheduler_config.json").write_text(json.dumps(sched, indent=2) + "\n")
        index = {"_class_name": pipeline_class, network_folder: ["diffusers", type(unet).__name__],
                 "scheduler": ["diffusers", scheduler_class], **(index_extra or {})}
        (tmp / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
        if extra:
            (tmp / "attribution.json").write_text(json.dumps(extra, indent=2, sort_keys=True) + "\n")
        for name, text in (files or {}).items():
            (tmp / name).write_text(text)


def list_shipped() -> list[str]:
    """Every shipped checkpoint spec, final first, then intermediate ones."""
    out = []
    for alias, folder in SHIPPED.items():
        if folder.is_dir():
            out.append(alias)
            out.extend(f"{alias}@epoch-{e}" for e, _ in _run_epochs(folder)[:-1])
    return out
