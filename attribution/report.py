"""Turning scores into what people read and export: tables, shares, files, and the equivalent CLI line."""

from __future__ import annotations

import csv
import io
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .data import ImageDataset
from .errors import ConfigError
from .features.config import FeatureConfig
from .fileio import atomic_path, save_npy

# What `--out` writes, by extension: the raw matrix, a ranked table with metadata columns, or both in one archive.
OUT_FORMATS = {".npy": "the score matrix (targets x training images, dataset order)",
               ".csv": "a ranked table per target, with the metadata in columns",
               ".npz": "the score matrix and the metadata"}


def export_metadata(target: str | None, method: str, lam: float | None, checkpoint: str, dataset: str,
                    cfg: FeatureConfig) -> dict:
    """What a score export was computed from: target, method, lambda, checkpoint, dataset, feature config."""
    meta = {} if target is None else {"target": target}
    meta.update(method=method, **{"lambda": "" if lam is None else f"{lam:.6g}"}, checkpoint=checkpoint,
                dataset=dataset, features=cfg.slug())
    return meta


def _name_part(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.=+-]+", "-", text).strip("-.")[:40] or "x"


def export_name(kind: str, meta: dict, ext: str) -> str:
    """A file name that differs whenever target, method, lambda, checkpoint or feature config differ, e.g.
    scores_gen-0_dtrak_lam0.0123_run-epoch-2_square-K10u-n1-sjlt-k4096-s0.csv."""
    ckpt = ",".join("-".join(Path(c.strip()).parts[-2:]) for c in meta["checkpoint"].split(","))
    parts = [kind] + ([_name_part(meta["target"])] if meta.get("target") else []) + [meta["method"]]
    if meta.get("lambda"):
        parts.append(f"lam{meta['lambda']}")
    parts += [_name_part(ckpt), _name_part(meta["features"])]
    return "_".join(parts) + "." + ext.lstrip(".")

@dataclass
class Ranked:
    index: int
    label: int | None
    class_name: str
    score: float


def rank(scores: np.ndarray, data: ImageDataset, top: int = 5, sign: int = 1) -> list[Ranked]:
    """The `top` training images with the largest positive (sign=1: proponents) or most negative (sign=-1:
    opponents) scores, strongest first. Only scores of that sign are listed."""
    order = np.argsort(-sign * scores, kind="stable")[:top]
    return [Ranked(int(i), int(data.labels[i]) if data.labels[i] >= 0 else None, data.label_name(int(i)),
                   float(scores[i])) for i in order if sign * scores[i] > 0]


def ranking_rows(scores: np.ndarray, data: ImageDataset, meta: dict | None = None) -> list[dict]:
    """Every training image, strongest proponent first: rank, index, label, score (then the `meta` columns)."""
    order = np.argsort(-scores, kind="stable")
    extra = dict(meta or {})
    return [{"rank": r + 1, "index": int(i), "label": data.label_name(int(i)), "score": float(scores[i]), **extra}
            for r, i in enumerate(order)]


def check_out(path: str | None) -> None:
    """Refuse an `--out` whose extension is not one we write (before any work)."""
    if path is None:
        return
    suffix = Path(path).suffix.lower()
    if suffix not in OUT_FORMATS:
        raise ConfigError(f"--out {path}: unknown file type {suffix or '(no extension)'}; use "
                          + ", ".join(f"{ext} ({what})" for ext, what in OUT_FORMATS.items()))


def write_scores(path: str, scores: np.ndarray, data: ImageDataset, metas: Sequence[dict]) -> str:
    """Write (M, N) scores (one row per target; self-influence: one row) as `path`'s extension says; returns
    what was written, for the message."""
    check_out(path)
    suffix = Path(path).suffix.lower()
    scores = np.asarray(scores).reshape(len(metas), -1)
    if suffix == ".npy":
        save_npy(path, scores.astype(np.float32))
    elif suffix == ".csv":
        rows = [row for m, meta in enumerate(metas) for row in ranking_rows(scores[m], data, meta)]
        with atomic_path(path) as tmp:
            tmp.write_text(to_csv(rows))
    else:
        arrays = {"scores": scores.astype(np.float32), **metadata_arrays(metas)}
        with atomic_path(path) as tmp, open(tmp, "wb") as f:
            np.savez_compressed(f, **arrays)
    return OUT_FORMATS[suffix]


def metadata_arrays(metas: Sequence[dict]) -> dict[str, np.ndarray]:
    """`export_metadata` of each score row as .npz arrays: text fields as strings, lambda as float64 (NaN for a
    method without λ), a number to compute with rather than the CSV's text."""
    return {key: np.array([float(m[key]) if m[key] != "" else np.nan for m in metas]) if key == "lambda"
            else np.array([m[key] for m in metas]) for key in metas[0]}


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


def agreement(scores: np.ndarray, reference: np.ndarray, k: int = 5) -> tuple[int, float]:
    """How far two rankings of the same training set agree: (images shared by their top-k proponents, Spearman
    rank correlation of all the scores; NaN when either is constant)."""
    a, b = np.asarray(scores, dtype=np.float64), np.asarray(reference, dtype=np.float64)
    shared = len(set(np.argsort(-a, kind="stable")[:k].tolist()) & set(np.argsort(-b, kind="stable")[:k].tolist()))
    if np.ptp(a) == 0 or np.ptp(b) == 0:
        return shared, float("nan")
    from scipy.stats import spearmanr  # lazy: scipy submodules load slowly

    return shared, float(spearmanr(a, b).statistic)


def agreement_caption(scores: np.ndarray, reference: np.ndarray, k: int, reference_title: str) -> str:
    """One sentence for a comparison column: its agreement with the first column (`agreement`)."""
    shared, rho = agreement(scores, reference, k)
    return (f"Against {reference_title}: {shared} of the top {k} proponents shared; Spearman rank correlation of "
            f"all {len(scores)} scores {rho:+.2f}.")
