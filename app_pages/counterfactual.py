"""Counterfactual: remove the training images a method blames for a generated image, retrain, regenerate, compare."""

import numpy as np
import pandas as pd
import streamlit as st

from app_pages._counterfactual import (
    EXAMPLE,
    boxplot_figure,
    cached_study,
    difference_map,
    dose_figure,
    label,
    stamp,
    study_folders,
)
from app_pages._figures import chart
from app_pages._ui import cached_dataset, display_size, fail, image_grid
from attribution import COUNTERFACTUAL_CONTROL as CONTROL
from attribution import COUNTERFACTUAL_METRICS as METRICS
from attribution import COUNTERFACTUAL_RANDOM as RANDOM
from attribution import AttributionError, best_supported, dose_response
from attribution import counterfactual_per_target as per_target
from attribution import counterfactual_rows as summary_rows
from attribution import counterfactual_seed_noise as seed_noise
from attribution import counterfactual_verdict as verdict

st.title("Counterfactual")
st.caption("The D-TRAK paper's visual test: remove a method's top proponents of a generated image, retrain, "
           "regenerate from the same noise. Finding the images that made it should change it more than removing as "
           "many random ones.")
lead = st.container()  # the verdict, once the study and its removal are chosen
folders = study_folders()
if not folders:
    st.info("No counterfactual study yet. Run one (resumable; each removal is one retrain):")
    st.code(EXAMPLE, language="bash")
    st.stop()
folder = st.selectbox("Study", folders, format_func=label, key="cf_study")
try:
    study = cached_study(folder, stamp(folder))
except AttributionError as exc:
    fail(exc)
if not study.cells:
    st.info("This study has no finished cell yet; rerun its command to continue it.")
    st.code(study.cli_line(), language="bash")
    st.stop()

for w in study.meta.get("warnings", [])[:5]:
    st.warning(w.removeprefix("warning: "))
cells = study.cells
n_train = int(study.meta["n_train"])
directions = sorted({c["direction"] for c in cells}, key=["proponents", "opponents", "control"].index)
c1, c2, c3, c4 = st.columns(4)
direction = c1.selectbox("Removed", directions, key="cf_direction", help="proponents: the images the method says "
                         "made the target more likely; opponents: the reverse test")
ks = sorted({int(c["k"]) for c in cells if c["direction"] == direction})
done = {v: sum(c["direction"] == direction and int(c["k"]) == v for c in cells) for v in ks}
k = c2.selectbox("K (images removed)", ks, key="cf_k", format_func=lambda v: f"{v} ({v / n_train:.1%})",
                 index=max(range(len(ks)), key=lambda i: (done[ks[i]], ks[i])),  # the K with the most finished
                 help="Opens on the K with the most finished cells (a removal still being retrained has fewer).")
seeds = sorted({int(c["seed"]) for c in cells})
seed = c3.selectbox("Retraining seed", seeds, key="cf_seed", help="The first is the model's own seed; the next "
                    "retrains the same removal again (the change a seed alone makes).")
metrics = [m for m in METRICS if any(c.get(m) is not None for c in cells)]
metric = c4.selectbox("Measure", metrics, key="cf_metric", format_func=METRICS.get)
here = [c for c in cells if c["direction"] == direction and int(c["k"]) == k and int(c["seed"]) == seed]
methods = sorted({c["method"] for c in here}, key=lambda m: (m != RANDOM, m))
rows_all = summary_rows(study)
best = best_supported(rows_all, direction, k, seed)
c1, c2 = st.columns(2)
method = c1.selectbox("Method", methods, key="cf_method", index=methods.index(best) if best in methods else
                      len(methods) - 1, help="Starts on the method this study supports best: the highest lower end "
                      "of the paired interval of its pixel-L2 change beyond random removal.")
shown = method if verdict(rows_all, method, direction, k, seed, n_train) else best  # random has no verdict
said = shown and verdict(rows_all, shown, direction, k, seed, n_train)
with lead:
    if said:
        whose = "the method this study supports best" if shown == best else "the method chosen below"
        st.markdown(f"**Verdict** ({whose}): {said}")
    else:
        st.caption("No method of this removal is paired with random removal on the same targets: no verdict.")
targets = sorted({int(c["target"]) for c in here if c["method"] == method})
target = c2.selectbox("Target", targets, key="cf_target", format_func=lambda t: f"gen:{t}")
cell = next(c for c in here if c["method"] == method and int(c["target"]) == target)

# -- before / after ---------------------------------------------------------------------------------------------------
try:  # a damaged file of the study: one line that says how to remake it
    before = study.before(target)
    removed, after = study.cell_arrays(cell)
except AttributionError as exc:
    fail(exc)
diff, scale = difference_map(before, after)
size = display_size(before.shape[0], 160)
image_grid([before, after, diff], [f"before (gen:{target})", f"after: {method} removed {k}, seed {seed}",
                                   f"difference |after − before| ×{scale}"], size, key="cf_pair")
rnd = next((c for c in here if c["method"] == RANDOM and int(c["target"]) == target), None)
cols = st.columns(len(metrics))
for col, m in zip(cols, metrics):
    if cell.get(m) is None:
        continue
    delta = None if rnd is None or method == RANDOM or rnd.get(m) is None else f"{cell[m] - rnd[m]:+.3f} vs random"
    col.metric(METRICS[m], f"{cell[m]:.3f}", delta, delta_color="normal" if m == "l2" else "inverse",
               help="pixel L2 over [0, 1] values: larger = more change; SSIM and CLIP cosine: smaller = more change")
if cell.get("identical"):
    st.success("The regenerated image is bit for bit the original." + (
        " Nothing was removed and the seed is the model's own: retraining reproduces the original model."
        if method == CONTROL else ""))

# -- the removed images ----------------------------------------------------------------------------------------------
if len(removed):
    data = cached_dataset(study.meta["dataset"])
    shown = removed[:32]
    st.subheader(f"The {len(removed)} removed training images" + (" (first 32, strongest first)"
                                                                  if len(removed) > 32 else ""))
    image_grid(data.pixels[shown], [f"removed #{r + 1} · train #{i} · class {data.label_name(int(i))}"
                                    for r, i in enumerate(shown)], display_size(data.resolution, 64), key="cf_removed")

# -- across targets ----------------------------------------------------------------------------------------------------
st.subheader("Across targets")
values = dict(sorted(per_target(study, metric, direction, k, seed).items(), key=lambda kv: (kv[0] != RANDOM, kv[0])))
chart(boxplot_figure(values, metric, f"{METRICS[metric]} after removing {k} images ({direction}), seed {seed}"),
      key="cf_box", name="counterfactual-boxplot")
rows = [r for r in rows_all if r["direction"] == direction and r["k"] == k and r["seed"] == seed]
table = pd.DataFrame([{"method": r["method"], "targets": r["targets"],
                       **{f"median {METRICS[m]}": r.get(f"{m}_median") for m in metrics},
                       "L2 − random (mean)": r.get("l2_vs_random"),
                       "95% CI": (f"[{r['l2_vs_random_ci_low']:+.3f}, {r['l2_vs_random_ci_high']:+.3f}]"
                                  if r.get("l2_vs_random") is not None else ""),
                       "Wilcoxon p": r.get("l2_vs_random_p")} for r in rows])
st.dataframe(table, hide_index=True, width="stretch")
st.caption("Paired over the same targets: the mean per-target difference from random removal with a 95% "
           "bootstrap interval over targets, and the Wilcoxon signed-rank test. With few targets read the interval, "
           "not a single image.")
noise = [s for s in seed_noise(study) if s["direction"] in (direction, "control")]
if noise:
    st.caption("Retraining-seed noise (the same removal retrained with the next seed): " + "; ".join(
        f"{s['method']} K={s['k']}: median L2 {s['l2_median']:.3f}" for s in noise))
curves = dose_response(study, metric, direction, seed)
if any(len(v) > 1 for v in curves.values()):
    chart(dose_figure({m: v for m, v in curves.items() if m != CONTROL}, metric, n_train,
                      f"Dose-response: median {METRICS[metric]} versus K"), key="cf_dose", name="counterfactual-dose")
st.code(study.cli_line(), language="bash")
st.caption(f"{len(cells)} finished cells; rerun the command to add targets, methods or removal sizes (finished "
           f"models and cells are reused). Status: {study.meta.get('status', '?')}.")
if np.any([c.get("train_seconds") for c in cells]):
    secs = [c["train_seconds"] for c in cells if c.get("train_seconds")]
    st.caption(f"Retraining cost: median {np.median(secs) / 60:.1f} min per model on "
               f"{cells[0].get('hardware', '?')}.")
