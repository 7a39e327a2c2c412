"""Streamlit entry point: `streamlit run app.py` (or `python -m attribution app`).

This file is the frame around every page: page config, the shared sidebar (dataset, checkpoint, device), the
current image in the URL (app_pages/_image.py) and the page list. Pages read the sidebar's choices from
`st.session_state["dataset"]` and `st.session_state["checkpoint"]`.

Defaults: the shipped `digits` checkpoint and dataset when present; the environment variables
`ATTRIBUTION_CHECKPOINT` and `ATTRIBUTION_DATASET` override them (the tests point them at a tiny model).

At its first run a server starts computing, in the background, what the Tour, the Attribute page's defaults and the
Evaluation page's defaults use for the default checkpoint and dataset, when not cached yet (app_pages/_prepare.py;
the sidebar shows its progress); `ATTRIBUTION_PREPARE=0` turns that off (the tests do). With `RAY_ADDRESS` set
(HOST:PORT, or `local`) the server's background featurizations run as Ray tasks on that cluster.
"""

from __future__ import annotations

import os

import streamlit as st

st.set_page_config(page_title="Diffusion data attribution", page_icon=":material/scatter_plot:", layout="wide")

from app_pages._figures import FORMAT_KEY, FORMATS
from app_pages._image import sync_url
from app_pages._prepare import preparation_status, prepare_at_start
from app_pages._ui import cached_dataset, checkpoint_name
from attribution import (
    BUILTIN_DATASETS,
    AttributionError,
    banks_dir,
    describe_device,
    list_banks,
    list_shipped,
    resolve_checkpoint,
    resolve_device,
)

# The page list: one entry per page file in app_pages/, grouped into sidebar sections. Add new pages here
# (e.g. "Attribution": attribute, self-influence, timesteps, journey), each with an explicit url_path.
# The folder must not be called `pages/`: Streamlit (1.67) then runs a deep link such as /generate on a fresh server,
# and every AppTest rerun, as an old-style page *without* this file, so the sidebar and session keys go missing.
PAGES = {
    "": [
        st.Page("app_pages/home.py", title="Home", icon=":material/home:", url_path="home", default=True),
        st.Page("app_pages/tour.py", title="Tour", icon=":material/school:", url_path="tour"),
    ],
    "Images": [
        st.Page("app_pages/generate.py", title="Generate", icon=":material/auto_awesome:", url_path="generate"),
        st.Page("app_pages/upload.py", title="Upload", icon=":material/upload:", url_path="upload"),
        st.Page("app_pages/training_data.py", title="Training data", icon=":material/grid_view:",
                url_path="training-data"),
    ],
    "Attribution": [
        st.Page("app_pages/attribute.py", title="Attribute", icon=":material/hub:", url_path="attribute"),
        st.Page("app_pages/self_influence.py", title="Self-influence", icon=":material/psychology:",
                url_path="self-influence"),
        st.Page("app_pages/timesteps.py", title="Timesteps", icon=":material/timeline:", url_path="timesteps"),
        st.Page("app_pages/journey.py", title="Journey", icon=":material/route:", url_path="journey"),
        st.Page("app_pages/magic.py", title="Exact influence (MAGIC)", icon=":material/functions:", url_path="magic"),
    ],
    "Trust": [
        st.Page("app_pages/evaluation.py", title="Evaluation", icon=":material/fact_check:",
                url_path="evaluation"),
        st.Page("app_pages/counterfactual.py", title="Counterfactual", icon=":material/compare:",
                url_path="counterfactual"),
    ],
}


def _unique(items):
    return list(dict.fromkeys(i for i in items if i))


def checkpoint_options() -> tuple[list[str], str | None]:
    """(selectbox options, default): ATTRIBUTION_CHECKPOINT, else shipped `digits`, then every shipped spec, then
    the model of every ground-truth bank (attributing it shows the LDS at the current λ beside the slider)."""
    shipped = list_shipped()
    env = os.environ.get("ATTRIBUTION_CHECKPOINT", "").strip()
    default = env or ("digits" if "digits" in shipped else (shipped[0] if shipped else None))
    extra = []
    if env:
        try:  # offer the earlier epochs of a run given by the environment, like the shipped ones
            extra = resolve_checkpoint(env).siblings[:-1]
        except AttributionError:
            pass
    banks = [str(banks_dir() / name / "model") for name in list_banks()]
    return _unique([default, *extra, *shipped, *banks]), default


def dataset_options() -> tuple[list[str], str]:
    env = os.environ.get("ATTRIBUTION_DATASET", "").strip()
    default = env or "digits"
    return _unique([default, *BUILTIN_DATASETS]), default


def dataset_ui() -> str:
    """Dataset picker; returns the chosen spec (a custom spec overrides the list)."""
    options, _ = dataset_options()
    picked = st.selectbox("Dataset", options, index=0, key="dataset_pick", bind="query-params",
                          help="The training set whose images get credit.")
    custom = st.text_input("…or a dataset spec", key="dataset_custom", bind="query-params",
                           placeholder="folder:/path/to/images",
                           help="folder:PATH (one subfolder per class), npz:PATH, cifar10:ROOT, cifar2:ROOT, "
                                "animals:cat,dog").strip()
    return custom or picked


def use_dataset(spec: str) -> None:
    """Make `spec` the sidebar's dataset (the list's entry when it has one, else the custom spec)."""
    options, _ = dataset_options()
    if spec in options:
        st.session_state.update(dataset_pick=spec, dataset_custom="")
    else:
        st.session_state["dataset_custom"] = spec


def trained_on(spec: str | None) -> str | None:
    """The dataset a checkpoint's training run records (None when unknown or unreadable)."""
    try:
        return resolve_checkpoint(spec).run_metadata().get("config", {}).get("dataset") if spec else None
    except AttributionError:
        return None


def follow_checkpoint() -> None:
    """On a change of checkpoint: switch the dataset to the one it was trained on, when it records one (a LoRA
    checkpoint can only be attributed against its finetuning set)."""
    spec = st.session_state.get("checkpoint_custom", "").strip() or st.session_state.get("checkpoint_pick")
    dataset = trained_on(spec)
    if dataset:
        use_dataset(dataset)


def checkpoint_ui() -> str | None:
    """Checkpoint picker; returns the chosen spec or None when there is nothing to choose."""
    options, _ = checkpoint_options()
    picked = st.selectbox("Checkpoint", options, index=0 if options else None, key="checkpoint_pick",
                          bind="query-params", placeholder="no shipped models yet", format_func=checkpoint_name,
                          on_change=follow_checkpoint,
                          help="A shipped model, optionally an earlier epoch (NAME@epoch-N); the dataset follows "
                               "the one it was trained on.")
    custom = st.text_input("…or a checkpoint folder", key="checkpoint_custom", bind="query-params",
                           placeholder="runs/digits or runs/digits@epoch-20", on_change=follow_checkpoint,
                           help="A training-run folder (python -m attribution train), a DDPMPipeline folder or a "
                                "UNet2DModel folder; add @epoch-N for an earlier checkpoint of a run.").strip()
    return custom or picked


def dataset_error(spec: str) -> str | None:
    """None when the dataset spec loads, else the one-line reason (which names the valid specs)."""
    try:
        cached_dataset(spec)
    except AttributionError as exc:
        return str(exc)
    return None


def checkpoint_summary(spec: str | None, dataset: str, dataset_ok: bool = True) -> None:
    """What the chosen checkpoint is, and a warning when it was trained on another (valid) dataset."""
    if not spec:
        return
    try:
        info = resolve_checkpoint(spec)
    except AttributionError as exc:
        st.error(str(exc))
        return
    meta = info.run_metadata()
    recorded = meta.get("config", {}).get("dataset")
    parts = [f"`{checkpoint_name(info.spec)}`"]
    if recorded:
        parts.append(f"trained on **{recorded}**")
    if meta.get("resolution"):
        parts.append(f"{meta['resolution']}×{meta['resolution']} px")
    if info.epoch is not None and len(info.siblings) > 1:
        parts.append(f"checkpoint {info.siblings.index(info.spec) + 1} of {len(info.siblings)}"
                     if info.spec in info.siblings else f"epoch {info.epoch}")
    if meta.get("config", {}).get("pipeline"):  # a LoRA finetune (train-lora): what attribution differentiates
        parts.append(f"LoRA (rank {meta['config'].get('rank')}), {meta.get('trained_parameters', 0):,} parameters "
                     "attributed")
    st.caption(" · ".join(parts))
    if recorded and recorded != dataset and dataset_ok:
        st.warning(f"This checkpoint was trained on {recorded}, but the dataset chosen is {dataset}; "
                   "attribution credits the dataset the model was trained on.", icon=":material/warning:")
        st.button(f"Use {recorded}", key="use_recorded", on_click=use_dataset, args=(recorded,),
                  help="Attribute against the training set this checkpoint records.")


with st.sidebar:
    st.session_state["dataset"] = dataset_ui()
    bad_dataset = dataset_error(st.session_state["dataset"])  # checked as soon as it is typed
    if bad_dataset:
        st.error(bad_dataset, icon=":material/error:")
    st.session_state["checkpoint"] = checkpoint_ui()
    checkpoint_summary(st.session_state["checkpoint"], st.session_state["dataset"], not bad_dataset)
    st.caption(f"Device: {describe_device(resolve_device())}")
    st.radio("Figure downloads", FORMATS, horizontal=True, key=FORMAT_KEY, format_func=str.upper,
             help="What the camera button in a figure's toolbar downloads: PNG (2x) or SVG.")
    sync_url()  # the current image (Generate, Upload, Attribute, Journey, Timesteps) in the URL, or from a link
    # A server's first run starts computing what the Tour and the Evaluation page use (once; its progress here).
    preparation_status(prepare_at_start(checkpoint_options()[1], dataset_options()[1]))

st.navigation(PAGES).run()
