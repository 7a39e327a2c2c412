"""Prepare for class: an estimate of what the Tour, the Attribute page's defaults and the Evaluation page's defaults
still need computed here (`attribution.prepare`), and one background job shared by every session that computes it
(a closed tab does not stop it; another session that asks watches the same job). Not a page.

- `prepare_panel`: the Tour's panel: the estimate per task and a "Prepare for class" button.
- `prepare_at_start`: at a server's first run, the same job for the app's default checkpoint and dataset, so that a
  class arriving a few minutes after the server started finds everything cached (off with ATTRIBUTION_PREPARE=0).
- `preparation_status`: the sidebar's line while that job runs (refreshed every second, the page itself is free).
"""

from __future__ import annotations

import os

import streamlit as st

from app_pages._attr import BackgroundJob, background_job, find_job, ray_address
from app_pages._ui import cached_model, fail, progress_bar
from attribution import TOUR_SETTINGS as TOUR
from attribution import AttributionError, TourSettings, banks_dir, cache_root, format_duration, resolve_checkpoint
from attribution import plan_preparation as plan
from attribution import preparation_estimates as estimates
from attribution import run_preparation as run

PREPARE_ENV = "ATTRIBUTION_PREPARE"  # "0", "off", "false" or "no": no preparation at the server's first run
PREPARED = ("Prepared: every step of the Tour, the Attribute page's defaults and the Evaluation page's defaults read "
            "the cache.")


def cached_plan(checkpoint: str, dataset: str | None, tour: TourSettings, banks_root: str):
    """The preparation tasks (opened, nothing computed), shared by all sessions that use the same cache folder."""
    return _plan(checkpoint, dataset, tour, banks_root, str(cache_root()))


@st.cache_resource(max_entries=4, show_spinner="Opening what the Tour and the Evaluation page use…")
def _plan(checkpoint: str, dataset: str | None, tour: TourSettings, banks_root: str, cache: str):
    return plan(checkpoint, dataset, load=cached_model, tour=tour)


def prepare_key(checkpoint: str, dataset: str | None, tour: TourSettings, banks_root: str) -> str:
    """The background job's key: one job per (resolved checkpoint, dataset, Tour settings, banks folder, cache
    folder)."""
    return f"prepare:{checkpoint}|{dataset}|{tour}|{banks_root}|{cache_root()}"


def start_job(checkpoint: str, dataset: str | None, tour: TourSettings, banks_root: str) -> BackgroundJob:
    tasks, address = cached_plan(checkpoint, dataset, tour, banks_root), ray_address()
    return background_job(prepare_key(checkpoint, dataset, tour, banks_root),
                          lambda progress: run(tasks, progress, address), len(tasks))


def prepare_at_start_enabled() -> bool:
    return os.environ.get(PREPARE_ENV, "1").strip().lower() not in ("0", "off", "false", "no")


def prepare_at_start(checkpoint: str | None, dataset: str) -> str | None:
    """At a server's first run (once per default checkpoint, dataset, banks folder and cache): when something the
    Tour, the Attribute page's defaults or the Evaluation page's defaults use is not cached yet, start the Tour
    panel's job for it. Returns its key; None when everything is cached, ATTRIBUTION_PREPARE is off, or the
    checkpoint does not open (its page says why)."""
    if not checkpoint or not prepare_at_start_enabled():
        return None
    return _start_once(checkpoint, dataset, str(banks_dir()), str(cache_root()))


@st.cache_resource(show_spinner="First start of this server: checking what the Tour and Evaluation need…")
def _start_once(checkpoint: str, dataset: str, banks_root: str, cache: str) -> str | None:
    try:
        spec = resolve_checkpoint(checkpoint).spec
        total, _ = estimates(cached_plan(spec, dataset, TOUR, banks_root), probe=False)
        if total == 0:
            return None
        start_job(spec, dataset, TOUR, banks_root)
    except AttributionError:
        return None
    return prepare_key(spec, dataset, TOUR, banks_root)


def _job_line(job: BackgroundJob, label: str, compact: bool) -> None:
    if job.thread.is_alive():
        st.progress(min(1.0, job.done / max(1, job.total)),
                    text=label if compact else f"{label}: {job.message}" if job.message else label)
        if compact and job.message:
            st.caption(job.message)
    elif job.error is not None:
        st.warning(f"{label} stopped: {job.error}", icon=":material/warning:")
    else:
        st.success(PREPARED, icon=":material/check_circle:")


@st.fragment(run_every=1.0)
def _live(key: str, label: str, compact: bool) -> None:
    """The job's progress, redrawn every second while it runs; the whole page reruns once when it has ended."""
    job = find_job(key)
    if job is None or not job.thread.is_alive():
        st.rerun()
    _job_line(job, label, compact)


def job_status(key: str, label: str, compact: bool = False) -> BackgroundJob | None:
    """The job for `key`: live progress while it runs (without holding up the page), how it ended once it has."""
    job = find_job(key)
    if job is None:
        return None
    if job.thread.is_alive():
        _live(key, label, compact)
    else:
        _job_line(job, label, compact)
    return job


def preparation_status(key: str | None) -> None:
    """The sidebar's line about the first-start preparation: progress while it runs, a warning if it failed."""
    job = find_job(key) if key else None
    if job is None or (not job.thread.is_alive() and job.error is None):
        return
    job_status(key, "Preparing for class (first start: the Tour and Evaluation, once)", compact=True)


def prepare_panel(checkpoint: str, dataset: str | None, tour: TourSettings, banks_root: str) -> None:
    """An expander with the estimate per task and the "Prepare for class" button; while the job runs (started
    here, by another session or at the server's first start), its progress."""
    key = prepare_key(checkpoint, dataset, tour, banks_root)
    try:
        tasks = cached_plan(checkpoint, dataset, tour, banks_root)
    except AttributionError as exc:
        fail(exc)
    running = background_job(key, None, start=False)
    with st.expander("Prepare for class: compute everything the Tour and the Evaluation page use, once",
                     expanded=running is not None):
        if running is not None:  # someone else's job (another session, the first start): watched, page free
            job_status(key, "Preparing")
            return
        total, rows = estimates(tasks)
        st.dataframe({"what": [r[0] for r in rows], "time here": [r[1] for r in rows]}, hide_index=True,
                     width="stretch")
        if total == 0:
            st.success(PREPARED, icon=":material/check_circle:")
            return
        st.caption(f"In all: {'about ' + format_duration(total) if total is not None else 'unknown'} on this "
                   "machine (from its measured speed). The command line does the same: `python -m attribution "
                   f"prepare --checkpoint {checkpoint}`.")
        if not st.button("Prepare for class", key="prepare_go", icon=":material/school:"):
            return
        try:  # pressed here: this session waits for it
            start_job(checkpoint, dataset, tour, banks_root).watch(progress_bar("Preparing"))
        except AttributionError as exc:
            fail(exc)
        st.success(PREPARED, icon=":material/check_circle:")
