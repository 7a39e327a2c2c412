"""Turning scores into what people read and export: tables, shares, files, and the equivalent CLI line."""

from __future__ import annotations

import csv
import io
import shlex

import numpy as np

from .data import ImageDataset
from .features.config import FeatureConfig


def ranking_rows(scores: np.ndarray, data: ImageDataset) -> list[dict]:
    """Every training image, strongest proponent first: rank, index, label, score."""
    order = np.argsort(-scores, kind="stable")
    return [{"rank": r + 1, "index": int(i), "label": data.label_name(int(i)), "score": float(scores[i])}
            for r, i in enumerate(order)]


def to_csv(rows: list[dict]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]) if rows else ["rank", "index", "label", "score"])
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def to_npz_bytes(**arrays: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    return buf.getvalue()


def positive_share(scores: np.ndarray, top: int) -> float:
    """Fraction of the total positive score mass held by the `top` largest scores (a normalised share, not a
    calibrated probability)."""
    pos = np.sort(scores[scores > 0])[::-1]
    return float(pos[:top].sum() / pos.sum()) if pos.size else 0.0


def equivalent_cli(checkpoint: str, dataset: str, method: str, cfg: FeatureConfig, target: str,
                   lam: float | None, top: int = 5, checkpoint_weights: str = "lr") -> str:
    """The `python -m attribution score ...` command that reproduces a result."""
    parts = ["python", "-m", "attribution", "score", "--checkpoint", checkpoint, "--dataset", dataset,
             "--method", method]
    if method == "dtrak":
        parts += ["--fn", cfg.fn]
        if cfg.fn == "interp":
            parts += ["--eta", f"{cfg.eta:g}"]
    parts += ["--timesteps", str(cfg.timesteps), "--strategy", cfg.strategy, "--noises", str(cfg.noises),
              "--projector", cfg.projector, "--seed", str(cfg.seed)]
    if cfg.projector != "identity":
        parts += ["--proj-dim", str(cfg.proj_dim)]
    if cfg.params:
        parts += ["--params", cfg.params]
    if checkpoint_weights != "lr":
        parts += ["--checkpoint-weights", checkpoint_weights]
    parts += ["--target", target]
    if lam is not None:
        parts += ["--lambda", f"{lam:.6g}"]
    parts += ["--top", str(top)]
    return " ".join(shlex.quote(p) for p in parts)
