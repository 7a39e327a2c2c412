"""Shared UI helpers for the Streamlit pages: cached loaders, guards, image grids and small view-model functions.

Not a page (`app.py` lists the pages explicitly). The pure functions here (`page_indices`, `read_upload`,
`generate_images`, `display_size`, `pngs_zip`) take and return plain values so they can be unit-tested
without Streamlit running.
"""

from __future__ import annotations

import hashlib
import io
import zipfile
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import streamlit as st
import torch

from attribution import (
    AttributionError,
    DiffusionModel,
    ImageDataset,
    enlarged_note,
    load_dataset,
    load_image_pixels,
    load_model,
    open_image,
    pixels_to_pil,
    sample,
    tensor_to_pixels,
)

# -- cached loaders ------------------------------------------------------------------------------------------------


@st.cache_resource(max_entries=8, show_spinner="Loading the model…")
def cached_model(spec: str, device: str = "auto") -> DiffusionModel:
    """A loaded checkpoint, shared by all sessions: treat it as read-only."""
    return load_model(spec, device)


@st.cache_resource(max_entries=4, show_spinner="Loading the dataset…")
def cached_dataset(spec: str, split: str = "train") -> ImageDataset:
    """A dataset at its native resolution; its arrays are read-only, so one shared copy is safe."""
    return load_dataset(spec, split)


# -- guards: missing prerequisites become guidance, library errors one line ----------------------------------------


def fail(exc: Exception) -> None:
    """Show a library error as one line and stop the page (never a traceback)."""
    st.error(str(exc), icon=":material/error:")
    st.stop()


def require_model() -> DiffusionModel:
    """The checkpoint chosen in the sidebar, loaded; otherwise guidance and `st.stop()`."""
    spec = st.session_state.get("checkpoint")
    if not spec:
        st.info("No checkpoint is selected. Pick a shipped model or enter a checkpoint folder in the sidebar "
                "(train one with `python -m attribution train --dataset digits --out runs/digits`).")
        st.stop()
    try:
        return cached_model(spec)
    except AttributionError as exc:
        fail(exc)


def require_dataset(split: str = "train") -> ImageDataset:
    """The dataset chosen in the sidebar, loaded; otherwise guidance and `st.stop()`."""
    spec = st.session_state.get("dataset")
    if not spec:
        st.info("No dataset is selected. Pick one in the sidebar.")
        st.stop()
    try:
        return cached_dataset(spec, split)
    except AttributionError as exc:
        fail(exc)


def go_to(page: str) -> None:
    """Switch to `page` keeping the sidebar's choices. A plain `st.switch_page` clears the URL's query parameters and
    raises when any is bound to a widget (the sidebar's dataset and checkpoint, the Evaluation page's bank) with a
    value other than its default; an explicit empty set replaces them without that check, and each bound widget
    puts its value back in the URL when it is drawn on the new page."""
    st.switch_page(page, query_params={})


def display_path(path) -> str:
    """A path for captions: relative to the working directory when inside it, else its last two parts (never
    the absolute path of the server's file system)."""
    p = Path(path)
    try:
        return str(p.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(Path("…", *p.parts[-2:]))


def checkpoint_name(spec: str | None) -> str:
    """How a checkpoint is named in every caption: a shipped name as is (`digits`, `digits@epoch-20`), a folder by
    `display_path` (never an absolute path), with its `@epoch-N` suffix."""
    if not spec:
        return ""
    base, at, epoch = str(spec).partition("@")
    if "/" not in base and "\\" not in base:
        return str(spec)
    return display_path(base) + (at + epoch)


KEPT = "_kept_widget_values"


def keep(*keys: str) -> None:
    """Keep this page's options when the user goes to another page and back. Streamlit deletes the state of
    widgets a run does not draw (UX.md §4); call this at the top of the page with the widget keys (or key
    prefixes ending in "_") to copy their values aside and put them back on return. Never pass button keys."""
    kept = st.session_state.setdefault(KEPT, {})

    def ours(k) -> bool:
        return isinstance(k, str) and any(k == p or (p.endswith("_") and k.startswith(p)) for p in keys)

    for k, v in list(kept.items()):
        if ours(k) and k not in st.session_state:
            st.session_state[k] = v
    for k in list(st.session_state.keys()):
        if ours(k):
            kept[k] = st.session_state[k]


# -- images --------------------------------------------------------------------------------------------------------


def display_size(resolution: int, target: int = 96) -> int:
    """A whole multiple of `resolution` near `target` pixels, so nearest-neighbour enlarging keeps pixels square."""
    return int(resolution) * max(1, round(target / int(resolution)))


def image_grid(pixels: Sequence[np.ndarray] | np.ndarray, captions: Sequence[str], size: int,
               key: str | None = None) -> None:
    """uint8 (H, W, C) images enlarged to `size` px (nearest neighbour), in wrapping rows with captions.

    A `key` names the grid's container, which the browser sees as the CSS class `.st-key-<key>`.
    """
    with st.container(horizontal=True, gap="small", key=key):
        for pix, caption in zip(pixels, captions):
            # PNG: JPEG would smear the enlarged pixels.
            st.image(pixels_to_pil(pix, size), caption=caption, width=int(size), output_format="PNG")


def png_bytes(pixels: np.ndarray) -> bytes:
    """A PNG (at model resolution) of uint8 (H, W, C) pixels: the command line reads back exactly these pixels."""
    png = io.BytesIO()
    pixels_to_pil(pixels).save(png, format="PNG")
    return png.getvalue()


def pngs_zip(pixels: np.ndarray, names: Sequence[str]) -> bytes:
    """A zip of PNGs (at model resolution) from uint8 (N, H, W, C) pixels."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for pix, name in zip(pixels, names):
            zf.writestr(name, png_bytes(pix))
    return buf.getvalue()


# -- view models ---------------------------------------------------------------------------------------------------


def page_indices(labels: np.ndarray, class_ids: Sequence[int], page: int, page_size: int,
                 ) -> tuple[np.ndarray, int, int]:
    """Indices shown on one page of a class-filtered grid.

    Args:
        labels: int (N,), each image's class.
        class_ids: classes to keep; empty keeps every image.
        page: 1-based page number (clamped to the valid range).
        page_size: images per page.

    Returns:
        (indices on this page, number of images after filtering, number of pages).
    """
    keep = np.flatnonzero(np.isin(labels, list(class_ids))) if len(class_ids) else np.arange(len(labels))
    n_pages = max(1, -(-len(keep) // page_size))
    page = min(max(1, int(page)), n_pages)
    return keep[(page - 1) * page_size:page * page_size], len(keep), n_pages


def read_upload(data: bytes, name: str, resolution: int, channels: int) -> dict:
    """Validate an uploaded image and convert it to what the model sees.

    Raises `ImageError` (one line) for non-images, truncated files and images that are too large.

    Returns:
        {"name", "sha256", "preview" (PIL, at most 512 px), "pixels" (uint8 (R, R, C)), "resolution", "channels",
        "note" (a warning for an image smaller than the model's resolution, else None)}
    """
    original = open_image(data, name)
    preview = original.copy()
    preview.thumbnail((512, 512))
    if preview.mode not in ("L", "RGB", "RGBA"):
        preview = preview.convert("RGBA" if "A" in preview.getbands() else "RGB")
    pixels = load_image_pixels(data, resolution, channels, name)
    return {"name": name, "sha256": hashlib.sha256(data).hexdigest()[:16], "preview": preview, "pixels": pixels,
            "resolution": int(resolution), "channels": int(channels),
            "note": enlarged_note(name, original.size, resolution)}


def generate_images(model: DiffusionModel, n: int, seed: int, steps: int, sampler: str,
                    progress: Callable[[int, int, str], None] | None = None, prompt=None) -> dict:
    """Sample `n` images (seeds seed..seed+n-1; with `prompt`, a `sampling.Prompt`, for a text-conditional model)
    and return what later pages use as attribution targets.

    Returns:
        {"checkpoint", "seeds" (list of int), "pixels" (uint8 (N, H, W, C)), "steps", "sampler", "prompt" (None or
        {"prompt", "negative", "guidance"})}
    """
    traj = sample(model, n, seed=seed, steps=steps, sampler=sampler, progress=progress, prompt=prompt)
    return {"checkpoint": model.spec, "seeds": [int(s) for s in traj.seeds],
            "pixels": tensor_to_pixels(torch.from_numpy(traj.final)), "steps": int(steps), "sampler": sampler,
            "prompt": None if prompt is None else prompt.to_dict()}


def progress_bar(label: str) -> Callable[[int, int, str], None]:
    """An `st.progress` bar driven by the library's (done, total, message) progress callback."""
    bar = st.progress(0.0, text=label)

    def update(done: int, total: int, message: str = "") -> None:
        bar.progress(min(1.0, done / max(1, total)), text=f"{label}: {message}" if message else label)

    return update
