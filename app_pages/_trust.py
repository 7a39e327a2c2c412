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
from attribution.evaluation.evaluate import BankRun, bank_ceilings, lds_at, run_on_bank

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
def ceiling(folder: str, split: str) -> tuple[float, float] | None:
    """(seed-vs-seed, reachable) standard LDS of the bank's split; None with a single seed."""
    c = bank_ceilings(cached_bank(folder), split)
    return None if c.seed is None else (c.seed.standard.value, c.reachable.standard.value)


def describe(value: float, ci: tuple[float, float], label: str, ceilings: tuple[float, float] | None) -> str:
    """"+0.23 [+0.15, +0.30] on validation images (42% of the reachable +0.55; one retrain predicts another at
    +0.26)"; a bank with one seed has no ceilings, and says so."""
    text = f"{value:+.2f} [{ci[0]:+.2f}, {ci[1]:+.2f}] on {label} images"
    if ceilings is None:
        return text + " (no ceiling: the bank has a single seed)"
    lower, reachable = ceilings
    share = f"{value / reachable:.0%} of the reachable {reachable:+.2f}; " if reachable > 0 else ""
    return text + f" ({share}one retrain predicts another at {lower:+.2f})"


def trust_caption(att: Attribution, options_key: str, lam: float | None, key: str) -> None:
    """Under a λ slider: the LDS at `lam` on the model's bank (both target splits, with two-way CIs, the share of
    the reachable ceiling and the seed-vs-seed figure), or a button that scores the bank's targets first; without a bank, a sentence that says so."""
    folder = bank_of(att.members[-1].model.identity(), str(banks_dir()))
    if folder is None:
        st.caption("**How far to trust this:** not measured for this model: it has no ground-truth bank (retrained "
                   "models), so no figure says how well its rankings agree with retraining. The Evaluation page "
                   "measures that on the banks' models.")
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
            parts.append(describe(r.value, r.ci_two_way, label, ceiling(folder, split)))
    except AttributionError as exc:
        st.caption(f"No LDS on the `{name}` bank for this method: {exc}")
        return
    st.caption(f"**LDS at this λ** on the `{name}` bank: {'; '.join(parts)}. Reachable: what a perfect method "
               "would score against the bank's retrained models; see the Evaluation page for every method and λ.")
