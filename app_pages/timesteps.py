"""Timesteps: how loss-gradient norms depend on the diffusion timestep, and what that does to TracIn-style
attribution (Diffusion-ReTrac paper). Four views: the current image (generated, uploaded or from the dataset) over
a grid of timesteps, the training set at its training timesteps (click a point to open the image), the same per
checkpoint, and the generally influential training images per method."""

import streamlit as st

from app_pages._figures import chart
from app_pages._image import image_target, pick_image
from app_pages._tiles import tile_caption, tiles
from app_pages._timesteps import curve, influential_tab, trained_at
from app_pages._ui import cached_model, checkpoint_name, display_size, fail, keep, progress_bar, require_model
from attribution import (
    AttributionError,
    NormConfig,
    norm_curve_figure,
    norm_scatter_figure,
    per_checkpoint_figure,
    pixels_to_pil,
    run_checkpoints,
    selected_points,
    tensor_to_pixels,
    training_dataset_of,
    training_norms,
)

st.title("Timesteps")
st.caption("Gradient norms ‖∇θ L(x, t)‖ depend strongly on t, so plain TracIn favours training images drawn at "
           "large-gradient timesteps whatever the target (\"generally influential\"); Diffusion-ReTrac normalises "
           "the gradients.")
st.caption("The Diffusion-ReTrac paper reports norms rising toward noise; on these ε-prediction DDPMs they fall "
           "with t, as the ε-MSE gradient follows the prediction error (digits: loss ~0.17 at t = 10, ~0.0004 at "
           "t = 900).")
keep("ts_log", "ts_grid", "ts_samples", "ts_per_bin", "ts_samples_c", "ts_infl_methods", "ts_infl_n",
     "ts_infl_k")
model = require_model()
dataset = st.session_state.get("dataset")
try:
    train = training_dataset_of(model, dataset)
    run_specs = run_checkpoints(model.spec)
except AttributionError as exc:
    fail(exc)
size = display_size(train.resolution, 80)
log_y = st.toggle("Logarithmic norm axis", True, key="ts_log")


one, scatter, per_ckpt, influential = st.tabs(["One image", "Training set", "Per checkpoint",
                                               "Generally influential"])

# -- one image over a grid of timesteps ---------------------------------------------------------------------------
with one:
    ref = pick_image(model, "ts")  # the current image: generated, uploaded or from the dataset
    try:
        target, name = image_target(model, ref, dataset)
    except AttributionError as exc:
        fail(exc)
    name = name if ref.kind == "upload" else ref.spec  # gen:SEED however it was sampled (the caption says how)
    c1, c2, c3 = st.columns([1, 1, 2])
    grid = int(c2.select_slider("Timesteps", [10, 25, 50, 100, 200], 100, key="ts_grid"))
    ckpts = c3.multiselect("Checkpoints", run_specs, [model.spec], key="ts_ckpts", format_func=checkpoint_name)
    c1.image(pixels_to_pil(tensor_to_pixels(target.images[0]), size), width=size, output_format="PNG",
             caption=ref.describe(name)
             + (f" · {target.labels[0]}" if target.labels[0] else ""))
    if ckpts:
        curves, marks, sources = {}, {}, set()
        with st.spinner("Gradient norms at every timestep (fixed noise)…"):
            for spec in ckpts:
                curves[checkpoint_name(spec)] = curve(spec, target.keys[0], target.images[0].numpy(), grid)
                if ref.kind == "train":  # a training image was drawn at a timestep in each epoch
                    marks[checkpoint_name(spec)], source = trained_at(spec, train.spec, ref.number)
                    sources.add(source)
        chart(norm_curve_figure(curves, marks, f"{name}: gradient norm versus timestep", log_y), "ts_curve",
              f"gradient-norm-{name.replace(':', '-')}")
        st.caption("The same noise at every timestep" + (
            f"; dashed lines: the timestep this image was drawn at in the epoch that ended at each checkpoint "
            f"({', '.join(sorted(sources))})." if sources else "."))

# -- the training set at its training timesteps ---------------------------------------------------------------------
with scatter:
    with st.form("ts_scatter_form"):
        c1, c2 = st.columns(2)
        samples = int(c1.number_input("Training images (random subset)", 10, len(train), min(500, len(train)),
                                      key="ts_samples"))
        per_bin = c2.toggle("Divide by the median norm of the timestep bin", False, key="ts_per_bin",
                            help="What remains is each image's own gradient size, with the timestep effect removed.")
        go = st.form_submit_button("Compute norms", type="primary")
    key = (model.spec, train.spec, samples)
    if go:
        try:
            res = training_norms(model, train, NormConfig(samples=samples),
                                 progress=progress_bar(f"gradient norms of {samples} training images"))
        except AttributionError as exc:
            fail(exc)
        st.session_state["ts_scatter"] = (key, res)
    stored = st.session_state.get("ts_scatter")
    if not stored or stored[0] != key:
        st.info("Press **Compute norms** (about 5 s per 100 images on two CPU cores; cached in `cache/norms/`).")
    else:
        res = stored[1]
        fig = norm_scatter_figure(res, train.label_name, log_y, normalize_per_bin=per_bin,
                                  num_timesteps=model.num_timesteps)
        event = chart(fig, "ts_scatter_chart", "gradient-norms-training-set", on_select="rerun",
                      selection_mode=("points", "box"))
        st.caption(f"{res.source.capitalize()} training timesteps · Spearman ρ(norm, t) = {res.spearman():+.3f} over "
                   f"{len(res.norms)} images. Click or box-select points to open the training images.")
        picked = selected_points(event.selection if event else None)
        if picked:
            shown = picked[:16]
            norm_of = dict(zip(res.indices.tolist(), res.norms.tolist()))
            tiles(train, [i for i, _ in shown], [f"{tile_caption(train, i)} · t={t} · norm "
                                                 f"{norm_of.get(i, float('nan')):.3g}" for i, t in shown], "ts_picked")
        st.dataframe([{"t from": b["t_from"], "t to": b["t_to"], "images": b["count"], "median norm": b["median"]}
                      for b in res.binned(10, model.num_timesteps)], hide_index=True, key="ts_bins")

# -- per checkpoint --------------------------------------------------------------------------------------------------
with per_ckpt:
    if len(run_specs) < 2:
        st.info(f"{checkpoint_name(model.spec)} is not a later checkpoint of a training run: there is nothing to "
                "compare.")
    else:
        with st.form("ts_ckpt_form"):
            samples_c = int(st.number_input("Training images per checkpoint", 10, len(train), min(300, len(train)),
                                            key="ts_samples_c"))
            go_c = st.form_submit_button(f"Compute for {len(run_specs)} checkpoints", type="primary")
        key_c = (tuple(run_specs), train.spec, samples_c)
        if go_c:
            results = []
            try:
                for spec in run_specs:
                    results.append(training_norms(cached_model(spec), train, NormConfig(samples=samples_c),
                                                  progress=progress_bar(f"{spec}: {samples_c} images")))
            except AttributionError as exc:
                fail(exc)
            st.session_state["ts_per_ckpt"] = (key_c, results)
        stored = st.session_state.get("ts_per_ckpt")
        if stored and stored[0] == key_c:
            results = stored[1]
            chart(per_checkpoint_figure(results, num_timesteps=model.num_timesteps, log_y=log_y), "ts_ckpt_chart",
                  "gradient-norms-per-checkpoint")
            st.dataframe([{"checkpoint": r.checkpoint, "timesteps": r.source, "Spearman ρ(norm, t)": r.spearman(),
                           "median norm, t < 100": r.binned(10)[0]["median"],
                           "median norm, t ≥ 900": r.binned(10)[-1]["median"]} for r in results],
                         hide_index=True, key="ts_ckpt_table")

# -- generally influential samples -------------------------------------------------------------------------------
with influential:
    influential_tab(model, train, dataset)
