"""Self-influence: how much each training image supports itself, the memorisation signal (D-TRAK paper, D.3).

High self-influence: atypical or unique images the model had to memorise. Low: typical images with many similar
neighbours in the training set.
"""

import numpy as np
import plotly.express as px
import streamlit as st

from attribution.errors import AttributionError
from attribution.methods import METHODS
from attribution.report import export_metadata, export_name, to_csv
from app_pages._attr import (METHOD_TITLES, PROJ_DIMS, RunOptions, cached_attribution, featurize_note,
                             featurize_with_progress, lambda_slider, opts_key)
from app_pages._ui import display_size, fail, require_model

st.title("Self-influence")
st.caption("τ(xₙ)ₙ: the score of each training image for itself. High values mark atypical, memorised images; "
           "low values typical ones with many similar neighbours.")
model = require_model()
dataset = st.session_state.get("dataset")
usable = [m for m in METHODS if METHODS[m].has_self_influence]  # e.g. not cosine methods (always 1)

with st.form("si_form"):
    c1, c2, c3 = st.columns(3)
    method = c1.selectbox("Method", usable, format_func=METHOD_TITLES.get, key="si_method")
    timesteps = c2.number_input("Timesteps K", 1, model.num_timesteps, 10, key="si_K")
    proj_dim = c3.selectbox("Projection k", PROJ_DIMS, index=PROJ_DIMS.index(4096), key="si_k")
    run = st.form_submit_button("Compute", type="primary")

opts = RunOptions(model.spec, dataset, method, None, None, int(timesteps), "uniform", int(proj_dim), "auto")
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
    st.session_state["si_opts"] = opts

opts = st.session_state.get("si_opts")
if opts is None or (opts.checkpoint, opts.dataset) != (model.spec, dataset):  # none yet, or for another model
    st.info("Choose a method and press **Compute**. The features are shared with the Attribute page.")
    st.stop()

try:
    att = cached_attribution(opts)
    lam = None
    if att.method.uses_lambda:
        lam = lambda_slider("λ", att.members[0].train_features().kernel, f"si_lambda_{opts_key(opts)}")
    values = att.self_influence(lam)
except AttributionError as exc:
    fail(exc)

data = att.train
order = np.argsort(-values, kind="stable")
n_show = st.slider("Images shown", 4, 32, 10, key="si_n")
size = display_size(data.resolution, 80)
classes = sorted({data.label_name(i) for i in range(len(data))})
pick = st.multiselect("Classes", classes, key="si_classes", placeholder="all classes")
if pick:
    order = np.array([i for i in order if data.label_name(i) in pick])

for title, shown, key in ((f"**Highest self-influence** ({METHOD_TITLES[opts.method]})", order[:n_show], "si_high"),
                          ("**Lowest self-influence**", order[::-1][:n_show], "si_low")):
    with st.container(key=key):
        st.markdown(title)
        st.image([data.thumbnail(i, size) for i in shown], width=size, output_format="PNG",
                 caption=[f"#{i} · {data.label_name(i)} · {values[i]:.3g}" for i in shown])

fig = px.histogram(x=values, color=[data.label_name(i) for i in range(len(data))], nbins=60,
                   labels={"x": "self-influence", "color": "class"}, title="Distribution over the training set")
fig.update_layout(barmode="overlay", height=320, margin=dict(t=40, b=10))
fig.update_traces(opacity=0.6)
st.plotly_chart(fig, key="si_hist")
rows = [{"index": int(i), "label": data.label_name(int(i)), "self_influence": float(values[i])} for i in order]
st.dataframe(rows, height=240, hide_index=True)
meta = export_metadata(None, opts.method, lam, opts.checkpoint, data.spec, att.cfg)
st.download_button("Self-influence (.csv)", to_csv([{**row, **meta} for row in rows]),
                   file_name=export_name("self-influence", meta, "csv"), mime="text/csv")
