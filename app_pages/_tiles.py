"""Explorable training images (issue 17, item 4): labelled tiles that enlarge, and a details dialog per image.

Not a page. Every page that shows training images (Attribute, Self-influence, Journey, Timesteps, Tour) draws them
with `tiles(...)`: each tile is the image (rendered at three times its display size, so Streamlit's fullscreen
button enlarges it sharply) with a caption such as "train #1453 · class 4 · score +0.013" and a Details button.
Details opens an `st.dialog` with the image, its rank and score under every ranking computed in this session
(`record_scores`), and two actions: attribute this image, show it in the training data.

`rank_of` and `details_rows` are pure and unit-tested; `st.image` has no click events (UX.md §3.16), hence a button.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import streamlit as st

from app_pages._ui import display_size, go_to
from attribution import ImageDataset

SCORED = "scored_rankings"  # session_state: {(dataset spec, ranking label): (N,) scores}, newest last
MAX_RANKINGS = 12


def tile_caption(data: ImageDataset, index: int, value: float | None = None, what: str = "score",
                 signed: bool = True) -> str:
    """ "train #1453 · class 4 · score +0.013" (no value: "train #1453 · class 4")."""
    text = f"{data.split} #{index} · class {data.label_name(int(index))}"
    if value is None:
        return text
    return f"{text} · {what} {value:+.3g}" if signed else f"{text} · {what} {value:.3g}"


def record_scores(data: ImageDataset, label: str, scores: np.ndarray) -> None:
    """Remember a ranking of the training set (one score per image) for the details dialog of this session."""
    store = st.session_state.setdefault(SCORED, {})
    key = (data.spec, label)
    store.pop(key, None)
    store[key] = np.asarray(scores, dtype=np.float64)
    while len(store) > MAX_RANKINGS:
        store.pop(next(iter(store)))


def rank_of(scores: np.ndarray, index: int) -> int:
    """1-based rank of `index` when the scores are sorted from largest to smallest (ties share the best rank)."""
    return 1 + int(np.sum(scores > scores[int(index)]))


def details_rows(scored: dict, spec: str, index: int) -> list[dict]:
    """One row per ranking of dataset `spec` in `scored`: its label, the image's rank of N and its score."""
    return [{"ranking": label, "rank": f"{rank_of(s, index)} of {len(s)}", "score": float(s[int(index)])}
            for (data_spec, label), s in scored.items() if data_spec == spec and int(index) < len(s)]


def tiles(data: ImageDataset, indices: Sequence[int], captions: Sequence[str], key: str, target: int = 80) -> None:
    """A wrapping row of training images with captions and a Details button each; `key` names the container
    (CSS class `.st-key-<key>` in the browser, `get_by_key` in AppTest)."""
    size = display_size(data.resolution, target)
    with st.container(horizontal=True, gap="xsmall", key=key):
        for n, (i, caption) in enumerate(zip(indices, captions)):
            with st.container(width=max(size + 24, 150), gap=None):  # room for a two-line caption
                st.image(data.thumbnail(int(i), 3 * size), width=size, output_format="PNG", caption=caption)
                if st.button("Details", key=f"{key}_details_{n}", type="tertiary", icon=":material/open_in_full:",
                             help="Enlarge; its rank under each ranking computed in this session; attribute it"):
                    details(data, int(i))


def _attribute_it(index: int) -> None:
    st.session_state.update(attr_source="Training image", attr_train_idx=int(index))
    st.session_state["_goto"] = "app_pages/attribute.py"


def _show_it(data: ImageDataset, index: int, page_size: int = 48) -> None:
    label = int(data.labels[index])
    classes = [data.class_names[label]] if label >= 0 else []
    ids = [label] if label >= 0 else []
    keep = np.flatnonzero(np.isin(data.labels, ids)) if ids else np.arange(len(data))
    page = int(np.searchsorted(keep, index)) // page_size + 1
    st.session_state.update({"td_split": data.split, f"td_classes:{data.spec}": classes, "td_page_size": page_size,
                             "td_page": page, "td_highlight": (data.spec, data.split, int(index)),
                             "_goto": "app_pages/training_data.py"})


@st.dialog("Training image", width="medium")
def details(data: ImageDataset, index: int) -> None:
    c1, c2 = st.columns([1, 1.4])
    c1.image(data.thumbnail(index, display_size(data.resolution, 224)), output_format="PNG",
             caption=tile_caption(data, index))
    rows = details_rows(st.session_state.get(SCORED, {}), data.spec, index)
    if rows:
        c2.markdown("**Rank and score under each ranking computed in this session**")
        c2.table([{**row, "score": f"{row['score']:+.4g}"} for row in rows], hide_index=True)
    else:
        c2.caption("No ranking of this training set has been computed in this session yet.")
    b1, b2 = st.columns(2)
    if b1.button("Attribute this image", icon=":material/hub:", on_click=_attribute_it, args=(index,),
                 key="details_attribute", disabled=data.split != "train"):
        go_to(st.session_state.pop("_goto"))
    if b2.button("Show in training data", icon=":material/grid_view:", on_click=_show_it, args=(data, index),
                 key="details_show"):
        go_to(st.session_state.pop("_goto"))
