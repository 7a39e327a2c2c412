"""Plotly figures as pictures (issue 17, item 7). Not a page.

Every page draws its figures with `chart(fig, key, name)`: the camera button of plotly's toolbar then downloads the
figure as PNG (at twice the screen resolution) or SVG, as chosen under "Figure downloads" in the sidebar, named
after the figure. No server work: plotly.js renders the picture in the browser.
"""

from __future__ import annotations

import re

import streamlit as st

FORMATS = ("png", "svg")
FORMAT_KEY = "figure_format"


def image_options(name: str, fmt: str = "png") -> dict:
    """The plotly config for a toolbar download of the figure `name` (a safe file name) as `fmt`."""
    if fmt not in FORMATS:
        raise ValueError(f"figure format {fmt!r}; use one of {', '.join(FORMATS)}")
    safe = re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-") or "figure"
    return {"displaylogo": False, "displayModeBar": True,
            "toImageButtonOptions": {"format": fmt, "filename": safe, "scale": 2 if fmt == "png" else 1}}


def chart(fig, key: str, name: str, **kwargs):
    """`st.plotly_chart` with the download options (the selection event is returned, as plotly_chart does)."""
    fmt = st.session_state.get(FORMAT_KEY, "png")
    return st.plotly_chart(fig, key=key, config=image_options(name, fmt), **kwargs)
