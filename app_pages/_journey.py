"""Helpers of the Journey page (and the Tour): the cached attributor, the command line, the Attribute-page
comparison, the image, Play and the film strip. Not a page."""

from __future__ import annotations

import numpy as np
import streamlit as st

from app_pages._attr import METHOD_TITLES
from app_pages._image import image_target, pick_image
from app_pages._tiles import SCORED, tiles
from app_pages._ui import fail
from attribution import (
    JOURNEY_OPTIONS,
    AttributionError,
    RunOptions,
    to_npz_bytes,
    top_indices,
)


def journey_cli(opts: RunOptions, cfg, journey, dataset_spec: str, lam: float, forward: bool) -> str:
    """The `python -m attribution journey` line that recomputes this journey (`forward`: of an image noised forward,
    an uploaded file or train:I / val:I, by --image)."""
    image = ("--image", journey.meta["name"]) if forward else ("--seed", cfg.seed)
    prompt = [] if cfg.prompt is None else [("--prompt", cfg.prompt), ("--guidance", cfg.guidance)] + (
        [("--negative-prompt", cfg.negative)] if cfg.negative else [])
    return opts.command_line("journey", dataset=dataset_spec, only=JOURNEY_OPTIONS, extra=[
        image, ("--steps", cfg.steps), ("--sampler", cfg.sampler), ("--every", cfg.every),
        ("--resamples", cfg.resamples), ("--feature-seed", opts.seed), ("--lambda", lam), *prompt,
        ("--out", "out/journey")])


WHY_DIFFERENT = (
    "The last step's proponents differ from the Attribute page's: the target feature is not the same (here x̂0 "
    "re-noised to one step's t, R noise draws; there the final image over K timesteps, fixed noise). The lists "
    "overlap in part.")


def attribute_overlap(method: str, dataset_spec: str, name: str, last_scores: np.ndarray, k: int = 5) -> str:
    """"Top-5 shared with the Attribute page's D-TRAK for gen:3: 3/5", when that ranking was computed in this
    session; else an empty string."""
    label = f"{METHOD_TITLES[method]} · {name}"
    other = st.session_state.get(SCORED, {}).get((dataset_spec, label))
    if other is None or len(other) != len(last_scores):
        return ""
    shared = len(set(np.argsort(-other, kind="stable")[:k].tolist())
                 & set(np.argsort(-last_scores, kind="stable")[:k].tolist()))
    return f" In this session: the last step's top-{k} shares {shared}/{k} with the Attribute page's {label}."


def choose_image(model, dataset: str | None):
    """The Journey page's image: the current image (app_pages/_image.py). Returns (the image tensor to noise forward,
    None for a generated image, whose trajectory is sampled; its ImageRef; its name; prompt fields for
    `JourneyConfig`, {} for an unconditional model). Stops the page with guidance or one error line."""
    ref = pick_image(model, "jr")
    prompt = ref.the_prompt()
    fields = {} if prompt is None else {"prompt": prompt.text, "negative": prompt.negative,
                                        "guidance": prompt.guidance}
    if ref.kind == "gen":
        return None, ref, f"gen:{ref.number}", fields
    if model.conditional and ref.kind in ("train", "val"):
        st.info("On a text-conditional model the journey follows a generated or an uploaded image (a dataset image "
                "keeps its own prompt).")
        st.stop()
    try:
        target, name = image_target(model, ref, dataset)
    except AttributionError as exc:
        fail(exc)
    st.info(f"{name} has no sampling trajectory, so it is attributed by **noising it forward**: x_t is the image "
            "noised to each chosen step's t and x̂0 the model's one-step prediction from x_t.",
            icon=":material/info:")
    return target.images[0], ref, name, fields


def toggle_play(labels: list[int]) -> None:
    """The Play/Stop button's callback: start (from the first step when at the last) or stop stepping."""
    playing = not st.session_state.get("jr_playing", False)
    st.session_state["jr_playing"] = playing
    if playing and st.session_state.get("jr_step") == labels[-1]:
        st.session_state["jr_step"] = labels[0]
        st.session_state["jr_shown"] = None  # show the first step before advancing


def film_strip(journey, scores: np.ndarray, form, train, labels: list[int], top: int) -> None:
    """The top proponent of each attributed step as a row of tiles, the top-`top` overlaps, and the journey's
    download (.npz)."""
    st.markdown("**Top proponent per step**")
    top1 = top_indices(scores, 1)[:, 0]
    tiles(train, [int(i) for i in top1],
          [f"{s} · #{int(i)} · {row[i]:+.2g}" for s, i, row in zip(labels, top1, scores)], "jr_film", target=56)
    st.caption(f"Step · training index · score. The top-{top} overlap with the last step is "
               + ", ".join(f"{v:.2f}" for v in form.overlap) + ".")
    d1, _ = st.columns(2)
    d1.download_button("Journey (.npz)", to_npz_bytes(**journey.arrays(), scores=scores.astype(np.float32),
                                                      x0_distance=form.x0_distance,
                                                      proponent_similarity=form.proponent_similarity,
                                                      overlap=form.overlap),
                       file_name=f"journey-{journey.meta['name'].replace(':', '-')}.npz", key="jr_npz")
