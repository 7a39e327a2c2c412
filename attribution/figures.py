"""Plotly figures from plain data, shared by the app and the CLI's HTML exports (no Streamlit here).

Every scatter carries `customdata` [training index, timestep] per point and uses markers, so the app can map a click
(plotly selection event) back to a training image.
"""

from __future__ import annotations

import os
import shutil
import threading
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from .analysis.formation import Formation
from .analysis.influential import TopKStats
from .analysis.norms import TrainingNorms
from .fileio import atomic_path

NORM_TITLE = "‖∇θ L(x, t)‖"


def _axes(fig: go.Figure, log_y: bool, title: str, x: str = "timestep t", y: str = NORM_TITLE) -> go.Figure:
    fig.update_layout(title=title, xaxis_title=x, yaxis_title=y, template="plotly_white", height=420,
                      margin=dict(l=60, r=20, t=50, b=50), legend=dict(itemsizing="constant"))
    fig.update_yaxes(type="log" if log_y else "linear")
    return fig


def norm_curve_figure(curves: dict[str, tuple[np.ndarray, np.ndarray]], training_t: dict[str, int | None],
                      title: str, log_y: bool = True) -> go.Figure:
    """Norm versus timestep of one image, one line (with markers) per checkpoint; a dashed vertical line at the
    timestep the image was drawn at in training for that checkpoint's epoch."""
    fig = go.Figure()
    colors = _palette(len(curves))
    for (name, (ts, norms)), color in zip(curves.items(), colors):
        fig.add_trace(go.Scatter(x=ts, y=norms, mode="lines+markers", name=name, marker=dict(size=4, color=color),
                                 line=dict(color=color), hovertemplate="t=%{x}<br>norm=%{y:.4g}<extra>" + name
                                 + "</extra>"))
        t = training_t.get(name)
        if t is not None:
            fig.add_vline(x=int(t), line_dash="dash", line_color=color, opacity=0.7,
                          annotation_text=f"trained at t={int(t)}" if len(curves) == 1 else None)
    return _axes(fig, log_y, title)


def norm_scatter_figure(result: TrainingNorms, class_name: Callable[[int], str], log_y: bool = True,
                        normalize_per_bin: bool = False, bins: int = 20, num_timesteps: int = 1000) -> go.Figure:
    """Norm of each sampled training image against its training timestep, coloured by class; markers carry
    customdata [index, timestep]. `normalize_per_bin` divides each norm by the median norm of its timestep bin
    (what is left is the image's own, timestep-free, gradient size)."""
    norms = result.norms / per_bin_median(result, bins, num_timesteps) if normalize_per_bin else result.norms
    names = np.array([class_name(int(i)) for i in result.indices])
    fig = go.Figure()
    for cls, color in zip(sorted(set(names), key=_natural), _palette(len(set(names)))):
        sel = names == cls
        fig.add_trace(go.Scatter(
            x=result.timesteps[sel], y=norms[sel], mode="markers", name=cls, marker=dict(size=6, color=color,
                                                                                          opacity=0.75),
            customdata=np.stack([result.indices[sel], result.timesteps[sel]], 1),
            hovertemplate="#%{customdata[0]} · " + cls + "<br>t=%{x}<br>%{y:.4g}<extra></extra>"))
    y = f"{NORM_TITLE} / median of its t-bin" if normalize_per_bin else NORM_TITLE
    name = Path(result.checkpoint).name  # a folder spec's last part: titles stay short
    return _axes(fig, log_y, f"{name}: training images at their training timestep "
                 f"(Spearman ρ = {result.spearman():+.2f})", y=y)


def per_checkpoint_figure(results: Sequence[TrainingNorms], bins: int = 10, num_timesteps: int = 1000,
                          log_y: bool = True) -> go.Figure:
    """Median norm per timestep bin, one line per checkpoint: how the timestep dependence evolves in training."""
    fig = go.Figure()
    for res, color in zip(results, _palette(len(results))):
        rows = res.binned(bins, num_timesteps)
        fig.add_trace(go.Scatter(x=[(r["t_from"] + r["t_to"]) / 2 for r in rows], y=[r["median"] for r in rows],
                                 mode="lines+markers", name=f"{res.checkpoint} (ρ={res.spearman():+.2f})",
                                 line=dict(color=color), marker=dict(color=color)))
    return _axes(fig, log_y, "Median gradient norm per timestep bin, per checkpoint", y=f"median {NORM_TITLE}")


def influential_figure(stats: Sequence[TopKStats]) -> go.Figure:
    """Distinct training images among the top-k proponents of all targets, one bar per method."""
    fig = go.Figure(go.Bar(x=[s.method for s in stats], y=[s.unique for s in stats],
                           text=[f"{s.unique} ({s.unique_share:.0%})" for s in stats], textposition="outside",
                           marker_color=_palette(len(stats))))
    k, m = (stats[0].k, stats[0].targets) if stats else (0, 0)
    fig.update_layout(title=f"Unique training images in the top-{k} proponents of {m} targets (max {k * m})",
                      yaxis_title="unique images", template="plotly_white", height=380,
                      margin=dict(l=60, r=20, t=50, b=40))
    return fig


def per_bin_median(result: TrainingNorms, bins: int, num_timesteps: int) -> np.ndarray:
    """For each point, the median norm of the points in its timestep bin."""
    which = np.minimum((result.timesteps * bins) // num_timesteps, bins - 1)
    medians = np.ones(bins)
    for b in range(bins):
        if (which == b).any():
            medians[b] = np.median(result.norms[which == b])
    return np.maximum(medians[which], 1e-30)


def _natural(text: str):
    return (0, int(text)) if text.isdigit() else (1, text)


def _palette(n: int) -> list[str]:
    base = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
            "#17becf"]
    return [base[i % len(base)] for i in range(n)]


def selected_points(selection) -> list[tuple[int, int]]:
    """(training index, timestep) of the points in a plotly selection event (`event.selection` of
    `st.plotly_chart(..., on_select="rerun")`) of a figure whose markers carry customdata [index, timestep].
    Streamlit 1.67 returns each point's customdata as a list or as a dict with string keys ({'0': 3, '1': 500}):
    both are read."""
    points = (selection or {}).get("points", []) if isinstance(selection, dict) else getattr(selection, "points", [])
    out = []
    for p in points or []:
        cd = p.get("customdata") if isinstance(p, dict) else None
        if isinstance(cd, dict):
            cd = [cd[k] for k in sorted(cd, key=int)]
        if cd is not None and len(cd) >= 2:
            pair = (int(cd[0]), int(cd[1]))
            if pair not in out:
                out.append(pair)
    return out


# -- evaluation ------------------------------------------------------------------------------------------------------

def lds_lambda_figure(lambdas: np.ndarray, standard: np.ndarray, centered: np.ndarray,
                      ci: np.ndarray | None = None, marks: dict[str, float] | None = None,
                      ceilings: dict[str, float | None] | None = None, title: str = "LDS versus λ") -> go.Figure:
    """LDS (and centered LDS) along λ on a log axis, a shaded target-bootstrap band, dotted vertical lines at the
    named λ values (`marks`: default, retraining-free, optimal, current) and a dashed line at each named ceiling
    (`ceilings`: reachable, seed-vs-seed)."""
    fig = go.Figure()
    if ci is not None:
        fig.add_trace(go.Scatter(x=np.r_[lambdas, lambdas[::-1]], y=np.r_[ci[:, 1], ci[::-1, 0]], fill="toself",
                                 fillcolor="rgba(31,119,180,0.15)", line=dict(width=0), hoverinfo="skip",
                                 name="95% CI (targets)"))
    fig.add_trace(go.Scatter(x=lambdas, y=standard, mode="lines+markers", name="LDS", marker=dict(size=5),
                             customdata=lambdas, hovertemplate="λ=%{x:.3g}<br>LDS=%{y:.3f}<extra></extra>"))
    fig.add_trace(go.Scatter(x=lambdas, y=centered, mode="lines+markers", name="centered LDS",
                             marker=dict(size=5), line=dict(dash="dot"),
                             hovertemplate="λ=%{x:.3g}<br>centered=%{y:.3f}<extra></extra>"))
    _log_x_marks(fig, marks or {}, lambdas)
    for (name, value), color in zip((ceilings or {}).items(), ("dimgray", "darkgray", "silver")):
        if value is not None and np.isfinite(value):
            fig.add_hline(y=value, line_dash="dash", line_color=color, annotation_text=name)
    fig.update_layout(title=title, xaxis_title="λ", yaxis_title="LDS (Spearman)", template="plotly_white",
                      height=400, margin=dict(l=60, r=20, t=50, b=50))
    fig.update_xaxes(type="log")
    return fig


CHAR_WIDTH = 0.009  # one label character's share of a plot's width (about 7 px of 800)


def _log_x_marks(fig: go.Figure, marks: dict[str, float], x: np.ndarray) -> None:
    """Dotted vertical lines at the named values `marks` on a log x axis over `x`, each labelled near the top.

    Plotly reads an annotation's x in log10 units on a log axis but a line's in data units, so
    `add_vline(annotation_text=...)` puts the label at 10^x (far off, stretching the axis). Marks at the same value
    share one line and one label ("default, current"). Each label goes to the first row, right or left of its line,
    where it overlaps no other label, crosses no other line and stays inside the plot (else the first row where it
    overlaps no other label)."""
    groups: dict[float, list[str]] = {}
    for name, value in marks.items():
        groups.setdefault(float(f"{value:.3g}"), []).append(name)
    lo, hi = float(np.log10(np.min(x))), float(np.log10(np.max(x)))
    span = max(hi - lo, 1e-9)
    lines = [float(np.log10(v)) for v in groups]
    placed: list[tuple[int, float, float]] = []  # (row, left, right) of the labels drawn

    def fits(row: int, a: float, b: float, strict: bool) -> bool:
        if any(r == row and a < right and left < b for r, left, right in placed):
            return False
        return not strict or (lo - 0.02 * span <= a and b <= hi + 0.02 * span
                              and not any(a < line < b for line in lines))

    for (value, names), color in zip(sorted(groups.items()), _palette(max(1, len(groups)))):
        at, text = float(np.log10(value)), ", ".join(names)
        width = (len(text) + 1) * CHAR_WIDTH * span
        options = [(row, side) for row in range(len(groups)) for side in (1, -1)]
        row, side = next((o for strict in (True, False) for o in options
                          if fits(o[0], *sorted((at, at + o[1] * width)), strict)))
        placed.append((row, *sorted((at, at + side * width))))
        fig.add_vline(x=value, line_dash="dot", line_color=color)
        fig.add_annotation(x=at, xref="x", y=1 - 0.08 * row, yref="paper", yanchor="top", showarrow=False, text=text,
                           font=dict(color=color), xanchor="left" if side > 0 else "right", xshift=3 * side)


def lds_option_figure(x: Sequence, lines: dict[str, tuple[np.ndarray, np.ndarray]], xlabel: str,
                      ceiling: dict[str, float] | None = None, title: str = "LDS", log_x: bool = False) -> go.Figure:
    """LDS as one option varies (K, k, checkpoint): one line per split or variant with its two-way 95% CI as error
    bars (`lines[name] = (values, (n, 2) CI)`), and each split's reachable ceiling (`ceiling`) as a dashed line."""
    fig = go.Figure()
    palette = _palette(max(1, len(lines)))
    for (name, (values, ci)), color in zip(lines.items(), palette):
        ci = np.asarray(ci, dtype=float)
        fig.add_trace(go.Scatter(x=list(x), y=values, mode="lines+markers", name=name, line=dict(color=color),
                                 error_y=dict(type="data", symmetric=False, array=ci[:, 1] - values,
                                              arrayminus=values - ci[:, 0], color=color)))
    for (name, c), color in zip((ceiling or {}).items(), palette):
        if c is not None and np.isfinite(c):
            fig.add_hline(y=c, line_dash="dash", line_color=color, annotation_text=f"reachable ({name})")
    fig.update_layout(title=title, xaxis_title=xlabel, yaxis_title="LDS (Spearman)", template="plotly_white",
                      height=400, margin=dict(l=60, r=20, t=50, b=50))
    if log_x:
        fig.update_xaxes(type="log")
    else:
        fig.update_xaxes(type="category")
    return fig


def per_target_figure(values: dict[str, np.ndarray], title: str = "LDS per target") -> go.Figure:
    """Histograms (overlaid) of per-target Spearman correlations, one per method or ceiling."""
    fig = go.Figure()
    for (name, v), color in zip(values.items(), _palette(len(values))):
        fig.add_trace(go.Histogram(x=v, name=name, opacity=0.6, marker_color=color, xbins=dict(size=0.05)))
    fig.update_layout(barmode="overlay", title=title, xaxis_title="Spearman over retrained models",
                      yaxis_title="targets", template="plotly_white", height=360, margin=dict(l=60, r=20, t=50, b=50))
    return fig


# -- journey ----------------------------------------------------------------------------------------------------------

def formation_figure(f: Formation, current: int | None = None, title: str | None = None):
    """A plotly figure of the formation measures over the sampling steps, the current step marked."""
    fig = make_subplots(specs=[[{"secondary_y": True}]])
    custom = np.asarray(f.timesteps)[:, None]
    hover = "step %{x} (t=%{customdata[0]})<br>%{y:.3f}<extra>%{fullData.name}</extra>"
    fig.add_trace(go.Scatter(x=f.steps, y=f.x0_distance, name="x̂0 distance to final (RMS)", mode="lines+markers",
                             customdata=custom, hovertemplate=hover, line={"color": "#1f77b4"}), secondary_y=False)
    fig.add_trace(go.Scatter(x=f.steps, y=f.proponent_similarity, mode="lines+markers", customdata=custom,
                             name=f"top-{f.top} proponents ~ final (pixel corr.)", hovertemplate=hover,
                             line={"color": "#ff7f0e"}), secondary_y=True)
    fig.add_trace(go.Scatter(x=f.steps, y=f.overlap, mode="lines+markers", customdata=custom,
                             name=f"top-{f.top} overlap with last step", hovertemplate=hover,
                             line={"color": "#7f7f7f", "dash": "dot"}), secondary_y=True)
    a, b = f.window()
    fig.add_vrect(x0=a, x1=b, fillcolor="#1f77b4", opacity=0.08, line_width=0,
                  annotation_text="features decided", annotation_position="top left")
    if current is not None:
        fig.add_vline(x=current, line_color="#d62728", line_width=2)
    fig.update_layout(title=title, height=320, margin={"l": 50, "r": 50, "t": 40 if title else 20, "b": 40},
                      legend={"orientation": "h", "y": -0.25}, hovermode="x unified")
    fig.update_xaxes(title_text="sampling step (0 = pure noise)")
    fig.update_yaxes(title_text="x̂0 distance", secondary_y=False, rangemode="tozero")
    fig.update_yaxes(title_text="similarity / overlap", secondary_y=True, range=[-0.05, 1.05],
                     tickvals=[0, 0.25, 0.5, 0.75, 1], showgrid=False)
    return fig


def write_png(fig: go.Figure, path: str | Path, timeout: float = 120.0, scale: float = 2.0) -> str | None:
    """Write `fig` as a PNG through kaleido and the machine's own Chromium (offline; $BROWSER_PATH, else
    /usr/bin/chromium or chromium-headless-shell when present), atomically. For the CLI commands that write HTML.

    Returns None when written, else a one-line note saying why not (no kaleido, no Chromium, an error, or no
    answer within `timeout` s): a missing picture never stops the command and never hangs it.
    """
    try:
        import kaleido  # noqa: F401 (optional: kaleido)
    except ImportError:
        return "PNG skipped: kaleido is not installed (pip install kaleido)"
    if not os.environ.get("BROWSER_PATH"):
        exe = next((p for p in ("/usr/bin/chromium", "/usr/bin/chromium-headless-shell") if Path(p).is_file()),
                   shutil.which("chromium") or shutil.which("chromium-headless-shell"))
        if exe is None:
            return "PNG skipped: no Chromium for kaleido (set BROWSER_PATH or install chromium)"
        os.environ["BROWSER_PATH"] = exe
    result: dict = {}

    def render() -> None:
        try:
            result["png"] = fig.to_image(format="png", scale=scale)
        except Exception as exc:  # noqa: BLE001  (kaleido raises many kinds; all become the one-line note)
            result["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"

    worker = threading.Thread(target=render, daemon=True, name="kaleido")
    worker.start()
    worker.join(timeout)
    if worker.is_alive():
        return f"PNG skipped: kaleido did not answer within {timeout:.0f} s"
    if "error" in result:
        return f"PNG skipped: kaleido failed ({result['error']})"
    with atomic_path(path) as tmp:
        tmp.write_bytes(result["png"])
    return None
