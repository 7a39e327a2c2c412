"""UI helpers of the Evaluation page: cached banks and bank runs, the λ curve, table rows. Not a page.

A `BankRun` holds one method's target features on a bank (its attribution keeps the kernel decomposition), so the
λ slider re-scores in milliseconds; it is shared by all sessions (`st.cache_resource`) and only read.
"""

from __future__ import annotations

import numpy as np
import streamlit as st
from attribution.evaluation.bank import Bank
from attribution.engine import Attribution
from attribution.evaluation.evaluate import BankRun, lambda_sweep, lds_table, open_on_bank, run_on_bank, split_rows
from attribution.evaluation.lds import LdsTable

from app_pages._ui import cached_model


@st.cache_resource(max_entries=4, show_spinner="Loading the bank…")
def cached_bank(name: str) -> Bank:
    return Bank.load(name)


@st.cache_resource(max_entries=12, show_spinner=False)
def bank_attribution(name: str, method: str, timesteps: int, proj_dim: int) -> Attribution:
    """`method` on bank `name`'s model and training set (validated; featurized separately, in the background)."""
    return open_on_bank(cached_bank(name), method, timesteps=timesteps, proj_dim=proj_dim, load=cached_model)


@st.cache_resource(max_entries=12, show_spinner="Scoring the bank's targets…")
def bank_run(name: str, method: str, timesteps: int, proj_dim: int) -> BankRun:
    """One method's target features of every target of bank `name` (after `featurize_with_progress`)."""
    return run_on_bank(cached_bank(name), bank_attribution(name, method, timesteps, proj_dim))


@st.cache_data(max_entries=32, show_spinner="Sweeping λ…")
def lambda_curve(name: str, method: str, timesteps: int, proj_dim: int, split: str) -> dict:
    """LDS along the kernel's λ grid with the default, retraining-free (GCV) and optimal λ and their LDS."""
    bank, run = cached_bank(name), bank_run(name, method, timesteps, proj_dim)
    rows = split_rows(bank, split)
    lambdas = run.lambda_grid()
    default, gcv = run.default_lambda, run.gcv(rows)
    lambdas = np.unique(np.r_[lambdas, default, gcv])
    sweep = lambda_sweep(bank, run, split, lambdas, n_resamples=200)
    best = sweep.best()
    ceiling = lds_table(bank, {}, split, n_resamples=50).ceilings.seed
    at = {lam: float(sweep.standard[int(np.argmin(np.abs(np.log(lambdas / lam))))]) for lam in (default, gcv)}
    return {"lambdas": lambdas, "standard": sweep.standard, "centered": sweep.centered,
            "ci": sweep.standard_ci_targets, "default": float(default), "gcv": float(gcv),
            "best": float(lambdas[best]), "at_default": at[default], "at_gcv": at[gcv],
            "at_best": float(sweep.standard[best]),
            "ceiling": ceiling.standard.value if ceiling is not None else None}


def table_rows(table: LdsTable) -> list[dict]:
    """The LDS table as display rows: value with its two-way CI, standard and centered."""
    out = []
    for r in table.rows():
        def fmt(variant):
            lo, hi = r[f"{variant}_ci_two_way_low"], r[f"{variant}_ci_two_way_high"]
            return f"{r[variant]:+.3f}" + (f"  [{lo:+.3f}, {hi:+.3f}]" if np.isfinite(lo) else "")
        out.append({"": r["name"], "kind": r["kind"], "LDS [95% CI]": fmt("standard"),
                    "centered LDS [95% CI]": fmt("centered")})
    return out
