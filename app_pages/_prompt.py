"""Prompt inputs for conditional models: prompt, negative prompt and guidance scale for text-conditional (latent)
models, a class and the guidance scale for class-conditional ones (a DiT). Not a page.

Unconditional models get no inputs (`prompt_inputs` returns None), so the pages stay as they were for them.
"""

from __future__ import annotations

import streamlit as st

from attribution import DEFAULT_GUIDANCE, AttributionError, Demo, Prompt


def demo_of(model) -> Demo:
    """The demo defaults recorded with the model (`demo.json` beside a shipped model), else the plain ones; an
    unreadable demo.json is one warning line, and the plain defaults."""
    try:
        return model.info.demo() if model.info is not None else Demo()
    except AttributionError as exc:
        st.warning(str(exc), icon=":material/warning:")
        return Demo()


def default_prompt(model) -> str:
    """The model's demo prompt, else the first class prompt of its finetuning set ("a handwritten digit 5"), else
    empty."""
    return demo_of(model).prompt or next(iter(model.class_prompts()), "")


def default_guidance(model) -> float:
    """The model's demo guidance scale, else Stable Diffusion's 7.5."""
    guidance = demo_of(model).guidance
    return DEFAULT_GUIDANCE if guidance is None else guidance


def prompt_inputs(model, key: str) -> Prompt | None:
    """Prompt, negative prompt and guidance for a text-conditional model (None for an unconditional one)."""
    if not model.conditional:
        return None
    c1, c2, c3 = st.columns([3, 2, 1])
    # Defaults go into the session before the widgets are drawn, and the widgets take theirs from there only: a
    # widget given both a default and a session value (the image picker's `show`) makes Streamlit log a warning.
    ss = st.session_state
    if model.conditioned_on == "class":  # a class-conditional model: its class names, the null class to guide from
        classes = model.class_prompts()
        if ss.get(f"{key}_prompt") not in (None, *classes):  # another model's prompt
            del ss[f"{key}_prompt"]
        ss.setdefault(f"{key}_prompt", default_prompt(model))
        text = c1.selectbox("Class", classes, key=f"{key}_prompt",
                            help="The class the class-conditional model generates; training images keep their own.")
        negative = ""
        c2.caption("Guidance pushes away from the null class (the unconditional model).")
    else:
        ss.setdefault(f"{key}_prompt", default_prompt(model))
        text = c1.text_input("Prompt", key=f"{key}_prompt",
                             help="What the text-conditional model generates; training images keep their own "
                                  "prompts (their class through the finetuning template).")
        negative = c2.text_input("Negative prompt", key=f"{key}_negative",
                                 help="Classifier-free guidance pushes away from it (empty: the unconditional "
                                      "prompt).")
    ss.setdefault(f"{key}_guidance", float(default_guidance(model)))
    guidance = c3.number_input("Guidance", 1.0, 30.0, step=0.5, key=f"{key}_guidance",
                               help="Classifier-free guidance scale (1 = none). The default is the model's recorded "
                                    "demo value (demo.json) where it has one, else Stable Diffusion's 7.5.")
    return Prompt(text, negative, float(guidance))


def prompt_from_state(model, key: str) -> Prompt | None:
    """The prompt `prompt_inputs(model, key)` holds in the session (what a form's submit callback reads)."""
    if not model.conditional:
        return None
    return Prompt(st.session_state.get(f"{key}_prompt", default_prompt(model)),
                  st.session_state.get(f"{key}_negative", ""),
                  float(st.session_state.get(f"{key}_guidance", default_guidance(model))))


def as_prompt(d: dict | None) -> Prompt | None:
    """A `Prompt` from its `to_dict()` (None stays None)."""
    return None if d is None else Prompt(d["prompt"], d["negative"], d["guidance"])


def prompt_flags(prompt: Prompt | None) -> str:
    """The command line's prompt options (empty for an unconditional model)."""
    if prompt is None:
        return ""
    out = f" --prompt '{prompt.text}'"
    if prompt.negative:
        out += f" --negative-prompt '{prompt.negative}'"
    return out + f" --guidance {prompt.guidance:g}"
