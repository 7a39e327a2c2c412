"""Self-influence: how much each training image supports itself, the memorisation signal (D-TRAK paper, D.3).

High self-influence: atypical or unique images the model had to memorise. Low: typical images with many similar
neighbours in the training set.
"""

import numpy as np
import plotly.express as px
import streamlit as st

from app_pages._attr import (
    METHOD_TITLES,
    PROJ_DIMS,
    Lambda,
    RunOptions,
    cached_attribution,
    featurize_note,
    featurize_with_progress,
    lambda_slider,
    verdict_controls,
)
from app_pages._figures import chart
from app_pages._tiles import record_scores, tile_caption, tiles
from app_pages._ui import fail, keep, require_model
from attribution import (
    DEFAULT_PROJ_DIM,
    DEFAULT_TIMESTEPS,
    METHODS,
    AttributionError,
    class_ranks,
    export_metadata,
    export_name,
    size_normalized,
    to_csv,
)

st.title("Self-influence")
st.caption("τ(xₙ)ₙ: the score of each training image for itself. High values mark atypical, memorised images; "
           "low values typical ones with many similar neighbours.")
keep("si_method", "si_K", "si_k", "si_variant", "si_per_class", "si_n", "si_classes")
model = require_model()
dataset = st.session_state.get("dataset")
usable = [m for m in METHODS if METHODS[m].has_self_influence]  # e.g. not cosine methods (always 1)

with st.form("si_form"):
    c1, c2, c3 = st.columns(3)
    method = c1.selectbox("Method", usable, format_func=METHOD_TITLES.get, key="si_method")
    timesteps = c2.number_input("Timesteps K", 1, model.num_timesteps, DEFAULT_TIMESTEPS, key="si_K")
    proj_dim = c3.selectbox("Projection k", PROJ_DIMS, index=PROJ_DIMS.index(DEFAULT_PROJ_DIM), key="si_k")
    run = st.form_submit_button("Compute", type="primary")

opts = RunOptions(model.spec, dataset, method, timesteps=int(timesteps), proj_dim=int(proj_dim))
if not run:
    try:
        st.caption(featurize_note(cached_attribution(opts)), help="For the options as the form was last submitted.")
    except AttributionError:
        pass  # reported by Compute, with the reason
if run:
    try:
        att = cached_attribution(opts)
        with st.status("Featurizing the training set (cached after the first run)…", expanded=True) as status:
            featurize_with_progress(att)
            status.update(label="Features ready", state="complete")
    except AttributionError as exc:
        fail(exc)
    previous = st.session_state.get("si_computed")  # what was computed and its λ, in one entry
    st.session_state["si_computed"] = {"opts": opts, "lam": Lambda.after(
        previous["lam"] if previous and previous["opts"] == opts else None)}

computed = st.session_state.get("si_computed")
opts = computed and computed["opts"]
if opts is None or (opts.checkpoint, opts.dataset) != (model.spec, dataset):  # none yet, or for another model
    st.info("Choose a method and press **Compute**. The features are shared with the Attribute page.")
    st.stop()

try:
    att = cached_attribution(opts)
    lam = None
    if att.method.uses_lambda:
        lam = lambda_slider("λ", att.members[0].train_features().kernel, computed["lam"], "si_lambda")
        verdict_controls(att, opts, computed["lam"], lam, "si_lambda")
    values = att.self_influence(lam)
except AttributionError as exc:
    fail(exc)

data = att.train
VARIANTS = {"plain": "Self-influence τ(xₙ)", "normalised": "Size-normalised τ(xₙ) / ‖φ(xₙ)‖²"}
c1, c2 = st.columns([2, 1])
variant = c1.radio("Shown", list(VARIANTS), format_func=VARIANTS.get, horizontal=True, key="si_variant",
                   help="Plain self-influence grows with the size of an image's own gradient, so thin strokes "
                        "with large gradients top the list. The size-normalised variant divides by the squared "
                        "feature norm and measures how unusual the gradient's direction is.")
per_class = c2.toggle("Rank within each class", False, key="si_per_class",
                      help="Each image's rank among the images of its own class (1 = highest).")
if variant == "normalised":
    values = size_normalized(values, sum(w * m.train_features().norms ** 2 for w, m in zip(att.weights, att.members)))
ranks = class_ranks(values, data.labels)
order = np.argsort(-values, kind="stable")
if per_class:  # the top of every class first: all rank-1 images, then all rank-2, ...
    order = order[np.argsort(ranks[order], kind="stable")]
st.caption(("Shown: self-influence divided by the squared norm of the image's feature φ: how few training images "
            "share its gradient direction, whatever the gradient's size." if variant == "normalised" else
            "Shown: plain self-influence, the image's score for itself (the kernel leverage). It grows with the "
            "gradient's size; the size-normalised variant shows unusual images rather than large gradients.")
           + (" Ordered by rank within class: the most self-influential image of each class first." if per_class
              else ""))
n_show = st.slider("Images shown", 4, 32, 10, key="si_n")
classes = sorted({data.label_name(i) for i in range(len(data))})
pick = st.multiselect("Classes", classes, key="si_classes", placeholder="all classes")
if pick:
    order = np.array([i for i in order if data.label_name(i) in pick], dtype=np.int64)
what = "τ/‖φ‖²" if variant == "normalised" else "self-influence"
record_scores(data, f"{VARIANTS[variant]} ({METHOD_TITLES[opts.method]})", values)
for title, shown, key in ((f"**Highest** ({METHOD_TITLES[opts.method]})", order[:n_show], "si_high"),
                          ("**Lowest**", order[::-1][:n_show], "si_low")):
    st.markdown(title)
    tiles(data, shown, [tile_caption(data, i, values[i], what, signed=False)
                        + (f" · class rank {ranks[i]}" if per_class else "") for i in shown], key)

fig = px.histogram(x=values, color=[data.label_name(i) for i in range(len(data))], nbins=60,
                   labels={"x": what, "color": "class"}, title="Distribution over the training set")
fig.update_layout(barmode="overlay", height=320, margin=dict(t=40, b=10))
fig.update_traces(opacity=0.6)
chart(fig, "si_hist", f"self-influence-{variant}-{opts.method}")
rows = [{"index": int(i), "label": data.label_name(int(i)), "self_influence": float(values[i]),
         "class_rank": int(ranks[i])} for i in order]
st.dataframe(rows, height=240, hide_index=True)
meta = {**export_metadata(None, opts.method, lam, opts.checkpoint, data.spec, att.cfg), "variant": variant}
st.download_button("Self-influence (.csv)", to_csv([{**row, **meta} for row in rows]),
                   file_name=export_name(f"self-influence-{variant}", meta, "csv"), mime="text/csv")
