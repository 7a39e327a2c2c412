"""UI helpers of the Counterfactual page: finding and caching studies, the difference map, the figures. Not a page.

Studies are read from disk only (a bank's `counterfactual/` folder and the cache's `counterfactual/`); the page never
retrains: running a study is the CLI's job (hours of CPU for the digits), and the page shows its command line.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import plotly.graph_objects as go
import streamlit as st

from attribution import COUNTERFACTUAL_METRICS as METRICS
from attribution import CounterfactualStudy as Study
from attribution import banks_dir, counterfactual_root, list_studies

EXAMPLE = ("python -m attribution counterfactual --bank digits --targets gen:0-9 --methods random,pixel-cos,trak,dtrak "
           "--remove 0.05")


def study_folders() -> list[str]:
    roots = [*sorted(banks_dir().glob("*/counterfactual")), counterfactual_root()]
    return [str(p) for p in list_studies([r for r in roots if r.is_dir()])]


def stamp(folder: str) -> float:
    """Changes whenever a cell is added (so a study that grows is re-read)."""
    cells = Path(folder) / "cells"
    return max([cells.stat().st_mtime if cells.is_dir() else 0.0, (Path(folder) / "study.json").stat().st_mtime])


@st.cache_resource(max_entries=8, show_spinner="Reading the study…")
def cached_study(folder: str, _stamp: float) -> Study:
    return Study.load(folder)


def label(folder: str) -> str:
    """ "--bank digits · digits-eval-ddpm50-…" without absolute paths."""
    try:
        return Study.load(folder).name
    except Exception:  # a study another process is writing: its folder name is enough
        return Path(folder).name


def difference_map(before: np.ndarray, after: np.ndarray) -> tuple[np.ndarray, int]:
    """|after - before| as a grey uint8 image stretched so the largest difference is white; and the stretch."""
    d = np.abs(after.astype(np.int16) - before.astype(np.int16)).max(axis=-1, keepdims=True)
    peak = int(d.max())
    scale = 255 // peak if peak else 1
    return (d * scale).clip(0, 255).astype(np.uint8), scale


def boxplot_figure(values: dict[str, dict[int, float]], metric: str, title: str) -> go.Figure:
    fig = go.Figure()
    for method, per_target in values.items():
        targets = sorted(per_target)
        fig.add_trace(go.Box(y=[per_target[t] for t in targets], name=method, boxpoints="all", jitter=0.3,
                             text=[f"gen:{t}" for t in targets], hovertemplate="%{text}: %{y:.3f}<extra></extra>"))
    fig.update_layout(title=title, yaxis_title=METRICS[metric], showlegend=False, height=360,
                      margin=dict(l=40, r=10, t=40, b=30))
    return fig


def dose_figure(curves: dict[str, list[tuple[int, float]]], metric: str, n_train: int, title: str) -> go.Figure:
    fig = go.Figure()
    for method, pts in curves.items():
        fig.add_trace(go.Scatter(x=[100 * k / n_train for k, _ in pts], y=[v for _, v in pts], mode="lines+markers",
                                 name=method))
    fig.update_layout(title=title, xaxis_title="removed (% of the training set)",
                      yaxis_title=f"median {METRICS[metric]}", height=340, margin=dict(l=40, r=10, t=40, b=30))
    return fig
