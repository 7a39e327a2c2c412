"""Helpers of the Timesteps page: the cached single-image norm curve and the "generally influential" tab. Not a
page."""

from __future__ import annotations

import numpy as np
import streamlit as st
import torch

from app_pages._attr import METHOD_TITLES, cached_attribution, estimate_note, featurize_with_progress
from app_pages._figures import chart
from app_pages._tiles import tile_caption, tiles
from app_pages._ui import cached_model, fail
from attribution import (
    METHODS,
    TIMESTEP_BIAS_METHODS,
    AttributionError,
    ImageDataset,
    NormConfig,
    RunOptions,
    influential_figure,
    resolve_targets,
    sample_curve,
    top_k_stats,
    training_dataset_of,
    training_timesteps,
)


@st.cache_data(max_entries=32, show_spinner=False)
def curve(spec: str, key: str, image: np.ndarray, grid: int) -> tuple[np.ndarray, np.ndarray]:
    """(timesteps, gradient norms) of one image ((C, H, W) in [-1, 1], noise key `key`: an attribution target's)
    over a grid of timesteps with fixed noise; cached per (checkpoint, image, key, grid)."""
    return sample_curve(cached_model(spec), torch.from_numpy(image), key, NormConfig(grid=grid))


@st.cache_data(max_entries=32, show_spinner=False)
def trained_at(spec: str, dataset_spec: str, index: int) -> tuple[int, str]:
    """The timestep training image `index` was drawn at in the epoch that ended at the checkpoint, and that
    timestep's source ("recorded" by the training run, or "sampled")."""
    m = cached_model(spec)
    trained, source = training_timesteps(m, training_dataset_of(m, dataset_spec), 0)
    return int(trained[index]), source


def influential_tab(model, train: ImageDataset, dataset: str | None) -> None:
    """For many generated targets, the distinct training images among each method's top-k proponents (the
    Diffusion-ReTrac paper's "generally influential" statistic): a form, then a chart and the recurring images."""
    st.caption("For many generated targets, count the distinct training images among each method's top-k "
               "proponents. Few distinct images = the same images rank high for every target.")
    choices = list(METHODS)
    with st.container(border=True):  # no form: the estimate below is for what these widgets show
        c1, c2, c3 = st.columns([2, 1, 1])
        methods = c1.multiselect("Methods", choices, list(TIMESTEP_BIAS_METHODS),
                                 format_func=METHOD_TITLES.get, key="ts_infl_methods")
        n_targets = int(c2.number_input("Generated targets (seeds 0..)", 2, 200, 20, key="ts_infl_n"))
        k = int(c3.number_input("Top k", 1, 100, 10, key="ts_infl_k"))
        go_i = st.button("Compute", type="primary", key="ts_infl_go")
    key_i = (model.spec, train.spec, tuple(methods), n_targets, k)
    if not go_i and methods:
        try:
            st.caption(estimate_note([(METHOD_TITLES[m], cached_attribution(RunOptions(model.spec, dataset, m)))
                                      for m in methods], n_targets),
                       help=f"Each method's training features (once, shared with the other pages) and the features "
                            f"of the {n_targets} generated targets; sampling them comes first.")
        except AttributionError:
            pass  # options that do not make an attribution are reported by Compute, with the reason
    if go_i:
        stats = []
        with st.status("Scoring…", expanded=True) as status:
            try:
                targets = None
                for name in methods:
                    att = cached_attribution(RunOptions(model.spec, dataset, name))
                    if targets is None:
                        status.update(label=f"Generating {n_targets} targets…", expanded=True)
                        targets = resolve_targets(f"gen:0-{n_targets - 1}", att.target_model, train.spec)
                    status.update(label=f"{METHOD_TITLES[name]}: training features (cached after the first run)…",
                                  expanded=True)
                    featurize_with_progress(att, METHOD_TITLES[name])
                    status.update(label=f"{METHOD_TITLES[name]}: {n_targets} targets…", expanded=True)
                    stats.append(top_k_stats(name, att.run(targets).scores, k))
            except AttributionError as exc:
                status.update(state="error")
                fail(exc)
            status.update(label="Done", state="complete", expanded=False)
        st.session_state["ts_infl"] = (key_i, stats)
    stored = st.session_state.get("ts_infl")
    if stored and stored[0] == key_i:
        stats = stored[1]
        chart(influential_figure(stats), "ts_infl_chart", "generally-influential")
        for s in stats:
            st.markdown(f"**{METHOD_TITLES[s.method]}**: {s.unique} distinct of {s.targets * s.k}; most recurring")
            shown = s.recurring[:8]
            tiles(train, [i for i, _ in shown], [f"{tile_caption(train, i)} · in {c} lists" for i, c in shown],
                  f"ts_recurring_{s.method}")
