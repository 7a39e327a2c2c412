"""MAGIC runs on disk: a deterministic weighted training run, its queries and their cached metagradients.

    cache/magic/<run id>/
      run.json                 kind "magic-weighted-run": dataset, model and training configs, ODE settings
      theta.safetensors        final parameters of the run with all weights 1
      queries/<query id>.npz   query pixels, d bpd / d w (N,), bpd, cost figures (json in `meta`)
      validation/<fraction>-seed<seed>/
        retrain-0000.safetensors  final parameters with removed set 0 weighted 0 (its presence = finished)
        bpd-<query id>.json       bits/dim of a query under each finished retrain (recomputed when sets grow)

The run is reproducible from run.json alone (data order, times and noises come from its seed), which is what
metagradients need: the saved parameters are only a shortcut for the app and for validation.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..data import load_dataset
from ..data.images import open_image
from ..errors import CheckpointError, ConfigError, ImageError
from ..fileio import atomic_path, reason, save_npz, write_json
from ..store import identity_hash, magic_root, magic_run_dir
from .likelihood import bits_per_dim, check_steps, time_grid
from .score_model import ScoreModel, ScoreModelConfig, marginal_std
from .weighted_train import TrainConfig, WeightedRun

KIND = "magic-weighted-run"
HOW_TO_MAKE = "make one with `python -m attribution magic train` (a deterministic run with one weight per example)"


@dataclass(frozen=True)
class OdeConfig:
    steps: int = 16
    solver: str = "rk4"
    eps: float = 1e-3

    def __post_init__(self):
        check_steps(self.steps)
        if self.solver not in ("heun", "rk4"):
            raise ConfigError(f"unknown ODE solver {self.solver!r}; use heun or rk4")
        if not 0 < self.eps < 1:
            raise ConfigError(f"ODE start time eps must be in (0, 1), got {self.eps}")


@dataclass(frozen=True)
class MagicSpec:
    dataset: str = "digits"
    resolution: int = 8
    model: ScoreModelConfig = field(default_factory=ScoreModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    ode: OdeConfig = field(default_factory=OdeConfig)

    def to_dict(self) -> dict:
        return {"kind": KIND, "dataset": self.dataset, "resolution": self.resolution, "model": asdict(self.model),
                "train": asdict(self.train), "ode": asdict(self.ode)}

    @classmethod
    def from_dict(cls, d: dict) -> MagicSpec:
        return cls(d["dataset"], int(d["resolution"]), ScoreModelConfig(**d["model"]), TrainConfig(**d["train"]),
                   OdeConfig(**d["ode"]))

    @property
    def run_id(self) -> str:
        return f"{self.dataset}-{self.resolution}px-{identity_hash(self.to_dict())}"


def load_training_data(dataset: str, resolution: int) -> tuple[torch.Tensor, object]:
    """(flat images in [0, 1] (N, D) float64, the ImageDataset), grayscale at the given resolution."""

    ds = load_dataset(dataset, "train", resolution=resolution, channels=1)
    x = torch.from_numpy(ds.pixels.reshape(len(ds), -1).astype(np.float64) / 255.0)
    return x, ds


class MagicRun:
    """A MAGIC run: its spec, problem (data, model, training recipe) and, once trained, final parameters."""

    def __init__(self, spec: MagicSpec, path: Path | None = None, root=None):
        self.spec = spec
        self.path = Path(path) if path else magic_run_dir(spec.run_id, root)
        self.data, self.dataset = load_training_data(spec.dataset, spec.resolution)
        if spec.model.dim != self.data.shape[1]:
            raise ConfigError(f"model dim {spec.model.dim} does not match {spec.dataset} at "
                              f"{spec.resolution}x{spec.resolution} ({self.data.shape[1]} pixels)")
        self.model = ScoreModel(spec.model)
        self.run = WeightedRun(self.data, self.model, spec.train)

    # -- persistence -----------------------------------------------------------------------------------------

    @property
    def trained(self) -> bool:
        return (self.path / "theta.safetensors").is_file()

    def save(self, theta: torch.Tensor, extra: dict | None = None) -> None:
        save_theta(self.path / "theta.safetensors", theta)
        write_json(self.path / "run.json", {**self.spec.to_dict(), "provenance": extra or {}})

    def theta(self) -> torch.Tensor:
        if not self.trained:
            raise CheckpointError(f"{self.path} has no trained parameters yet; run `python -m attribution magic "
                                  "train` first")
        return load_theta(self.path / "theta.safetensors").to(self.spec.train.torch_dtype)

    def provenance(self) -> dict:
        p = self.path / "run.json"
        return json.loads(p.read_text()).get("provenance", {}) if p.is_file() else {}

    # -- queries ---------------------------------------------------------------------------------------------

    def score_fn(self, theta: torch.Tensor):
        return lambda x, t: self.model.score(theta, x, t)

    def bpd(self, theta: torch.Tensor, x: torch.Tensor, create_graph: bool = False) -> torch.Tensor:
        o = self.spec.ode
        return bits_per_dim(self.score_fn(theta), x.to(theta.dtype), steps=o.steps, solver=o.solver, eps=o.eps,
                            sigma=self.spec.model.sigma, create_graph=create_graph)

    def query_vector(self, pixels: np.ndarray) -> torch.Tensor:
        """uint8 or float pixels of one image -> flat (D,) in [0, 1]; refuse another size or channel count."""
        side, d = self.spec.resolution, self.spec.model.dim
        arr = np.asarray(pixels)
        if arr.ndim == 3 and arr.shape[2] == 1:
            arr = arr[..., 0]
        if arr.ndim != 2 or arr.shape != (side, side):
            shape = "x".join(map(str, arr.shape))
            raise ImageError(f"query is {shape}; this MAGIC run models {side}x{side} grayscale images (1 channel, "
                             f"{d} pixels): give a {side}x{side} single-channel image")
        x = arr.astype(np.float64)
        x = x / 255.0 if np.issubdtype(np.asarray(pixels).dtype, np.integer) or x.max() > 1.0 else x
        return torch.from_numpy(x.reshape(-1))

    def image_pixels(self, source, name: str | None = None) -> np.ndarray:
        """Pixels of an image file (path or bytes); refuse colour images (size is checked by query_vector)."""

        img = open_image(source, name)
        label = name or (str(source) if not isinstance(source, bytes) else "upload")
        if img.mode in ("L", "1", "I", "I;16"):
            return np.asarray(img.convert("L"))
        rgb = np.asarray(img.convert("RGB"))
        if not (np.array_equal(rgb[..., 0], rgb[..., 1]) and np.array_equal(rgb[..., 1], rgb[..., 2])):
            raise ImageError(f"{label} is a colour image ({img.mode}, {len(img.getbands())} channels); this MAGIC "
                             f"run models grayscale {self.spec.resolution}x{self.spec.resolution} images (1 channel)")
        return rgb[..., 0]

    def sample(self, theta: torch.Tensor, n: int, seed: int, steps: int | None = None) -> np.ndarray:
        """n generated images (uint8 (n, side, side, 1)) by the reverse probability-flow ODE (Heun) from a seed."""
        o = self.spec.ode
        grid = time_grid(steps or max(o.steps, 64), o.eps, self.spec.model.sigma, theta.dtype).flip(0)
        g = torch.Generator().manual_seed(seed)
        std1 = marginal_std(torch.tensor(1.0, dtype=torch.float64), self.spec.model.sigma)
        x = (torch.randn(n, self.spec.model.dim, generator=g, dtype=torch.float64) * std1).to(theta.dtype)
        sig = self.spec.model.sigma
        with torch.no_grad():
            def f(xs, t):
                return -0.5 * sig ** (2 * t) * self.model.score(theta, xs, t.expand(len(xs)))
            for k in range(len(grid) - 1):
                t0, t1 = grid[k], grid[k + 1]
                h = t1 - t0
                f0 = f(x, t0)
                xp = x + h * f0
                x = x + 0.5 * h * (f0 + f(xp, t1))
        side = self.spec.resolution
        return np.round(x.clamp(0, 1).double().numpy() * 255).astype(np.uint8).reshape(n, side, side, 1)

    def query_id(self, x: torch.Tensor) -> str:
        pix = np.round(x.double().numpy() * 255).astype(np.uint8)
        return hashlib.sha256(pix.tobytes()).hexdigest()[:12]

    def query_path(self, qid: str) -> Path:
        return self.path / "queries" / f"{qid}.npz"

    def load_query(self, qid: str) -> dict | None:
        p = self.query_path(qid)
        if not p.is_file():
            return None
        with np.load(p, allow_pickle=False) as z:
            out = {k: z[k] for k in z.files}
        out["meta"] = json.loads(str(out["meta"]))
        return out

    def save_query(self, qid: str, x: torch.Tensor, grad: torch.Tensor, meta: dict) -> None:
        save_npz(self.query_path(qid), compress=False, x=x.double().numpy(), grad=grad.double().numpy(),
                 meta=np.array(json.dumps(meta)))

    def list_queries(self) -> list[dict]:
        out = []
        for p in sorted((self.path / "queries").glob("*.npz")):
            q = self.load_query(p.stem)
            if q is not None:
                out.append({"id": p.stem, **q})
        return out


def save_theta(path: Path, theta: torch.Tensor) -> None:
    from safetensors.torch import save_file  # lazy: only saving/loading a run needs it

    with atomic_path(path) as tmp:
        save_file({"theta": theta.detach().contiguous().cpu()}, str(tmp))


def load_theta(path: Path) -> torch.Tensor:
    from safetensors.torch import load_file  # lazy: only saving/loading a run needs it

    try:
        return load_file(str(path))["theta"]
    except Exception as exc:  # noqa: BLE001 (safetensors raises its own error kinds; a missing key is a KeyError)
        raise CheckpointError(f"{path.parent.name}/{path.name} is not a readable MAGIC parameter file "
                              f"({reason(exc)}); delete it and rerun the command that wrote it (magic train or "
                              "magic validate)") from None


def open_run(path: str | os.PathLike) -> MagicRun:
    """Open a trained MAGIC run folder (or its run.json); any other checkpoint is refused with how to make one."""
    p = Path(path)
    if p.name == "run.json":
        p = p.parent
    if not p.exists() and p.name == str(path) and (magic_root() / p.name).is_dir():  # a run's name in the cache
        p = magic_root() / p.name
    if not p.exists():
        raise CheckpointError(f"MAGIC run folder not found: {p}; {HOW_TO_MAKE}")
    cfg = p / "run.json"
    try:
        data = json.loads(cfg.read_text()) if cfg.is_file() else {}
    except (OSError, ValueError):
        data = {}
    if data.get("kind") != KIND:
        raise CheckpointError(f"{p} is not a MAGIC run: MAGIC needs its own deterministic training run with one "
                              f"weight per training example (an ordinary checkpoint has none); {HOW_TO_MAKE}")
    try:
        spec = MagicSpec.from_dict(data)
    except (KeyError, TypeError) as exc:
        raise CheckpointError(f"{cfg} is incomplete or from another version ({exc}); {HOW_TO_MAKE}") from None
    run = MagicRun(spec, path=p)
    if not run.trained:
        raise CheckpointError(f"{p} has no theta.safetensors (training did not finish); rerun magic train")
    return run


def list_runs(root=None) -> list[Path]:

    return sorted(p.parent for p in magic_root(root).glob("*/run.json"))
