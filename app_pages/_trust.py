"""How far to trust a ranking: beside a λ slider, the method's LDS on the model's ground-truth bank at that λ, with
the bank's seed-vs-seed ceiling. Shown when a bank exists whose model is the checkpoint attributed (pick the bank's
model, e.g. banks/digits/model, in the sidebar). Not a page.

Scoring the bank's targets costs one target featurization per target (once per method and options, shared by all
sessions); the page asks before doing it. After that, every slider move re-scores in milliseconds.
"""

from __future__ import annotations

from pathlib import Path

import streamlit as st
from attribution.engine import Attribution
from attribution.errors import AttributionError
from attribution.evaluation.bank import bank_for_model, banks_dir
from attribution.evaluation.evaluate import BankRun, lds_at, run_on_bank, seed_ceiling

from app_pages._eval import cached_bank

SPLITS = {"val": "validation", "gen": "generated"}


@st.cache_data(ttl=300, show_spinner=False)
def bank_of(identity: str, root: str) -> str | None:
    """The folder of the bank built for the model with these weights under `root` (re-read every 5 minutes: a
    bank can appear)."""
    name = bank_for_model(identity, Path(root))
    return str(Path(root) / name) if name else None


@st.cache_resource(max_entries=12, show_spinner="Scoring the bank's targets…")
def trust_run(folder: str, options_key: str, _att: Attribution) -> BankRun:
    """The attribution's target features of every bank target (keyed by the page's options digest)."""
    return run_on_bank(cached_bank(folder), _att)


@st.cache_data(max_entries=16, show_spinner=False)
def ceiling(folder: str, split: str) -> float | None:
    return seed_ceiling(cached_bank(folder), split)


def trust_caption(att: Attribution, options_key: str, lam: float | None, key: str) -> None:
    """Under a λ slider: the LDS at `lam` on the model's bank (both target splits, with two-way CIs and the seed
    ceiling), or a button that scores the bank's targets first. Nothing when the model has no bank."""
    folder = bank_of(att.members[-1].model.identity(), str(banks_dir()))
    if folder is None:
        return
    bank, name = cached_bank(folder), Path(folder).name
    flag = f"trust_{folder}_{options_key}"
    if not st.session_state.get(flag):
        st.button(f"How far to trust this? Measure the LDS on the `{name}` bank", key=f"trust_button_{key}",
                  on_click=st.session_state.__setitem__, args=(flag, True),
                  help=f"Scores the bank's {len(bank.target_keys)} targets with these options once (shared by "
                       "everyone), then shows the LDS at every λ you pick.")
        return
    try:
        run = trust_run(folder, options_key, att)
        parts = []
        for split, label in SPLITS.items():
            if not bank.split(split).any() or not run.covers(split):
                continue
            r = lds_at(bank, run, lam, split).standard
            c = ceiling(folder, split)
            parts.append(f"{r.value:+.2f} [{r.ci_two_way[0]:+.2f}, {r.ci_two_way[1]:+.2f}] on {label} images"
                         + (f" (seed ceiling {c:+.2f})" if c is not None else ""))
    except AttributionError as exc:
        st.caption(f"No LDS on the `{name}` bank for this method: {exc}")
        return
    st.caption(f"**LDS at this λ** on the `{name}` bank: {'; '.join(parts)}. The ceiling is how well one "
               "retrained model predicts another; see the Evaluation page for every method and λ.")
