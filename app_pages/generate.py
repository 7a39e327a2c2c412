"""Generate: sample images from the chosen checkpoint; the first image of the batch becomes the current image."""

import time

import streamlit as st

from app_pages._image import CLI_STEPS, SAMPLER_HELP, ImageRef, set_current
from app_pages._prompt import as_prompt, demo_of, prompt_flags, prompt_from_state, prompt_inputs
from app_pages._ui import display_size, fail, generate_images, image_grid, pngs_zip, progress_bar, require_model
from attribution import AttributionError

st.title("Generate")
model = require_model()
st.caption(f"`{model.spec}` · {model.resolution}×{model.resolution} px, {model.channels} channel(s) · "
           f"{model.info.schedule_note if model.info else ''}")


def _queue() -> None:
    """Submit callback: remember the job, so this run can draw the button disabled while it works.

    Inside a form, editing the inputs never reruns the script; only the button would, so disabling it is enough to
    keep a click from aborting the job. (Disabling the inputs too would reset their values after the job.)
    """
    st.session_state["generate_job"] = {k: st.session_state[f"gen_{k}"] for k in ("seed", "n", "steps", "sampler")}
    st.session_state["generate_job"]["prompt"] = prompt_from_state(model, "gen")


job = st.session_state.pop("generate_job", None)
with st.form("generate"):
    c1, c2, c3, c4 = st.columns(4)
    c1.number_input("Seed", 0, 2**31 - 1, demo_of(model).seed, key="gen_seed",
                    help="Image i gets seed SEED+i, so a seed names the same image everywhere.")
    c2.number_input("Images", 1, 64, 8, key="gen_n")
    c3.number_input("Steps", 1, model.num_timesteps, 50, key="gen_steps",
                    help="Sampling steps; fewer is faster and rougher.")
    if st.session_state.get("gen_sampler") not in (None, *model.schedule.samplers):  # another kind of model's
        del st.session_state["gen_sampler"]
    c4.selectbox("Sampler", model.schedule.samplers, key="gen_sampler", help=SAMPLER_HELP)
    prompt_inputs(model, "gen")
    st.form_submit_button("Generate", type="primary", on_click=_queue, disabled=job is not None)

if job is not None:
    start = time.time()
    with st.status(f"Generating {job['n']} images with {job['sampler']} ({job['steps']} steps)…",
                   expanded=True) as status:
        try:
            result = generate_images(model, job["n"], job["seed"], job["steps"], job["sampler"],
                                     progress=progress_bar("Sampling"), prompt=job["prompt"])
        except AttributionError as exc:
            status.update(state="error")
            fail(exc)
        status.update(label=f"Generated {job['n']} images in {time.time() - start:.1f} s", state="complete")
    st.session_state["generated"] = {**result, "seconds": round(time.time() - start, 1)}
    made = job["prompt"]
    as_cli = job["sampler"] == model.schedule.default_sampler and int(job["steps"]) == CLI_STEPS  # gen:SEED
    set_current(ImageRef("gen", int(job["seed"]), int(job["steps"]), None if as_cli else job["sampler"],
                         *(() if made is None else (made.text, made.negative, made.guidance))))
    st.rerun()  # redraw with the form enabled

generated = st.session_state.get("generated")
if not generated:
    st.info("Choose a seed and the number of images, then press **Generate**.")
    st.stop()

seeds, pixels = generated["seeds"], generated["pixels"]
st.subheader(f"{len(seeds)} images · seeds {seeds[0]}–{seeds[-1]}")
st.caption(f"`{generated['checkpoint']}` · {generated['sampler']}, {generated['steps']} steps · "
           f"{generated.get('seconds', '?')} s" + (f" · “{generated['prompt']['prompt']}”" if generated.get("prompt")
                                                   else ""))
if generated["checkpoint"] != model.spec:
    st.warning(f"These images came from `{generated['checkpoint']}`, not the checkpoint now selected.")
size = display_size(pixels.shape[1], 96)
image_grid(pixels, [f"seed {s}" for s in seeds], size, key="generated_grid")
st.caption(f"The first, seed {seeds[0]}, became the current image: the Attribute, Journey and Timesteps pages open on "
           "it (their seed picks another).")
st.download_button("Download PNGs (.zip)", pngs_zip(pixels, [f"seed-{s:06d}.png" for s in seeds]),
                   file_name="generated.zip", mime="application/zip", icon=":material/download:")
st.code(f"python -m attribution generate --checkpoint {generated['checkpoint']} --n {len(seeds)} "
        f"--seed {seeds[0]} --steps {generated['steps']} --sampler {generated['sampler']} --out out/gen"
        + prompt_flags(as_prompt(generated.get("prompt"))),
        language="bash", wrap_lines=True)
