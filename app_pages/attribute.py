"""Attribute: which training images pushed the model toward (or away from) a target image."""

import hashlib

import streamlit as st

from app_pages._attr import (
    METHOD_TITLES,
    OPTION,
    PROJ_DIMS,
    PROJECTORS,
    Column,
    ColumnTarget,
    Computed,
    Lambda,
    cached_attribution,
    choose_target,
    estimate_note,
    feature_fn_options,
    featurize_with_progress,
    lambda_controls,
    option_widget,
    ranked_tiles,
    result_footer,
    top_lists,
)
from app_pages._tiles import record_scores
from app_pages._ui import checkpoint_name, display_path, display_size, fail, keep, require_model
from attribution import (
    DEFAULT_PROJ_DIM,
    METHODS,
    RECOMMENDED_METHOD,
    AttributionError,
    RunOptions,
    agreement_caption,
    cache_root,
    pixels_to_pil,
    tensor_to_pixels,
)

st.title("Attribute")
st.caption("Proponents pushed the model toward the target (positive score); opponents pushed it away.")
keep("attr_method", "attr_fn", "attr_eta", "attr_K", "attr_strategy", "attr_k", "attr_projector", "attr_ckpt_weights",
     "attr_compare", "attr_compare_ckpt", "attr_npro", "attr_nopp")  # the target is the current image (_image.py)
model = require_model()
dataset = st.session_state.get("dataset")
size = display_size(model.resolution, 256)  # a large target

# -- 1. the target -----------------------------------------------------------------------------------------------
st.subheader("Target")
target, target_spec, ref = choose_target(model)
# What the stored results belong to: results for another target, checkpoint or dataset are never shown as this one's.
target_id = (model.spec, dataset, target_spec, target.keys[0],
             hashlib.sha256(target.images.numpy().tobytes()).hexdigest()[:16])
st.image(pixels_to_pil(tensor_to_pixels(target.images[0]), size), output_format="PNG",
         caption=ref.describe(target_spec if ref.kind == "upload" else None)
         + (f" · label {target.labels[0]}" if target.labels[0] else ""))

# -- 2. method and options (a form: nothing runs until Run) --------------------------------------------------------
st.subheader("Method")
c1, c2, c3 = st.columns(3)  # outside the form: what they choose decides which other controls apply
method = option_widget(c1, "method", "attr_method",
                       format_func=lambda m: METHOD_TITLES[m] + (" (recommended)" if m == RECOMMENDED_METHOD else ""))
st.caption(METHODS[method].summary[:1].upper() + METHODS[method].summary[1:] + "."  # what it measures; under the
           + (" Recommended with the avg output: the best LDS of the gradient methods on both banks."  # row
              if method == RECOMMENDED_METHOD else ""))
fn, eta = None, None
if len(METHODS[method]().fn_choices()) > 1:
    fn = option_widget(c2, "fn", "attr_fn", choices=feature_fn_options(method))
    if fn == "interp":
        eta = c3.slider(OPTION["eta"].label, 0.0, 1.0, 1.0, 0.05, key="attr_eta", help=OPTION["eta"].help)
with st.container(border=True):  # no form: the estimate below is for what these widgets show
    c4, c5, c6, c7 = st.columns(4)
    timesteps = option_widget(c4, "timesteps", "attr_K", min_value=1, max_value=model.num_timesteps)
    fixed_strategy = METHODS[method].strategy  # a method that fixes its timesteps has no strategy to choose
    strategy = (option_widget(c5, "strategy", "attr_strategy") if fixed_strategy is None
                else c5.caption(f"{OPTION['strategy'].label}: **{fixed_strategy}**") or fixed_strategy)
    proj_dim = option_widget(c6, "proj_dim", "attr_k", choices=PROJ_DIMS, index=PROJ_DIMS.index(DEFAULT_PROJ_DIM))
    projector = option_widget(c7, "projector", "attr_projector", choices=PROJECTORS)
    c8, c9, c10 = st.columns(3)
    ckpt_weights = None if not METHODS[method].weightings else option_widget(
        c10, "checkpoint_weights", "attr_ckpt_weights", choices=METHODS[method].weightings,
        format_func={"lr": "learning rate (default)", "uniform": "uniform (D-TRAK A.3)"}.get)
    compare = c8.selectbox("Compare with method", ["(none)", *METHODS], key="attr_compare",
                           format_func=lambda m: METHOD_TITLES.get(m, m))
    siblings = model.info.siblings if model.info else []
    compare_ckpt = c9.selectbox("…or with checkpoint", ["(none)", *[s for s in siblings if s != model.spec]],
                                key="attr_compare_ckpt", format_func=checkpoint_name)
    run = st.button("Run attribution", type="primary")


def options_for(method_name: str, checkpoint: str) -> RunOptions:
    """A column's options: the form's values that apply to its method (`RunOptions.for_method`: a pixel-similarity
    column ignores K and k rather than refusing them)."""
    cls = METHODS[method_name]
    chosen_fn = (fn or cls().fn_choices()[0]) if len(cls().fn_choices()) > 1 else None
    return RunOptions.for_method(method_name, checkpoint=checkpoint, dataset=dataset, fn=chosen_fn,
                                 eta=eta if chosen_fn == "interp" else None, timesteps=int(timesteps),
                                 strategy=strategy, proj_dim=int(proj_dim), projector=projector,
                                 checkpoint_weights=ckpt_weights if ckpt_weights in cls.weightings else None)


# The columns Run would compute: each attributes the same pixels, with its own options.
shown_target = ColumnTarget.of(target, target_spec)
columns = [Column(METHOD_TITLES[method], options_for(method, model.spec), shown_target)]
if compare not in ("(none)", method):  # comparing a method with itself would repeat its column (and widget keys)
    columns.append(Column(METHOD_TITLES[compare], options_for(compare, model.spec), shown_target))
if compare_ckpt != "(none)":
    columns.append(Column(f"{METHOD_TITLES[method]} @ {checkpoint_name(compare_ckpt)}",
                          options_for(method, compare_ckpt), shown_target.on_another_checkpoint(model.spec)))

if not run:
    try:
        st.caption(estimate_note([(c.title, cached_attribution(c.opts)) for c in columns]), help="Every column "
                   "featurizes the training set with its own options once (cached, shared by all sessions).")
    except AttributionError:
        pass  # options that do not make an attribution are reported by Run, with the reason
if run:
    # One entry holds what was computed (target, columns, λ): a failed run leaves none, never older results
    # labelled as this target's; a column with the options of a previous one keeps its λ.
    previous = st.session_state.pop("attr_computed", None)
    with st.status("Attributing…", expanded=True) as status:
        try:
            for c in columns:
                METHODS[c.opts.method]().check_targets(c.target.targets)  # before featurizing (no trajectory)
                att = cached_attribution(c.opts)
                status.update(label=f"{c.title}: training features (cached after the first run)…", expanded=True)
                for member in att.members:
                    st.caption(f"{c.title}: cache `{display_path(member.store_path)}`")
                if len(att.members) > 1:
                    st.caption(f"{c.title} over {len(att.members)} checkpoints, weighted by {att.weights_note}: "
                               + ", ".join(f"{checkpoint_name(a.model.spec)} {w:.3g}"
                                           for a, w in zip(att.members, att.weights)))
                featurize_with_progress(att, c.title)
                status.update(label=f"{c.title}: kernel and target features…", expanded=True)
                c.result = att.run(c.target.targets)  # the kernel is decomposed once: later λ changes are instant
                c.lam = Lambda.after(previous and previous.lambda_of(c.opts))
        except AttributionError as exc:
            status.update(state="error")
            fail(exc)
        status.update(label="Done", state="complete", expanded=False)
    st.session_state["attr_computed"] = Computed(target_id, target_spec, columns)

computed: Computed | None = st.session_state.get("attr_computed")
if computed is None or computed.target_id != target_id:
    st.info("Pick the options and press **Run attribution**. The first run for a checkpoint and feature "
            "configuration featurizes the whole training set (progress shown, cached in "
            f"`{display_path(cache_root())}`, "
            "resumable).")
    st.stop()

# -- 3. results: lambda slider re-scores instantly -------------------------------------------------------------------
st.subheader("Results")
n_pro = st.slider("Proponents shown", 1, 16, 5, key="attr_npro")
n_opp = st.slider("Opponents shown", 0, 16, 3, key="attr_nopp")
for i, (col, c) in enumerate(zip(st.columns(len(computed.columns)), computed.columns)):
    with col, st.container(key=f"attr_result_{i}"):
        st.markdown(f"#### {c.title}")
        try:
            att = cached_attribution(c.opts)
            lam = lambda_controls(c.result, c.opts, c.lam, f"attr_lam_{i}", c.title)
            scores = c.result.at(lam).scores[0]
        except AttributionError as exc:
            fail(exc)
        record_scores(att.train, f"{c.title} · {computed.target_spec}", scores)
        if i == 0:
            first_scores = scores
        else:  # a comparison column: how far it agrees with the first
            st.caption(agreement_caption(scores, first_scores, n_pro, computed.columns[0].title))
        pro, opp = top_lists(scores, att.train, n_pro, n_opp)
        ranked_tiles(pro, att.train, "Proponents", f"attr_pro_{i}")
        if n_opp:
            ranked_tiles(opp, att.train, "Opponents", f"attr_opp_{i}")
        result_footer(i, c, att, scores, lam, n_pro, pro)
