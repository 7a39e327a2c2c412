"""Exact influence (MAGIC): the metagradient of a query's bits/dim with respect to every training example's weight.

Thin over attribution/magic: pick a MAGIC run (its own deterministic weighted training run, not the sidebar's
checkpoint), pick or generate a query, compute its metagradient (cached per query), and show the influencers, the
validation scatter when leave-out retrains exist, and the cost.
"""

import numpy as np
import plotly.express as px
import streamlit as st

from app_pages._ui import display_size, fail, image_grid, progress_bar
from attribution import AttributionError, MagicRun, MagicSpec, pixels_to_pil, query_metagradient
from attribution import evaluate_magic as evaluate
from attribution import list_magic_runs as list_runs
from attribution import magic_fit_summary as fit_summary
from attribution import open_magic_run as open_run
from attribution import train_magic_run as train_run

st.title("Exact influence (MAGIC)")
st.caption("How would this image's likelihood (bits/dim) change if a training image weighed more? MAGIC "
           "differentiates through the whole training run of a small score model: exact for that run.")

runs = list_runs()
if not runs:
    st.info("No MAGIC run yet. MAGIC needs its own deterministic training run with one weight per training image "
            "(`python -m attribution magic train`), or train the default one here (8x8 digits, about a minute).")
    if st.button("Train the default run", type="primary", key="mg_train"):
        try:
            train_run(MagicRun(MagicSpec()), progress=progress_bar("Training"))
        except AttributionError as exc:
            fail(exc)
        st.rerun()
    st.stop()


@st.cache_resource(max_entries=4)
def cached_run(path: str) -> MagicRun:
    return open_run(path)


try:
    path = st.selectbox("MAGIC run", [str(p) for p in runs], format_func=lambda p: p.rsplit("/", 1)[-1],
                        key="mg_run")
    run = cached_run(path)
    theta = run.theta()
except AttributionError as exc:
    fail(exc)
spec, prov = run.spec, run.provenance()
st.caption(f"{run.run.n} {spec.dataset} images at {spec.resolution}x{spec.resolution}; {spec.model.n_params:,} "
           f"parameters; {spec.train.steps} Adam steps (batch {spec.train.batch_size}, lr {spec.train.lr:g}, "
           f"ε inside √ {spec.train.eps_root:g}); bits/dim by {spec.ode.solver} with {spec.ode.steps} steps. "
           f"Training took {prov.get('train_seconds', float('nan')):.0f} s.")
try:
    with st.spinner("How well has this run learnt? Bits/dim of its training images, samples and noise (once)…"):
        fit = fit_summary(run)
except AttributionError as exc:
    fail(exc)
scores = (f"its samples score {fit['generated']:.2f} bits/dim, its training images {fit['train']:.2f} and uniform "
          f"noise {fit['noise']:.2f}")
if fit["gap"] is None or fit["gap"] > 0.5:  # samples nearer noise than the training images, or nothing learnt
    st.warning(f"**This run has barely learnt to generate digits**: {scores}. The influences below are exact for "
               "this run, not for a good model. A 1,000-step run (`magic train --hidden 128 --steps 1000`) brings its "
               "samples to 7.7-8.2 against 7.5 for its training images, but MAGIC then predicts leave-out retraining "
               "less well (ρ 0.05-0.47 against 0.93-0.96; BENCHMARKS.md).", icon=":material/warning:")
else:
    st.caption(f"How well this run has learnt: {scores}.")

size = display_size(spec.resolution, 64)
sources = ["Generated", "Training image", "Validation image", "Upload"]
c1, c2 = st.columns([1, 2])
source = c1.radio("Query", sources, key="mg_source")
try:
    if source == "Generated":
        seed = c2.number_input("Seed", 0, 10**6, 0, key="mg_seed")
        pixels, label = run.sample(theta, 1, int(seed))[0], f"gen:{seed}"
    elif source == "Training image":
        i = c2.number_input("Index", 0, run.run.n - 1, 0, key="mg_train_index")
        pixels, label = run.dataset.pixels[int(i)], f"train:{i}"
    elif source == "Validation image":
        from attribution import load_dataset  # only the query picker needs the dataset

        val = load_dataset(spec.dataset, "val", resolution=spec.resolution, channels=1)
        i = c2.number_input("Index", 0, len(val) - 1, 0, key="mg_val_index")
        pixels, label = val.pixels[int(i)], f"val:{i}"
    else:
        up = c2.file_uploader(f"A {spec.resolution}x{spec.resolution} grayscale image", key="mg_upload")
        if up is None:
            st.stop()
        pixels, label = run.image_pixels(up.getvalue(), up.name), up.name
    x = run.query_vector(pixels)
except AttributionError as exc:
    fail(exc)

qid = run.query_id(x)
cached = run.load_query(qid)
c2.image(pixels_to_pil(np.asarray(pixels).reshape(spec.resolution, spec.resolution, 1), size), caption=label,
         width=size, output_format="PNG")
if cached is None:
    st.caption("Cost: about 2-5 training runs of time (a forward replay, then a backward sweep with second "
               "derivatives).")
    if not st.button("Compute metagradient", type="primary", key="mg_compute"):
        st.stop()
    bar = st.progress(0.0, text="Replaying training")

    def update(stage, done, total):
        frac = 0.25 * done / total if stage == "forward" else 0.25 + 0.75 * done / total
        what = "Replaying training" if stage == "forward" else "Backward through training"
        bar.progress(min(1.0, frac), text=f"{what}: step {done}/{total}")

    try:
        query_metagradient(run, x, progress=update)
    except AttributionError as exc:
        fail(exc)
    cached = run.load_query(qid)

grad, meta = np.asarray(cached["grad"]), cached["meta"]
influence = -grad   # bits/dim lowered (likelihood raised) per unit of extra weight on the example
st.metric("Bits/dim of the query", f"{meta['bpd']:.3f}")
n_show = st.slider("Influencers shown", 4, 32, 10, key="mg_n")
order = np.argsort(-influence, kind="stable")
data = run.dataset
for title, shown, key in (("**Most positive** (raise the query's likelihood: weighing them more lowers its bits/dim)",
                           order[:n_show], "mg_pos"),
                          ("**Most negative** (lower the query's likelihood)", order[::-1][:n_show], "mg_neg")):
    st.markdown(title)
    captions = [f"#{i} · {data.label_name(i)} · {influence[i]:+.3g}" for i in shown]
    image_grid([data.pixels[i] for i in shown], captions, size, key=key)
st.caption("Score: −∂ bits/dim / ∂wᵢ at w = 1. Removing a set S of training images changes the query's bits/dim "
           "by about the sum of their scores (removing helpers raises it).")

st.subheader("Predicted versus actual (leave-out retraining)")
folders = sorted((run.path / "validation").glob("*-seed*/sets.json"))
if not folders:
    st.info(f"No leave-out retrains yet: `python -m attribution magic validate --run {run.path.name} --sets 50` "
            "retrains with 1% removed 50 times and reports the Spearman correlation for every cached query.")
else:
    folder = st.selectbox("Retrain set", [f.parent.name for f in folders], key="mg_val")
    fraction, seed = folder.split("-seed")
    try:
        with st.spinner("Bits/dim of the query under each retrained model (cached)…"):
            res = evaluate(run, {"id": qid, **cached}, float(fraction), int(seed))
    except AttributionError as exc:
        fail(exc)
    if res["n_sets"] < 3:
        st.info(f"Only {res['n_sets']} finished retrains; a correlation needs at least 3.")
    else:
        lo, hi = res["ci"]
        fig = px.scatter(x=res["predicted"], y=res["actual"],
                         labels={"x": "predicted change in bits/dim", "y": "actual change in bits/dim"},
                         title=f"ρ = {res['spearman']:.3f} [{lo:.3f}, {hi:.3f}] over {res['n_sets']} removed sets")
        fig.update_layout(height=360, margin=dict(t=40, b=10))
        st.plotly_chart(fig, key="mg_scatter")

st.subheader("Cost")
runs_of_training = meta.get("runs_of_training")
c1, c2, c3, c4 = st.columns(4)
c1.metric("Time", f"{meta['seconds']:.1f} s")
c2.metric("Training runs of time", f"{runs_of_training:.1f}" if runs_of_training else "n/a",
          help="the metagradient's time over that of one forward replay of the run, measured in the same process")
c3.metric("States held", f"{meta['stored_states']} ({meta['state_bytes'] / 2**20:.1f} MB)",
          help=f"checkpointing: {meta['policy']} (all: every state; sqrt: every ceil(sqrt(T))-th, plus one segment)")
c4.metric("Process peak memory", f"{meta['peak_rss_bytes'] / 2**30:.2f} GB")
st.caption(f"Measured on {meta.get('hardware', 'unknown hardware')}.")
