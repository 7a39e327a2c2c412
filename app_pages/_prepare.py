"""The "prepare for class" panel (Tour page): an estimate of what the Tour, the Attribute page's defaults and the
Evaluation page's defaults still need computed here (`attribution.prepare`), and a button that computes it in one
background job shared by every session (a closed tab does not stop it; another session that asks watches the same
job). Not a page."""

from __future__ import annotations

import streamlit as st

from attribution.engine import format_duration
from attribution.errors import AttributionError
from attribution.prepare import TourSettings, estimates, plan, run

from app_pages._attr import background_job
from app_pages._ui import cached_model, fail, progress_bar


@st.cache_resource(max_entries=4, show_spinner="Opening what the Tour and the Evaluation page use…")
def cached_plan(checkpoint: str, dataset: str | None, tour: TourSettings, banks_root: str):
    """The preparation tasks (opened, nothing computed), shared by all sessions."""
    return plan(checkpoint, dataset, load=cached_model, tour=tour)


def prepare_panel(checkpoint: str, dataset: str | None, tour: TourSettings, banks_root: str) -> None:
    """An expander with the estimate per task and the "Prepare for class" button; while the job runs (started
    here or by another session), its progress."""
    key = f"prepare:{checkpoint}|{dataset}|{tour}|{banks_root}"
    try:
        tasks = cached_plan(checkpoint, dataset, tour, banks_root)
    except AttributionError as exc:
        fail(exc)
    job = background_job(key, None, start=False)
    with st.expander("Prepare for class: compute everything the Tour and the Evaluation page use, once",
                     expanded=job is not None):
        if job is None:
            total, rows = estimates(tasks)
            st.dataframe({"what": [r[0] for r in rows], "time here": [r[1] for r in rows]}, hide_index=True,
                         width="stretch")
            if total == 0:
                st.success("Prepared: every step of the Tour, the Attribute page's defaults and the Evaluation "
                           "page's defaults read the cache.", icon=":material/check_circle:")
                return
            st.caption(f"In all: {'about ' + format_duration(total) if total is not None else 'unknown'} on this "
                       "machine (from its measured speed). The command line does the same: `python -m attribution "
                       f"prepare --checkpoint {checkpoint}`.")
            if not st.button("Prepare for class", key="prepare_go", icon=":material/school:"):
                return
            job = background_job(key, lambda progress: run(tasks, progress), len(tasks))
        try:
            job.watch(progress_bar("Preparing"))
        except AttributionError as exc:
            fail(exc)
        st.success("Prepared: every step of the Tour, the Attribute page's defaults and the Evaluation page's "
                   "defaults read the cache.", icon=":material/check_circle:")
