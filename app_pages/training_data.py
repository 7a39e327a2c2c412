"""Training data: browse the images the model learnt from, by class and page."""

import numpy as np
import streamlit as st

from app_pages._ui import display_size, image_grid, page_indices, require_dataset
from attribution import SPLITS

PAGE_SIZES = (24, 48, 96)

st.title("Training data")


def _first_page() -> None:
    st.session_state["td_page"] = 1


c1, c2, c3, c4 = st.columns([1.3, 3, 0.8, 0.8], vertical_alignment="bottom")
split = c1.radio("Split", SPLITS, key="td_split", on_change=_first_page, horizontal=True,
                 format_func={"train": "Train", "val": "Validation"}.get)
data = require_dataset(split)
chosen = c2.multiselect("Classes", data.class_names, key=f"td_classes:{data.spec}", on_change=_first_page,
                        placeholder="All classes")
page_size = c3.selectbox("Per page", PAGE_SIZES, index=PAGE_SIZES.index(48), key="td_page_size",
                         on_change=_first_page)

class_ids = [data.class_names.index(c) for c in chosen]
_, n_shown, n_pages = page_indices(data.labels, class_ids, 1, page_size)
st.session_state["td_page"] = min(st.session_state.get("td_page", 1), n_pages)  # clamp before the widget is drawn
page = c4.number_input(f"Page (of {n_pages})", 1, n_pages, key="td_page")
indices, _, _ = page_indices(data.labels, class_ids, page, page_size)

counts = np.bincount(data.labels[data.labels >= 0], minlength=len(data.class_names))
st.caption(f"`{data.spec}` {split}: {len(data)} images, {data.resolution}×{data.resolution} px · "
           + ", ".join(f"{name}: {n}" for name, n in zip(data.class_names, counts)) + " · "
           + " ".join(data.notes))
if n_shown == 0:
    st.info("No images in the chosen classes.")
    st.stop()
first = (page - 1) * page_size
st.markdown(f"Images **{first + 1}–{first + len(indices)}** of {n_shown}")
size = display_size(data.resolution, 80)
mark = st.session_state.get("td_highlight")  # set by a training image's Details → "Show in training data"
mark = mark[2] if mark and mark[:2] == (data.spec, split) and mark[2] in indices else None
if mark is not None:
    st.success(f"Training image #{mark} (class {data.label_name(mark)}) is on this page, marked ▶.",
               icon=":material/my_location:")
captions = [f"{'▶ ' if i == mark else ''}#{i} · {data.label_name(i)}" for i in indices]
image_grid(data.pixels[indices], captions, size, key="training_grid")
