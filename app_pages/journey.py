"""Journey: which training images guide each denoising step of one image (Journey-TRAK, per-step attribution)."""

import streamlit as st
import torch

from app_pages._attr import (
    PROJ_DIMS,
    Lambda,
    RunOptions,
    cached_attribution,
    featurize_job,
    journey_note,
    lambda_slider,
    option_widget,
    ranked_tiles,
    top_lists,
    verdict_controls,
)
from app_pages._figures import chart
from app_pages._journey import (
    WHY_DIFFERENT,
    attribute_overlap,
    choose_image,
    film_strip,
    journey_cli,
    toggle_play,
)
from app_pages._ui import display_size, fail, keep, progress_bar, require_model
from attribution import (
    DEFAULT_PROJ_DIM,
    METHODS,
    AttributionError,
    JourneyConfig,
    formation,
    formation_figure,
    pixels_to_pil,
    run_journey,
    tensor_to_pixels,
)

JOURNEY_METHODS = [m for m in METHODS if METHODS[m].per_step]  # the kernel methods that score single steps
N_PRO, N_OPP, FORMATION_TOP = 6, 3, 8


st.title("Journey")
st.caption("Attribution of every denoising step: at step t the model's guess of the clean image, x̂0, is re-noised "
           "to t and attributed (Journey-TRAK). The proponents change along the way, and the formation curve shows "
           "over which steps the image's features are decided.")
keep("jr_method", "jr_fwd_steps", "jr_every", "jr_R", "jr_K", "jr_k")  # the image: the current one (_image.py)
model = require_model()
dataset = st.session_state.get("dataset")
size = display_size(model.resolution, 128)

# -- 1. the image ------------------------------------------------------------------------------------------------
image, ref, name, prompt = choose_image(model, dataset)

# -- 2. options (no form: the estimate below is for what these widgets show; nothing runs until Compute) ----------
with st.container(border=True):
    c1, c3, c4 = st.columns(3)
    # labels, help and defaults from the schemas (JourneyConfig: the steps; RunOptions: the training features)
    method = option_widget(c1, "method", "jr_method", choices=JOURNEY_METHODS, format_func=lambda m: METHODS[m].title)
    T = model.num_timesteps
    steps = ref.steps if image is None else int(option_widget(
        c3, "steps", "jr_fwd_steps", schema=JourneyConfig, min_value=1, max_value=T,
        help="The image has no trajectory: it is noised to the timesteps of this many sampling steps."))
    every = int(option_widget(c4, "every", "jr_every", schema=JourneyConfig, value=5, min_value=1, max_value=T,
                              help="Counted back from the last step, which is always attributed."))
    c5, c6, c7 = st.columns(3)
    resamples = int(option_widget(c5, "resamples", "jr_R", schema=JourneyConfig, min_value=1, max_value=64,
                                  help="Noise draws of the re-noised x̂0 averaged per step (Journey-TRAK: 20)."))
    timesteps = int(option_widget(c6, "timesteps", "jr_K", label="Training-feature timesteps K", min_value=1,
                                  max_value=T))
    proj_dim = option_widget(c7, "proj_dim", "jr_k", choices=PROJ_DIMS, index=PROJ_DIMS.index(DEFAULT_PROJ_DIM))
    run = st.button("Compute journey", type="primary")

image_id = (model.spec, dataset, ref)
cfg = JourneyConfig(seed=ref.number if image is None else 0, steps=steps,
                    sampler=ref.sampler if image is None else None, every=every, resamples=resamples,
                    **prompt).for_model(model)
opts = RunOptions(model.spec, dataset, method, timesteps=timesteps, proj_dim=int(proj_dim))
if not run:
    try:
        cfg.check(model.schedule)
        st.caption(journey_note(cached_attribution(opts), cfg, image), help="The training features (once per "
                   "feature set, shared with the other pages) and the attributed steps' features.")
    except AttributionError:
        pass  # options that do not make a journey are reported by Compute, with the reason
if run:
    # One entry holds what was computed and its λ: a failed run must not leave an older journey labelled as this
    # one; a journey with the options of the previous one keeps its λ.
    previous = st.session_state.pop("jr_result", None)
    with st.status("Computing the journey…", expanded=True) as status:
        try:
            cfg.check(model.schedule)
            att = cached_attribution(opts).members[0]  # the Attribute page's features and kernel
            status.update(label="Training features (cached after the first run)…", expanded=True)
            featurize_job(att).watch(progress_bar(f"Featurizing {len(att.train)} training images"))
            status.update(label=f"Sampling and attributing {len(cfg.step_indices())} steps…", expanded=True)
            journey = run_journey(att, cfg, progress_bar("Journey"), image=image, name=name)
            _ = att.train_features().kernel  # decompose once; lambda changes are then instant
        except AttributionError as exc:
            status.update(state="error")
            fail(exc)
        status.update(label=f"Journey ready ({journey.meta['seconds']} s to compute, cached)", state="complete",
                      expanded=False)
    lam_state = Lambda.after(previous["lam"] if previous and previous["opts"] == opts else None)
    st.session_state["jr_result"] = {"id": image_id, "journey": journey, "opts": opts, "cfg": cfg, "lam": lam_state}
    st.session_state["jr_playing"] = False

result = st.session_state.get("jr_result")
if not result or result["id"] != image_id:
    st.info("Choose the options and press **Compute journey**. Journeys are cached on disk, so the slider below "
            "never recomputes; the first run for a feature configuration also featurizes the training set.")
    st.stop()

# -- 3. results -----------------------------------------------------------------------------------------------------
journey, opts, cfg = result["journey"], result["opts"], result["cfg"]
attribution = cached_attribution(opts)
att = attribution.members[0]
lam = lambda_slider("λ", att.train_features().kernel, result["lam"], "jr_lam")
verdict_controls(attribution, opts, result["lam"], lam, "jr_lam", "val" if image is not None else "gen",
                 ref.spec.replace(":", "/") if ref.kind in ("gen", "val") else None)  # a bank target's key
scores = journey.result(attribution).at(lam).scores
form = formation(journey, scores, att.train, top=FORMATION_TOP)
labels = [int(s) for s in journey.steps]
t_of = dict(zip(labels, (int(t) for t in journey.timesteps)))
st.markdown(f"**{journey.meta['name']}** · {METHODS[opts.method].title} · {cfg.sampler}, {cfg.steps} steps, "
            f"{len(journey)} attributed")
st.markdown(form.summary())
st.caption(WHY_DIFFERENT + attribute_overlap(opts.method, att.train.spec, journey.meta["name"], scores[-1]))
if st.session_state.get("jr_step") not in labels:
    st.session_state["jr_step"] = labels[-1]


playing = st.session_state.get("jr_playing", False)
st.button("Stop" if playing else "Play", icon=":material/stop:" if playing else ":material/play_arrow:",
          key="jr_play", on_click=toggle_play, args=(labels,), help="Step through the attributed steps.")


@st.fragment(run_every=0.8 if playing else None)
def step_panel() -> None:
    """The slider and everything that depends on the step: only this part reruns while scrubbing or playing."""
    # Advance only once the current step has been drawn to the end (`jr_shown`): a tick that interrupts a slow
    # run shows the same step again rather than skipping one.
    if st.session_state.get("jr_playing") and st.session_state.get("jr_shown") == st.session_state["jr_step"]:
        i = labels.index(st.session_state["jr_step"])
        if i + 1 >= len(labels):
            st.session_state["jr_playing"] = False
            st.rerun()  # the whole page: stops the timer
        st.session_state["jr_step"] = labels[i + 1]
    step = st.select_slider("Step (0 = pure noise)", labels, key="jr_step",
                            format_func=lambda s: f"{s} · t={t_of[s]}")
    i = labels.index(step)
    with st.container(horizontal=True, gap="small", key="jr_images"):
        for pix, caption in ((journey.xt_images()[i], f"x_t · step {step}, t={t_of[step]}"),
                             (journey.x0[i], f"x̂0 · distance {form.x0_distance[i]:.3f}"),
                             (journey.final, "final image")):
            st.image(pixels_to_pil(tensor_to_pixels(torch.from_numpy(pix)), size), caption=caption, width=size,
                     output_format="PNG")
    pro, opp = top_lists(scores[i], att.train, N_PRO, N_OPP)
    ranked_tiles(pro, att.train, f"Proponents at step {step}", "jr_pro")
    ranked_tiles(opp, att.train, f"Opponents at step {step}", "jr_opp")
    chart(formation_figure(form, current=step), "jr_formation", f"formation-{journey.meta['name']}")
    st.session_state["jr_shown"] = step


step_panel()

# -- 4. film strip: the top proponent of each step, downloads, the command line -------------------------------------
film_strip(journey, scores, form, att.train, labels, FORMATION_TOP)
st.code(journey_cli(opts, cfg, journey, att.train.spec, lam, forward=image is not None), language="bash",
        wrap_lines=True)
