"""How far to trust a ranking: beside it, one sentence from the model's ground-truth bank (its LDS at the slider's
λ on the bank's targets like this one, its share of what a perfect method reaches, and pixel similarity's), and a
button that sets the λ chosen on held-out targets. Shown when a bank exists whose model is the checkpoint
attributed (pick the bank's model, e.g. banks/digits/model, in the sidebar). Not a page.

Scoring the bank's targets costs one target featurization per target (once per method and options, shared by all
sessions, cached on disk): when they are cached the sentence shows at once; otherwise a button says what it will
compute and about how long it takes here. After that, every slider move re-scores in milliseconds.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import streamlit as st

from app_pages._eval import cached_bank
from app_pages._ui import cached_model
from attribution import (
    BASELINE_SIMILARITY,
    Attribution,
    AttributionError,
    Result,
    HeldOutLambda,
    bank_for_model,
    bank_targets_cached,
    banks_dir,
    format_duration,
    held_out_lambda,
    open_on_bank,
    run_on_bank,
    verdict,
)
from attribution import PreparationTask as Task


@st.cache_data(ttl=300, show_spinner=False)
def bank_of(identity: str, root: str) -> str | None:
    """The folder of the bank built for the model with these weights under `root` (re-read every 5 minutes: a
    bank can appear)."""
    name = bank_for_model(identity, Path(root))
    return str(Path(root) / name) if name else None


@st.cache_resource(max_entries=12, show_spinner="Scoring the bank's targets…")
def trust_run(folder: str, options_key: str, _att: Attribution) -> Result:
    """The attribution's target features of every bank target (keyed by the page's options digest)."""
    return run_on_bank(cached_bank(folder), _att)


@st.cache_resource(max_entries=4, show_spinner=False)
def pixel_attribution(folder: str) -> Attribution:
    """Pixel similarity on the bank's model and training set (opened, not computed)."""
    return open_on_bank(cached_bank(folder), BASELINE_SIMILARITY, load=cached_model)


def pixel_run(folder: str, compute: bool) -> Result | None:
    """Pixel similarity's scores of the bank's targets: read when cached, computed with `compute` (pixels, no
    gradients), else None."""
    att = pixel_attribution(folder)
    cached = bank_targets_cached(cached_bank(folder), att) and all(m.featurize_estimate()[0] == 0
                                                                    for m in att.members)
    if not (cached or compute):
        return None
    return trust_run(folder, BASELINE_SIMILARITY, att)


@st.cache_data(max_entries=64, show_spinner=False)
def verdict_text(folder: str, options_key: str, lam: float | None, split: str, _run: Result,
                 _pixels: Result | None, with_pixels: bool) -> tuple[str, str]:
    """(sentence, details) of `verdict` (cached per options, λ and split: reruns cost nothing)."""
    v = verdict(cached_bank(folder), _run, lam, split, _pixels)
    return v.sentence(), v.details()


@st.cache_data(max_entries=32, show_spinner="Choosing λ on the bank's targets…")
def lambda_choice(folder: str, options_key: str, split: str, exclude: str | None, _run: Result) -> HeldOutLambda:
    return held_out_lambda(cached_bank(folder), _run, split, exclude)


def scoring_note(att: Attribution, folder: str) -> tuple[str, str]:
    """(one line, its basis) before the bank's targets are scored: what it computes and about how long it takes
    here, from the throughput measured for these features."""
    bank = cached_bank(folder)
    seconds, bases = Task("", att, bank=bank).estimate(probe=True)
    when = ("no estimate yet" if seconds is None else "seconds" if seconds < 1
            else f"about {format_duration(seconds)} here")
    return (f"Measuring scores the bank's {len(bank.target_keys)} targets with these options: {when}, once for "
            "everyone.", "; ".join(bases))


def trust_caption(att: Attribution, options_key: str, lam: float | None, key: str,
                  split: str = "val") -> tuple[str, Result] | None:
    """Beside a ranking: from the model's bank, the verdict at `lam` on the bank's targets of `split` (the kind of
    the target attributed) when the bank's targets are scored with these options (cached, or once the button
    asks), else a button with what it will compute and how long; without a bank, a sentence that says so.
    Returns (bank folder, the bank run) when the verdict is shown."""
    folder = bank_of(att.members[-1].model.identity(), str(banks_dir()))
    if folder is None:
        st.caption("**How far to trust this:** not measured for this model: it has no ground-truth bank (retrained "
                   "models), so no figure says how well its rankings agree with retraining. The Evaluation page "
                   "measures that on the banks' models.")
        return None
    bank, name = cached_bank(folder), Path(folder).name
    flag = f"trust_{folder}_{options_key}"
    try:
        asked = bool(st.session_state.get(flag))
        if not asked and not bank_targets_cached(bank, att):
            line, basis = scoring_note(att, folder)
            st.button(f"How far to trust this? Measure the LDS on the `{name}` bank", key=f"trust_button_{key}",
                      on_click=st.session_state.__setitem__, args=(flag, True),
                      help=f"Scores the bank's {len(bank.target_keys)} targets with these options once (shared by "
                           "everyone), then shows the LDS at every λ you pick, beside pixel similarity's.")
            st.caption(line, help=basis or None)
            return None
        run = trust_run(folder, options_key, att)
        pixels = pixel_run(folder, compute=asked)
        sentence, details = verdict_text(folder, options_key, lam, split, run, pixels, pixels is not None)
    except AttributionError as exc:
        st.caption(f"No LDS on the `{name}` bank for this method: {exc}")
        return None
    st.caption(sentence, help=details + " Reachable: what a perfect method would "
               "score against the bank's retrained models; the Evaluation page has every method and λ.")
    return folder, run


def held_out_button(folder: str, run: Result, options_key: str, grid: list[float], current: float, choose,
                    split: str, exclude: str | None, key: str) -> None:
    """"Use the λ chosen on held-out targets": `choose(λ)` (an on_click callback: it runs before the next run
    draws the slider) with the held-out choice on the bank, moved to the nearest value of the slider's `grid`."""
    try:
        choice = lambda_choice(folder, options_key, split, exclude, run)
    except AttributionError as exc:
        st.caption(f"No λ chosen on the bank: {exc}")
        return
    value = grid[int(np.argmin(np.abs(np.log(np.asarray(grid) / choice.lam))))]
    st.button(f"Use the λ chosen on held-out targets ({value:.3g})", key=f"heldout_{key}",
              icon=":material/target:", type="tertiary", disabled=value == current, on_click=choose, args=(value,),
              help=choice.describe() + " Sets the slider, the scores and the command line.")
