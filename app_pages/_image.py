"""The current image: the one image that the Generate, Upload, Attribute, Journey and Timesteps pages share, kept in
the URL so that a link reopens it. Not a page.

An `ImageRef` names it: a generated seed with its sampling options and prompt, an uploaded file by its content hash
or a training or validation image. The session holds it; `sync_url` (app.py, every run) writes it to the query
parameters, and a new session opened on a link reads it from them:

    ?image=gen:7&steps=20&sampler=ddim        ?image=gen:3&prompt=a+handwritten+digit+7&guidance=3
    ?image=val:12                             ?image=upload:<sha256 prefix>   (the file is kept in cache/uploads/)

Every page that takes an image draws the same picker (`pick_image`): its widgets show the current image, and an
image picked in them becomes the current image of every page. `image_target` turns it into the attribution target
the library computes with (pixels and noise key), as `attribution.targets` does for the command line.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace

import numpy as np
import streamlit as st
import torch

from app_pages._prompt import default_guidance, default_prompt, demo_of, prompt_inputs
from app_pages._ui import cached_model, read_upload
from attribution import (
    DEFAULT_GUIDANCE,
    SAMPLERS,
    Generated,
    ImageError,
    Prompt,
    Targets,
    from_pixels,
    gen_key,
    generated_label,
    prompt_key,
    resolve_targets,
    sample,
    tensor_to_pixels,
    training_dataset_of,
    uploads_dir,
)

KEY = "current_image"  # the session's ImageRef
PARAMS = ("image", "steps", "sampler", "prompt", "negative", "guidance")  # its query parameters
SOURCES = {"gen": "Generated", "upload": "Uploaded", "train": "Training image", "val": "Validation image"}
KIND_OF = {label: kind for kind, label in SOURCES.items()}
CLI_STEPS = 50  # how the command line's gen:SEED is sampled: 50 steps of the model's default sampler
SAMPLER_HELP = ("DDPM models: ddim is deterministic given the seed; ddpm adds fresh (seeded) noise at every step. "
                "Flow-matching models: euler or heun (an ODE solver, two network calls per step).")
MAX_NUMBER = 2**31 - 1  # the largest seed (and index) the picker takes
_SPEC = re.compile(r"(gen|train|val):(\d+)|upload:([0-9a-f]{16})")


@dataclass(frozen=True)
class ImageRef:
    """One image, by name: `kind` "gen" (seed `number`, sampled with `steps` and `sampler`, None: the model's
    default, ddpm or euler for flow matching), "upload" (the file
    with sha256 prefix `upload`), "train" or "val" (index `number`). `prompt`, `negative` and `guidance`: what a
    text-conditional model generates the image from, or attributes an upload under (None: unconditional)."""

    kind: str = "gen"
    number: int = 0
    steps: int = CLI_STEPS
    sampler: str | None = None
    prompt: str | None = None
    negative: str = ""
    guidance: float | None = None
    upload: str = ""

    @property
    def spec(self) -> str:
        return f"upload:{self.upload}" if self.kind == "upload" else f"{self.kind}:{self.number}"

    @property
    def as_cli_samples(self) -> bool:
        """A generated image sampled as the command line's gen:SEED is (the default sampler, 50 steps)."""
        return self.steps == CLI_STEPS and self.sampler is None

    def the_prompt(self) -> Prompt | None:
        if self.prompt is None:
            return None
        return Prompt(self.prompt, self.negative, DEFAULT_GUIDANCE if self.guidance is None else self.guidance)

    def describe(self, name: str | None = None) -> str:
        """"gen:7 · ddim, 20 steps · “a handwritten digit 7”, guidance 3" (`name`: an upload's file name)."""
        parts = [name or self.spec]
        if self.kind == "gen" and not self.as_cli_samples:
            parts.append(f"{self.sampler or 'default sampler'}, {self.steps} steps")
        prompt = self.the_prompt()
        if prompt is not None:
            parts.append(f"“{prompt.text}”, guidance {prompt.guidance:g}")
        return " · ".join(parts)

    def params(self) -> dict[str, str]:
        """The query parameters that name it (sampling options only where they are not gen:SEED's)."""
        out = {"image": self.spec}
        if self.kind == "gen" and not self.as_cli_samples:
            out.update(steps=str(self.steps), **({} if self.sampler is None else {"sampler": self.sampler}))
        prompt = self.the_prompt()
        if prompt is not None:
            out.update(prompt=prompt.text, guidance=f"{prompt.guidance:g}")
            if prompt.negative:
                out["negative"] = prompt.negative
        return out

    @classmethod
    def from_params(cls, params: dict) -> ImageRef | None:
        """The image a link names (None when it names none); ImageError, one line, for a value it cannot read."""
        spec = str(params.get("image", "")).strip()
        if not spec:
            return None
        m = _SPEC.fullmatch(spec)
        if not m or (m[2] and int(m[2]) > MAX_NUMBER):
            raise ImageError(f"the link's image={spec!r} is not gen:SEED, train:I, val:I or upload:HASH (SEED and I "
                             f"at most {MAX_NUMBER})")
        ref = cls("upload", upload=m[3]) if m[3] else cls(m[1], int(m[2]))

        def number(name: str, kind, least: float, most: float):
            try:
                value = kind(params[name])
            except ValueError:
                value = None
            if value is None or not least <= value <= most:
                raise ImageError(f"the link's {name}={params[name]!r} is not a number from {least:g} to {most:g}")
            return value

        if "steps" in params:
            ref = replace(ref, steps=number("steps", int, 1, 10_000))
        if "sampler" in params:
            if params["sampler"] not in SAMPLERS:
                raise ImageError(f"the link's sampler={params['sampler']!r} is not one of {', '.join(SAMPLERS)}")
            ref = replace(ref, sampler=params["sampler"])
        if "prompt" in params:
            ref = replace(ref, prompt=str(params["prompt"]), negative=str(params.get("negative", "")),
                          guidance=number("guidance", float, 1, 30) if "guidance" in params else None)
        return ref


# -- the session's image and the URL ----------------------------------------------------------------------------


def _write_url(ref: ImageRef | None) -> None:
    want = {} if ref is None else ref.params()
    for name in PARAMS:
        if name in want:
            if st.query_params.get(name) != want[name]:
                st.query_params[name] = want[name]
        elif name in st.query_params:
            del st.query_params[name]


def sync_url() -> None:
    """Every run (app.py): the session's current image into the URL (a page switch may have dropped it); a new
    session takes it from the URL, so a link opens on its image. A link it cannot read is one error line."""
    ref = st.session_state.get(KEY)
    if ref is None:
        try:
            ref = ImageRef.from_params(st.query_params.to_dict())
        except ImageError as exc:
            st.error(str(exc), icon=":material/error:")
            return
        if ref is None:
            return
        st.session_state[KEY] = ref
    _write_url(ref)


def set_current(ref: ImageRef) -> None:
    st.session_state[KEY] = ref
    _write_url(ref)


def forget_upload() -> None:
    """A rejected upload replaces the previous one: an uploaded current image stops being current."""
    if getattr(st.session_state.get(KEY), "kind", None) == "upload":
        del st.session_state[KEY]
        _write_url(None)


def default_ref(model, kind: str = "gen") -> ImageRef:
    """The image a page starts on without a current one: the model's demo seed (demo.json) and, for a
    text-conditional model, its demo prompt and guidance."""
    ref = ImageRef(kind, demo_of(model).seed if kind == "gen" else 0)
    if model.conditional and kind in ("gen", "upload"):
        ref = replace(ref, prompt=default_prompt(model), guidance=default_guidance(model))
    return ref


def current(model) -> ImageRef:
    return st.session_state.get(KEY) or default_ref(model)


# -- the picker ---------------------------------------------------------------------------------------------------


def pick_image(model, prefix: str) -> ImageRef:
    """The image picker of a page (widget keys `{prefix}_source`, `_seed`, `_steps`, `_sampler`, `_train_idx`,
    `_val_idx` and the prompt's): it shows the current image and makes the image picked in it the current one.

    A widget whose key holds a value (drawn in this page's last run, or set by a callback such as Evaluation's
    "attribute" button) keeps it; the others show the current image, or the defaults when the widgets name another
    image. Stops the page with guidance when the source has no image (no upload yet)."""
    ss = st.session_state
    ref = current(model)
    number_keys = {"gen": f"{prefix}_seed", "train": f"{prefix}_train_idx", "val": f"{prefix}_val_idx"}
    kind = KIND_OF.get(ss.get(f"{prefix}_source"), ref.kind)
    held = ss.get(number_keys[kind]) if kind in number_keys else None
    if kind != ref.kind or (held is not None and int(held) != ref.number):  # the widgets name another image
        base = default_ref(model, kind)
        ref = replace(base, number=int(held)) if held is not None else base

    def show(key: str, value) -> str:
        if key not in ss:
            ss[key] = value
        return key

    kind = KIND_OF[st.radio("Image", list(SOURCES.values()), horizontal=True, label_visibility="collapsed",
                            key=show(f"{prefix}_source", SOURCES[ref.kind]))]
    if kind == "gen":
        c1, c2, c3 = st.columns(3)
        if ref.steps > model.num_timesteps:  # a link made with another model
            st.warning(f"{ref.steps} sampling steps are more than this model's {model.num_timesteps} timesteps: "
                       f"{model.num_timesteps}.", icon=":material/warning:")
            ref = replace(ref, steps=model.num_timesteps)
        seed = c1.number_input("Seed", 0, MAX_NUMBER, key=show(f"{prefix}_seed", ref.number),
                               help="A seed names one image: gen:SEED on the command line (50 steps of the model's "
                                    "default sampler).")
        steps = c2.number_input("Sampling steps", 1, model.num_timesteps, key=show(f"{prefix}_steps", ref.steps))
        samplers, default = model.schedule.samplers, model.schedule.default_sampler
        if ss.get(f"{prefix}_sampler") not in (None, *samplers):  # a sampler of another kind of model
            ss[f"{prefix}_sampler"] = default
        sampler = c3.selectbox("Sampler", samplers, key=show(f"{prefix}_sampler", ref.sampler or default),
                               help=SAMPLER_HELP)
        as_cli = sampler == default and int(steps) == CLI_STEPS  # gen:SEED (the sampler named otherwise)
        picked = ImageRef("gen", int(seed), int(steps), None if as_cli else sampler)
    elif kind == "upload":
        up = ss.get("uploaded")
        sha = ref.upload or (up["sha256"] if up else "")
        if not sha:
            st.info("Upload an image on the **Upload** page first (it is converted to what this model sees).")
            st.stop()
        picked = ImageRef("upload", upload=sha)
    else:
        label = "Training" if kind == "train" else "Validation"
        index = st.number_input(f"{label} image index", 0, MAX_NUMBER, key=show(number_keys[kind], ref.number))
        picked = ImageRef(kind, int(index))
    if model.conditional and kind in ("gen", "upload"):
        show(f"{prefix}_prompt", ref.prompt if ref.prompt is not None else default_prompt(model))
        show(f"{prefix}_negative", ref.negative)
        show(f"{prefix}_guidance", float(ref.guidance if ref.guidance is not None else default_guidance(model)))
        prompt = prompt_inputs(model, prefix)
        picked = replace(picked, prompt=prompt.text, negative=prompt.negative, guidance=prompt.guidance)
    if picked != ss.get(KEY):
        set_current(picked)
    return picked


# -- the image itself ---------------------------------------------------------------------------------------------


@st.cache_data(max_entries=16, show_spinner="Generating the image…")
def generated_pixels(checkpoint: str, seed: int, prompt: tuple | None = None, steps: int = CLI_STEPS,
                     sampler: str | None = None) -> np.ndarray:
    """uint8 (R, R, C): the image `checkpoint` generates from `seed` (`prompt`: (text, negative, guidance) for a
    text-conditional model); with the defaults, the command line's gen:SEED. Sampled once per arguments, not on
    every rerun of a page."""
    traj = sample(cached_model(checkpoint), 1, int(seed), steps=steps, sampler=sampler,
                  prompt=None if prompt is None else Prompt(*prompt))
    return tensor_to_pixels(torch.from_numpy(traj.final))[0]


def _batch_pixels(model, ref: ImageRef) -> np.ndarray | None:
    """The pixels of `ref` in the Generate page's last batch, when it made this image (same checkpoint, seed,
    sampling options and prompt): the image that page shows and downloads."""
    gen = st.session_state.get("generated")
    prompt = ref.the_prompt()
    if (not gen or gen.get("pixels") is None or gen["checkpoint"] != model.spec or ref.number not in gen["seeds"]
            or (int(gen["steps"]), gen["sampler"]) != (ref.steps, ref.sampler or model.schedule.default_sampler)
            or gen.get("prompt") != (None if prompt is None else prompt.to_dict())):
        return None
    return gen["pixels"][gen["seeds"].index(ref.number)]


def save_upload(data: bytes, record: dict) -> None:
    """Keep an accepted upload under cache/uploads/<hash>/ so that a link naming it reopens it."""
    folder = uploads_dir() / record["sha256"]
    if not folder.is_dir():
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / ".partial"
        tmp.write_bytes(data)
        tmp.rename(folder / (re.sub(r"[^A-Za-z0-9._ -]+", "_", record["name"]).strip(". ") or "upload"))


def upload_record(model, sha: str) -> dict:
    """The upload with this hash as `model` sees it: the session's, else the file kept in cache/uploads/ (read for
    this model's resolution and channels, and made the session's)."""
    up = st.session_state.get("uploaded")
    if up and up["sha256"] == sha and (up["resolution"], up["channels"]) == (model.resolution, model.channels):
        return up
    folder = uploads_dir() / sha
    files = sorted(p for p in folder.iterdir() if not p.name.startswith(".")) if folder.is_dir() else []
    if not files:
        raise ImageError(f"the uploaded image {sha} is not on this server; upload it again on the Upload page")
    record = {**read_upload(files[0].read_bytes(), files[0].name, model.resolution, model.channels),
              "checkpoint": model.spec}
    st.session_state["uploaded"] = record
    return record


def image_target(model, ref: ImageRef, dataset: str | None) -> tuple[Targets, str]:
    """`ref` as an attribution target (pixels, noise key, how it was made) and the name the command line gives it:
    gen:SEED when it was sampled as the CLI's gen:SEED is, else its PNG (seed-SEED.png, which the page offers and
    the CLI reads back to the same pixels and key); an upload by its file name; a dataset image as train:I or val:I
    (resolved by `attribution.targets` for the model's training set). AttributionError, one line, when it cannot
    be made."""
    prompt = ref.the_prompt()
    if ref.kind == "gen":
        pixels = _batch_pixels(model, ref)
        if pixels is None:
            pixels = generated_pixels(model.spec, ref.number, None if prompt is None else
                                      (prompt.text, prompt.negative, prompt.guidance), ref.steps, ref.sampler)
        spec = f"gen:{ref.number}" if ref.as_cli_samples else f"seed-{ref.number:06d}.png"
        target = from_pixels(pixels[None], [spec], [generated_label(model, prompt)])
        if ref.as_cli_samples:
            target.keys[0] = gen_key(ref.number, prompt)  # the noise key the CLI gives gen:SEED
        target.generated = [Generated(ref.number, ref.steps, ref.sampler or model.schedule.default_sampler, prompt)]
    elif ref.kind == "upload":
        up = upload_record(model, ref.upload)
        spec = up["name"]
        target = from_pixels(up["pixels"][None], [spec])
    else:
        spec = ref.spec
        target = resolve_targets(spec, model, training_dataset_of(model, dataset).spec)
        prompt = None  # a dataset image keeps its own prompt
    if prompt is not None and target.keys[0].startswith("file/"):  # an image file attributed under a prompt
        target.keys[0] = prompt_key(target.keys[0], prompt.text)
    return target, spec
