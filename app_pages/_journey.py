"""Helpers of the Journey page (and the Tour): the cached attributor, the command line, the Attribute-page
comparison. Not a page."""

from __future__ import annotations

import shlex

import numpy as np
import streamlit as st
from attribution.engine import Attributor, open_attributor
from attribution.methods import get_method

from app_pages._attr import METHOD_TITLES, RunOptions
from app_pages._tiles import SCORED
from app_pages._ui import cached_model


@st.cache_resource(max_entries=4, show_spinner=False)
def journey_attributor(opts: RunOptions) -> Attributor:
    """One Attributor per (checkpoint, dataset, method, K, k); it keeps the kernel in memory (features and kernel
    are shared with the other pages through the disk cache)."""
    return open_attributor(cached_model(opts.checkpoint), get_method(opts.method), opts.dataset,
                           timesteps=opts.timesteps, proj_dim=opts.proj_dim, projector=opts.projector)


def journey_cli(opts: RunOptions, cfg, journey, dataset_spec: str, lam: float, uploaded: bool) -> str:
    """The `python -m attribution journey` line that recomputes this journey."""
    cli = ["python", "-m", "attribution", "journey", "--checkpoint", opts.checkpoint, "--dataset", dataset_spec]
    cli += ["--image", journey.meta["name"]] if uploaded else ["--seed", str(cfg.seed)]
    cli += ["--steps", str(cfg.steps), "--sampler", cfg.sampler, "--every", str(cfg.every), "--resamples",
            str(cfg.resamples), "--method", opts.method, "--timesteps", str(opts.timesteps), "--proj-dim",
            str(opts.proj_dim), "--lambda", f"{lam:.6g}", "--out", "out/journey"]
    return " ".join(shlex.quote(p) for p in cli)


WHY_DIFFERENT = (
    "Why the last step's proponents differ from the Attribute page's for the same image: the target feature is "
    "not the same. Here each step attributes the model's guess x̂0 re-noised to that step's timestep t, averaged "
    "over R noise draws, at that one t (Journey-TRAK). The Attribute page attributes the final image itself, "
    "its loss averaged over K timesteps spread over the whole schedule with fixed noise. Both rank the same "
    "training features, so the lists overlap, but the order and scores differ.")


def attribute_overlap(method: str, dataset_spec: str, name: str, last_scores: np.ndarray, k: int = 5) -> str:
    """"Top-5 shared with the Attribute page's D-TRAK for gen:3: 3/5", when that ranking was computed in this
    session; else an empty string."""
    label = f"{METHOD_TITLES[method]} · {name}"
    other = st.session_state.get(SCORED, {}).get((dataset_spec, label))
    if other is None or len(other) != len(last_scores):
        return ""
    shared = len(set(np.argsort(-other, kind="stable")[:k].tolist())
                 & set(np.argsort(-last_scores, kind="stable")[:k].tolist()))
    return f" In this session: the last step's top-{k} shares {shared}/{k} with the Attribute page's {label}."
