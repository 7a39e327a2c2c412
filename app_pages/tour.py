"""Tour: five steps through data attribution for a teaching demo, one paragraph and one button each.

Every step reuses what the other pages share between sessions (the cached model and attributors, the one
background featurization per feature store, journeys cached on disk), so a room of students can press the same
buttons at once: the first press pays for the work, the others wait for it and reuse it. Results stay per session.
"""

import numpy as np
import streamlit as st
import torch
from streamlit.errors import StreamlitAPIException

from app_pages._attr import (
    PROJ_DIMS,
    cached_attribution,
    estimate_note,
    featurize_job,
    featurize_with_progress,
    journey_note,
    ranked_tiles,
    target_from_pixels,
    top_lists,
)
from app_pages._figures import chart
from app_pages._image import generated_pixels
from app_pages._prepare import prepare_panel
from app_pages._tiles import record_scores, tiles
from app_pages._ui import display_size, fail, keep, progress_bar, require_model
from attribution import (
    AttributionError,
    NormConfig,
    TourSettings,
    banks_dir,
    formation,
    norm_curve_figure,
    pixels_to_pil,
    pixels_to_tensor,
    run_journey,
    sample_curve,
    tensor_to_pixels,
    top_indices,
)
from attribution import TOUR_SETTINGS as TOUR

st.title("Tour")
st.caption("Five steps through data attribution on the model in the sidebar (by default the shipped digits model): "
           "which training images made a generated image, and how we know. Press the buttons in order.")
keep("tour_seed", "tour_K", "tour_k")
model = require_model()
dataset = st.session_state.get("dataset")
with st.expander("Settings (shared with the Attribute page: the same settings reuse its cached features)"):
    c1, c2, c3 = st.columns(3)
    seed = int(c1.number_input("Seed of the image", 0, 2**31 - 1, TOUR.seed, key="tour_seed"))
    K = int(c2.number_input("Timesteps K", 1, model.num_timesteps, TOUR.timesteps, key="tour_K"))
    k = c3.selectbox("Projection k", PROJ_DIMS, index=PROJ_DIMS.index(TOUR.proj_dim), key="tour_k")
settings = TourSettings(seed, K, int(k))
prepare_panel(model.spec, dataset, settings, str(banks_dir()))
opts = settings.options(model.spec, dataset)
tour_id = (model.spec, dataset, seed, K, int(k))
tour = st.session_state.get("tour")
if not tour or tour["id"] != tour_id:  # other settings: start again
    tour = st.session_state["tour"] = {"id": tour_id}
size = display_size(model.resolution, 160)


def step(n: int, title: str, text: str, label: str, ready: bool = True, note=None) -> bool:
    """A step's title, text and button; `note()` is the estimate shown under the text (errors are Run's)."""
    st.subheader(f"{n}. {title}")
    st.markdown(text)
    if note is not None:
        try:
            st.caption(note())
        except AttributionError:
            pass
    return st.button(label, key=f"tour_go_{n}", type="primary", disabled=not ready,
                     help=None if ready else "Do the step before first.")


def attempt(fn):
    try:
        return fn()
    except AttributionError as exc:
        fail(exc)


# -- 1. generate --------------------------------------------------------------------------------------------------
if step(1, "Generate an image", "A diffusion model turns noise into an image in 50 small denoising steps. The seed "
        "fixes the noise, so the same seed always gives the same image (here, and as `gen:SEED` on the command line).",
        "Generate"):
    tour["pixels"] = attempt(lambda: generated_pixels(model.spec, seed))
if "pixels" in tour:
    st.image(pixels_to_pil(tour["pixels"], size), caption=f"gen:{seed}", output_format="PNG")

# -- 2. proponents and opponents --------------------------------------------------------------------------------
if step(2, "Which training images made it?", "D-TRAK compares the gradient of the model's loss on this image with "
        "the gradient on every training image. **Proponents** pushed the model toward this image (positive score), "
        "**opponents** away from it. The first run featurizes the whole training set (progress below); every later "
        "run, in any session, reuses it.", "Find proponents and opponents", "pixels" in tour,
        note=lambda: estimate_note([("D-TRAK", cached_attribution(opts))])):
    with st.status("Attributing…", expanded=True) as status:
        att = attempt(lambda: cached_attribution(opts))
        attempt(lambda: featurize_with_progress(att, "D-TRAK"))
        target = target_from_pixels(tour["pixels"], f"gen:{seed}")
        target.keys[0] = f"gen/{seed}"  # the CLI's noise key for gen:SEED, as on the Attribute page
        tour["result"] = attempt(lambda: att.run(target))  # featurized above: target features and default λ
        status.update(label="Done", state="complete", expanded=False)
if "result" in tour:
    att = cached_attribution(opts)
    scores = tour["result"].scores[0]  # the default λ
    record_scores(att.train, f"D-TRAK · gen:{seed}", scores)
    pro, opp = top_lists(scores, att.train, 5, 3)
    ranked_tiles(pro, att.train, "Proponents", "tour_pro")
    ranked_tiles(opp, att.train, "Opponents", "tour_opp")
    st.caption("Press Details under a tile to enlarge it, see its rank, or attribute it in turn.")

# -- 3. removal ---------------------------------------------------------------------------------------------------
st.subheader("3. What if they had not been there?")
st.markdown("A score is a prediction: remove the top proponents, retrain, and the model should be less likely to "
            "make this image. Retraining takes minutes per model, so it is not a button here: the Counterfactual "
            "page shows the studies run with `python -m attribution counterfactual` (before and after, side by "
            "side), and the Evaluation page measures how well each method's scores predict retraining on random "
            "subsets (the linear datamodeling score, LDS).")
try:
    c1, c2 = st.columns(2)
    c1.page_link("app_pages/counterfactual.py", label="Open the Counterfactual page", icon=":material/compare:")
    c2.page_link("app_pages/evaluation.py", label="Open the Evaluation page", icon=":material/fact_check:")
except StreamlitAPIException:  # a version of the app without the pages
    st.caption("The Counterfactual and Evaluation pages are not part of this version of the app.")

# -- 4. the journey -----------------------------------------------------------------------------------------------
if step(4, "Its journey", "Attribute every 10th denoising step: at each, the model's current guess of the final "
        "image (x̂0) is attributed. The sentence under the strip says when x̂0 takes shape, and how much of the last "
        "step's top proponents the earlier steps already hold.", "Follow its journey", "pixels" in tour,
        note=lambda: journey_note(cached_attribution(opts), settings.journey())):
    with st.status("Journey…", expanded=True) as status:
        jatt = attempt(lambda: cached_attribution(opts).members[0])  # the Attribute page's features and kernel
        attempt(lambda: featurize_job(jatt).watch(progress_bar(f"Featurizing {len(jatt.train)} training images")))
        cfg = settings.journey()
        tour["journey"] = attempt(lambda: run_journey(jatt, cfg, progress_bar("Journey"), name=f"gen:{seed}"))
        status.update(label="Done", state="complete", expanded=False)
if "journey" in tour:
    jatt = cached_attribution(opts).members[0]
    j = tour["journey"]
    S = j.result(cached_attribution(opts)).scores  # the tour's method (D-TRAK) at its default lambda
    x0 = tensor_to_pixels(torch.from_numpy(j.x0))
    with st.container(horizontal=True, gap="xsmall", key="tour_x0"):
        for s, pix in zip(j.steps, x0):
            st.image(pixels_to_pil(pix, display_size(model.resolution, 64)), caption=f"x̂0 at step {int(s)}",
                     output_format="PNG")
    top1 = top_indices(S, 1)[:, 0]
    tiles(jatt.train, [int(i) for i in top1], [f"step {int(s)} · #{int(i)}" for s, i in zip(j.steps, top1)],
          "tour_film", target=64)
    st.markdown(formation(j, S, jatt.train).summary())

# -- 5. the timestep bias -------------------------------------------------------------------------------------------
if step(5, "The timestep bias", "Gradients are not equally large at every noise level: the loss gradient of the "
        "same image changes by orders of magnitude across timesteps. Methods that add gradients up without "
        "normalising (TracIn) therefore favour training images drawn at large-gradient timesteps; the Timesteps "
        "page shows it on the whole training set.", "Measure gradient norms", "pixels" in tour):
    with st.spinner("Gradient norms at 25 timesteps…"):
        image = pixels_to_tensor(tour["pixels"])
        tour["curve"] = attempt(lambda: sample_curve(model, image, f"gen/{seed}", NormConfig(grid=25)))
if "curve" in tour:
    ts, norms = tour["curve"]
    chart(norm_curve_figure({model.spec: (ts, norms)}, {}, f"gen:{seed}: gradient norm versus timestep"),
          "tour_curve", f"tour-gradient-norm-gen-{seed}")
    st.caption(f"Largest at t = {int(ts[int(np.argmax(norms))])}, smallest at t = {int(ts[int(np.argmin(norms))])}: "
               f"a ratio of {norms.max() / max(norms.min(), 1e-30):.0f}.")
