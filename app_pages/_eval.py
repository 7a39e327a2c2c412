"""UI code of the Evaluation page: cached banks and bank runs, the λ curve, table rows, the callback that opens a
bank target on the Attribute page. Not a page.

A `Result` (the engine's) holds one method's target features on a bank (its attribution keeps the kernel
decomposition), so the λ slider re-scores in milliseconds; it is shared by all sessions (`st.cache_resource`) and
only read.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import streamlit as st

from app_pages._ui import cached_model
from attribution import (
    BUILTIN_DATASETS,
    Attribution,
    AttributionError,
    Bank,
    Result,
    LdsTable,
    RunOptions,
    SweepPoint,
    checkpoint_tasks,
    estimate_text,
    fields_of,
    format_duration,
    heldout_lds_table,
    key_prompt,
    lambda_report,
    lds_option_figure,
    open_on_bank,
    option_sweep,
    run_on_bank,
    share_measured_rate,
)
from attribution import PreparationTask as Task
from attribution import preparation_estimates as estimates


def feature_flags(features: tuple) -> str:
    """The command-line flags of the evaluation's feature options (RunOptions fields as (name, value) pairs, the
    key of every cached result here): K and k always, the others where not the default (flags from the schema)."""
    spec = {s.name: s for s in fields_of(RunOptions)}
    return " ".join(f"{spec[k].flag} {v}" for k, v in features
                    if k in ("timesteps", "proj_dim") or v != spec[k].default)


@st.cache_resource(max_entries=4, show_spinner="Loading the bank…")
def cached_bank(name: str) -> Bank:
    return Bank.load(name)


@st.cache_resource(max_entries=12, show_spinner=False)
def bank_attribution(name: str, method: str, features: tuple) -> Attribution:
    """`method` on bank `name`'s model and training set (validated; featurized separately, in the background)."""
    return open_on_bank(cached_bank(name), method, **dict(features), load=cached_model)


def evaluation_note(name: str, methods, features: tuple) -> str:
    """Before Evaluate: per method, cached, or about how long its training features and the bank's target
    features will take here (from the throughput measured for that kind of features)."""
    total, lines = estimate_text([Task(m, bank_attribution(name, m, features), bank=cached_bank(name))
                                  for m in methods])
    return ("Before the first Evaluate here: " + "; ".join(lines.splitlines())
            + (f". About {format_duration(total)} in all on this machine." if total else "."))


@st.cache_resource(max_entries=8, show_spinner=False)
def checkpoint_plan(name: str, method: str, features: tuple) -> list[Task]:
    """What the LDS per checkpoint computes, one task per checkpoint of bank `name`'s run (opened, not computed)."""
    return checkpoint_tasks(cached_bank(name), method, load=cached_model, **dict(features))


def checkpoint_note(name: str, method: str, features: tuple) -> tuple[str, str]:
    """(one line, one line per checkpoint) before the LDS per checkpoint: cached, or how many checkpoints still
    need their features and about how long that takes here, from the measured throughput."""
    tasks = checkpoint_plan(name, method, features)
    share_measured_rate(tasks)
    total, rows = estimates(tasks, probe=False)
    todo = sum(text != "cached" for _, text in rows)
    per = "  \n".join(f"{title}: {text}" for title, text in rows)
    if not todo:
        return f"Every checkpoint's features are cached ({len(tasks)}): this takes seconds.", per
    if total is None:
        return (f"{todo} of {len(tasks)} checkpoints to featurize; no estimate yet: none has been timed with these "
                "features here (Evaluate times the last).", per)
    return (f"{todo} of {len(tasks)} checkpoints to featurize (the training set and the bank's targets each): about "
            f"{format_duration(total)} here.", per)


@st.cache_resource(max_entries=12, show_spinner="Scoring the bank's targets…")
def bank_run(name: str, method: str, features: tuple) -> Result:
    """One method's target features of every target of bank `name` (after `featurize_with_progress`)."""
    return run_on_bank(cached_bank(name), bank_attribution(name, method, features))


@st.cache_data(max_entries=32, show_spinner="Sweeping λ…")
def lambda_curve(name: str, method: str, features: tuple, split: str) -> dict:
    """LDS along the kernel's λ grid with the default, retraining-free (GCV) and optimal λ and their LDS."""
    r = lambda_report(cached_bank(name), bank_run(name, method, features), split)
    return {"lambdas": r.sweep.lambdas, "standard": r.sweep.standard, "centered": r.sweep.centered,
            "ci": r.sweep.standard_ci_targets, "default": r.default, "gcv": r.gcv, "best": r.best,
            "at_default": r.at(r.default), "at_gcv": r.at(r.gcv), "at_best": r.at(r.best), "ceiling": r.ceiling,
            "reachable": r.reachable, "held_out": r.held_out}


@st.cache_resource(max_entries=8, show_spinner="Featurizing each checkpoint (once)…")
def checkpoint_curve(name: str, method: str, features: tuple) -> list[SweepPoint]:
    """LDS of attributions from each checkpoint of the bank's run, against the final model's bank."""
    return option_sweep(cached_bank(name), method, "checkpoint", splits=("val", "gen"), n_resamples=200,
                        **dict(features))


def checkpoint_figure(points: list[SweepPoint], method: str):
    """The per-checkpoint figure and its table (checkpoint, split, LDS, CI)."""
    splits = list(points[0].tables)
    lines = {sp: (np.array([p.tables[sp].methods[method].standard.value for p in points]),
                  np.array([p.tables[sp].methods[method].standard.ci_two_way for p in points])) for sp in splits}
    ceiling = {sp: (c.standard.value if (c := points[0].tables[sp].ceilings.reachable) is not None else None)
               for sp in splits}
    frame = pd.DataFrame([{"checkpoint": p.value, "split": sp, "lds": p.tables[sp].methods[method].standard.value,
                           "low": p.tables[sp].methods[method].standard.ci_two_way[0],
                           "high": p.tables[sp].methods[method].standard.ci_two_way[1]}
                          for p in points for sp in splits])
    return lds_option_figure([p.value for p in points], lines, "checkpoint", ceiling,
                             f"{method}: LDS of attributions from each checkpoint"), frame


def table_rows(table: LdsTable) -> list[dict]:
    """The LDS table as display rows: value with its two-way CI, standard and centered, and each method's share of
    the reachable ceiling with its interval."""
    out = []
    for r in table.rows():
        def fmt(variant, r=r):
            lo, hi = r[f"{variant}_ci_two_way_low"], r[f"{variant}_ci_two_way_high"]
            return f"{r[variant]:+.3f}" + (f"  [{lo:+.3f}, {hi:+.3f}]" if np.isfinite(lo) else "")

        def share(variant, r=r):
            s = table.of_reachable(r["name"], variant) if r["kind"] == "method" else None
            return "" if s is None else f"{s[0]:.0%}  [{s[1][0]:.0%}, {s[1][1]:.0%}]"
        out.append({"": r["name"], "kind": r["kind"], "LDS [95% CI]": fmt("standard"),
                    "of reachable": share("standard"), "centered LDS [95% CI]": fmt("centered"),
                    "centered, of reachable": share("centered")})
    return out


@st.cache_data(max_entries=16, show_spinner="Fitting Empirical Influence and Datamodels…")
def estimator_rows(name: str, methods: tuple[str, ...], features: tuple, split: str) -> tuple:
    """The held-out LDS table of the retraining estimators beside `methods` (rows) and the split note."""
    named = {m: bank_run(name, m, features).scores for m in methods}
    table, note = heldout_lds_table(cached_bank(name), named, split, n_resamples=200)
    return table_rows(table), note


def estimators_section(name: str, methods: tuple[str, ...], features: tuple, split: str) -> None:
    """Empirical Influence and Datamodels (scores fitted on the bank's own retrained models) next to the methods,
    all measured on the held-out subsets only: the bank's subsets are split in two, one half fits, one half tests."""
    st.subheader("Retraining-based estimators")
    st.caption("Empirical Influence and Datamodels read the influence straight off retrained models: they fit on "
               "half of the bank's subsets and, like the methods beside them here, are scored on the other half "
               "only (so these figures differ from the table above). With a few dozen models for thousands of "
               "training images they are expected near chance; the paper fits hundreds.")
    if not st.button("Fit and compare", key="eval_estimators",
                     help="Fits in a second or two from the bank's stored measurements; no retraining."):
        return
    try:
        rows, note = estimator_rows(name, methods, features, split)
    except AttributionError as exc:
        st.warning(str(exc))
        return
    st.dataframe(pd.DataFrame(rows), hide_index=True, width="stretch")
    st.caption(f"Fitted on subsets {note['fit_subsets']}; LDS on the held-out subsets {note['heldout_subsets']}"
               + (f"; {note['ei_undefined']} images were in every or no fitting subset (EI 0)."
                  if note["ei_undefined"] else "."))
    st.code(f"python -m attribution estimators --bank {name} --method {','.join(methods)} --split {split} "
            f"{feature_flags(features)}", language="bash")


def open_target(bank: Bank, key: str) -> None:
    """Button callback (it runs before the next run draws any widget, so it may set the sidebar's): bank target
    `key` ("val/I" or "gen/SEED", with its prompt for a text-conditional bank) as the Attribute page's target, with
    the bank's model as the checkpoint and its training set as the dataset."""
    kind, idx = key.split("/")[:2]
    if key_prompt(key) is not None:  # a text-conditional bank's generated target: its prompt and guidance too
        st.session_state.update(attr_prompt=key_prompt(key), attr_negative="", attr_guidance=bank.gen_guidance)
    dataset = ({"dataset_pick": bank.dataset, "dataset_custom": ""} if bank.dataset in BUILTIN_DATASETS
               else {"dataset_custom": bank.dataset})  # the sidebar's list, else its custom spec
    st.session_state.update(checkpoint_custom=bank.model_spec, **dataset,
                            attr_source="Validation image" if kind == "val" else "Generated",
                            **{"attr_val_idx" if kind == "val" else "attr_seed": int(idx)})
