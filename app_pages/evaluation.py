"""Evaluation: how far to trust a ranking. LDS of each method on a ground-truth bank, with ceilings and CIs."""

import numpy as np
import pandas as pd
import streamlit as st

from app_pages._attr import PROJECTORS, featurize_with_progress, option_widget
from app_pages._eval import (
    bank_attribution,
    bank_run,
    cached_bank,
    checkpoint_curve,
    checkpoint_figure,
    checkpoint_note,
    estimators_section,
    evaluation_note,
    feature_flags,
    lambda_curve,
    open_target,
    table_rows,
)
from app_pages._ui import cached_model, fail, go_to
from attribution import EVALUATION_SETTINGS as EVALUATION
from attribution import (
    method_entries,
    SINGLE_SEED,
    AttributionError,
    Bank,
    bank_for_model,
    holm,
    lds_lambda_figure,
    lds_table,
    list_banks,
    per_target_figure,
    split_rows,
)

st.title("Evaluation")
st.caption("The linear datamodeling score (LDS): for each target, the Spearman correlation between the loss change a "
           "method predicts for a random half of the training set and the loss change measured by actually "
           "retraining on it, averaged over targets. Read every figure against the reachable ceiling: what a perfect "
           "method would score on this bank.")
banks = list_banks()
if not banks:
    st.info("No ground-truth bank yet. Build one with `python -m attribution bank build --name digits "
            "--recipe digits-eval` (resumable; it retrains models on random halves of the training set).")
    st.stop()


def bank_of_sidebar_model(banks: list[str]) -> int:
    """The page opens on the bank built for the sidebar's checkpoint when there is one (digits-flow's for
    digits-flow), else on the first listed (CRN and α = 0.5 first)."""
    try:
        found = bank_for_model(cached_model(st.session_state.get("checkpoint", "")).identity())
    except AttributionError:  # the sidebar says why the checkpoint does not load
        return 0
    return banks.index(found) if found in banks else 0


name = st.selectbox("Bank", banks, index=bank_of_sidebar_model(banks), key="eval_bank", bind="query-params")
try:
    bank: Bank = cached_bank(name)
except AttributionError as exc:
    fail(exc)
st.caption(bank.summary().replace(f"{bank.path.parent}/", "").replace("\n", "  \n"))  # no absolute paths

with st.form("eval_form"):
    c1, c2, c3 = st.columns([3, 1, 1])
    methods = c1.multiselect("Methods", method_entries(), default=list(EVALUATION.methods), key="eval_methods",
                             help="Each is computed on the bank's own model and training set. METHOD:FN is a method "
                                  "with another output function: dtrak:avg is the recommended D-TRAK Avg.")
    Ks, ks = [1, 2, 5, 10, 20, 50, 100], [512, 1024, 2048, 4096, 8192]
    timesteps = c2.selectbox("K (timesteps)", Ks, index=Ks.index(EVALUATION.timesteps), key="eval_K",
                             help="Timesteps the features average over (the paper's K).")
    proj_dim = c3.selectbox("k (projection)", ks, index=ks.index(EVALUATION.proj_dim), key="eval_k")
    with st.expander("More feature options (those of the Attribute page and `score`)"):
        e1, e2, e3, e4 = st.columns(4)
        more = {"noises": int(option_widget(e1, "noises", "eval_noises", min_value=1, max_value=64)),
                "strategy": option_widget(e2, "strategy", "eval_strategy"),
                "seed": int(option_widget(e3, "seed", "eval_seed", min_value=0)),
                "projector": option_widget(e4, "projector", "eval_projector", choices=PROJECTORS)}
    run = st.form_submit_button("Evaluate", type="primary")
# every method takes the options of its kind (pixel similarity: none of them)
features = (("timesteps", timesteps), ("proj_dim", proj_dim), *more.items())
split = st.radio("Targets", ["val", "gen"], horizontal=True, key="eval_split",
                 format_func={"val": "validation images", "gen": "generated images"}.get)

if run:
    st.session_state["eval_ready"] = (name, tuple(methods), features)
ready = st.session_state.get("eval_ready")
if not ready or ready[0] != name:
    st.info("Pick methods and press **Evaluate**: features are computed once per method and cached.")
    try:
        st.caption(evaluation_note(name, methods, features),
                   help="For the options as the form was last submitted.")
    except AttributionError:
        pass  # options that do not make an attribution are reported by Evaluate, with the reason
    st.stop()
_, methods, features = ready
runs = {}
with st.status("Scoring the bank's targets…", expanded=True) as status:
    for m in methods:
        try:
            featurize_with_progress(bank_attribution(name, m, features), m)
            runs[m] = bank_run(name, m, features)
        except AttributionError as exc:
            st.warning(f"{m}: {exc}")
    status.update(label="Scores ready", state="complete", expanded=False)
if not runs:
    st.stop()

# -- the LDS table -------------------------------------------------------------------------------------------------
table = lds_table(bank, {m: r.scores for m, r in runs.items()}, split)
st.subheader("LDS with its noise ceilings")
for m in [m for m, r in runs.items() if not r.covers(split)]:
    st.caption(f"{m} attributes generated images only (along their sampling trajectory): see the generated targets.")
st.dataframe(pd.DataFrame(table_rows(table)), hide_index=True, width="stretch")
st.caption(("Reachable: what a perfect method would score against these retrained models (their seeds averaged); "
            "the seed-vs-seed figure, one retrain against another, is lower and can be exceeded. "
            if table.ceilings.seed is not None else SINGLE_SEED[:1].upper() + SINGLE_SEED[1:] + ". ")
           + f"Common mode: {table.common_mode_share:.0%} of F's variance across retrained models is shared by all "
           "targets (a model that is better or worse everywhere). The centered LDS removes it; the standard one is "
           "the paper's figure. CIs: two-way bootstrap over retrained models and targets (targets share the models).")
diffs = table.differences() if len(table.methods) > 1 else []
for d, confirmed in zip(diffs, holm(diffs)):
    verdict = (("a real difference" if confirmed else "real on its own, not after correcting for the "
                f"{len(diffs)} comparisons (Holm)") if d.real else "within the benchmark's noise")
    st.write(f"{d.a} − {d.b}: {d.difference:+.3f} [{d.ci_two_way[0]:+.3f}, {d.ci_two_way[1]:+.3f}] → {verdict}")
if len(table.methods) > 1:
    held = table.best_held_out()
    st.caption(f"Best method chosen on half of the targets and scored on the other half: {held.chosen[0]} "
               f"({held.held_out[0]:+.3f}), and with the halves swapped {held.chosen[1]} ({held.held_out[1]:+.3f}).")
st.download_button("LDS table (CSV)", pd.DataFrame(table_rows(table)).to_csv(index=False),
                   f"lds-{name}-{split}.csv", "text/csv")
st.code(f"python -m attribution lds --bank {name} --method {','.join(runs)} --split {split} "
        f"{feature_flags(features)}", language="bash")

# -- λ ---------------------------------------------------------------------------------------------------------------
lam_methods = [m for m, r in runs.items() if r.uses_lambda and r.covers(split)]
if lam_methods:
    st.subheader("LDS versus λ")
    m = st.selectbox("Method", lam_methods, key="eval_lam_method")
    curve = lambda_curve(name, m, features, split)
    lam = st.select_slider("λ", curve["lambdas"].tolist(), value=curve["default"], key=f"eval_lam_{m}",
                           format_func=lambda v: f"{v:.3g}")
    i = int(np.argmin(np.abs(np.log(curve["lambdas"] / lam))))
    c1, c2, c3, c4 = st.columns(4)
    c1.metric("LDS at this λ", f"{curve['standard'][i]:+.3f}")
    c2.metric("default λ", f"{curve['default']:.3g}", f"LDS {curve['at_default']:+.3f}", delta_color="off")
    c3.metric("retraining-free λ (GCV)", f"{curve['gcv']:.3g}", f"LDS {curve['at_gcv']:+.3f}", delta_color="off")
    held = curve["held_out"]
    c4.metric("λ chosen on held-out targets", f"{held.chosen[0]:.3g} / {held.chosen[1]:.3g}",
              f"LDS {held.value:+.3f}", delta_color="off",
              help=f"λ chosen on one half of the targets, LDS on the other half (both ways: {held.held_out[0]:+.3f}, "
                   f"{held.held_out[1]:+.3f}). The optimum on all targets, {curve['best']:.3g} → LDS "
                   f"{curve['at_best']:+.3f}, is optimistic: it is chosen on the targets it reports.")
    marks = {"default": curve["default"], "GCV": curve["gcv"], "optimal": curve["best"], "current": lam}
    ceilings = {"reachable": curve["reachable"], "seed-vs-seed (lower)": curve["ceiling"]}
    st.plotly_chart(lds_lambda_figure(curve["lambdas"], curve["standard"], curve["centered"], curve["ci"], marks,
                                      ceilings, f"{m}: LDS versus λ ({split} targets)"), key="eval_lam_fig")
    st.download_button("LDS versus λ (CSV)", pd.DataFrame({k: curve[k] for k in ("lambdas", "standard", "centered")})
                       .to_csv(index=False), f"lds-lambda-{name}-{m}-{split}.csv", "text/csv")
    st.code(f"python -m attribution lds --bank {name} --method {m} --split {split} --sweep lambda", language="bash")

# -- per checkpoint ------------------------------------------------------------------------------------------------
st.subheader("LDS per checkpoint")
if bank.run_dir is None:
    st.caption(f"Attributions from earlier checkpoints need the bank's checkpoint run: `python -m attribution bank "
               f"checkpoints --name {name}` (retrains the full model once, saving intermediate epochs).")
else:
    m = st.selectbox("Method", [x for x in runs if x in lam_methods] or list(runs), key="eval_ckpt_method")
    if st.button("Compute LDS per checkpoint", key="eval_ckpt_run",
                 help="Featurizes the training set at each checkpoint once (cached on disk, shared by everyone)."):
        st.session_state["eval_ckpt"] = (name, m, features)
    if st.session_state.get("eval_ckpt") != (name, m, features):
        try:
            line, per_checkpoint = checkpoint_note(name, m, features)
            st.caption(line, help=per_checkpoint)
        except AttributionError as exc:
            st.caption(f"No LDS per checkpoint for {m}: {exc}")
    else:
        points = checkpoint_curve(name, m, features)
        fig, frame = checkpoint_figure(points, m)
        st.plotly_chart(fig, key="eval_ckpt_fig")
        st.download_button("LDS per checkpoint (CSV)", frame.to_csv(index=False), f"lds-ckpt-{name}-{m}.csv",
                           "text/csv")
    st.code(f"python -m attribution lds --bank {name} --method {m} --sweep checkpoint {feature_flags(features)}",
            language="bash")

estimators_section(name, tuple(runs), features, split)

# -- per target ------------------------------------------------------------------------------------------------------
st.subheader("Per target")
per_target = {k: r.standard.per_target for k, r in table.methods.items()}
st.plotly_chart(per_target_figure(per_target, f"Spearman per {split} target"), key="eval_per_target")
st.download_button("Spearman per target (CSV)", pd.DataFrame({"target": [bank.target_keys[r] for r in
                                                                         split_rows(bank, split)], **per_target})
                   .to_csv(index=False), f"lds-per-target-{name}-{split}.csv", "text/csv")
first = next(iter(table.methods))
worst = np.argsort(table.methods[first].standard.per_target)[:8]
rows = split_rows(bank, split)
st.caption(f"The targets {first} predicts worst (Spearman over the retrained models); open one to see its ranking:")
cols = st.columns(len(worst))
for col, w in zip(cols, worst):
    key = bank.target_keys[rows[w]]
    col.image(((bank.target_images[rows[w]].transpose(1, 2, 0).squeeze() + 1) * 127.5).clip(0, 255)
              .astype(np.uint8), width=64, caption=f"{key} · {table.methods[first].standard.per_target[w]:+.2f}")
    # The callback sets the sidebar and the Attribute page's target before the next run draws any widget (the
    # sidebar's are drawn before this page, so setting them here would raise); that run opens the page.
    if col.button("attribute", key=f"eval_open_{key}", on_click=open_target, args=(bank, key),
                  help="Open this target on the Attribute page, with the bank's model and training set"):
        go_to("app_pages/attribute.py")
