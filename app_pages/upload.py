"""Upload: your own image as the current image (an attribution target), shown as the model sees it."""

import streamlit as st

from app_pages._image import KEY, ImageRef, forget_upload, save_upload, set_current, upload_record
from app_pages._ui import display_size, fail, read_upload, require_model
from attribution import IMAGE_SUFFIXES, AttributionError, pixels_to_pil

st.title("Upload")
model = require_model()
st.markdown(f"The image is centre-cropped to a square, resized to **{model.resolution}×{model.resolution}** "
            f"and converted to **{'grayscale' if model.channels == 1 else 'RGB'}**: exactly what `{model.spec}` "
            "sees. Transparency becomes black.")

file = st.file_uploader("Image (PNG, JPEG, BMP, GIF, WebP, TIFF)", type=[s.lstrip(".") for s in IMAGE_SUFFIXES],
                        key="upload_file")
if file is not None:
    try:
        st.session_state["uploaded"] = {**read_upload(file.getvalue(), file.name, model.resolution, model.channels),
                                        "checkpoint": model.spec}
        save_upload(file.getvalue(), st.session_state["uploaded"])
        set_current(ImageRef("upload", upload=st.session_state["uploaded"]["sha256"]))
    except AttributionError as exc:  # the previous upload stops being the target: this one replaced it
        st.session_state.pop("uploaded", None)
        forget_upload()
        st.error(str(exc), icon=":material/error:")
elif getattr(st.session_state.get(KEY), "kind", None) == "upload":  # opened on a link that names an upload
    try:
        upload_record(model, st.session_state[KEY].upload)
    except AttributionError as exc:
        fail(exc)

uploaded = st.session_state.get("uploaded")
if not uploaded:
    st.info("Upload an image to use it as an attribution target.")
    st.stop()
if (uploaded["resolution"], uploaded["channels"]) != (model.resolution, model.channels):
    st.warning(f"{uploaded['name']} was prepared for `{uploaded['checkpoint']}` "
               f"({uploaded['resolution']}×{uploaded['resolution']}); upload it again for the checkpoint now "
               "selected.")

if uploaded.get("note"):
    st.warning(uploaded["note"], icon=":material/warning:")

left, right = st.columns(2)
with left:
    st.markdown(f"**Original** · {uploaded['name']}")
    st.image(uploaded["preview"], width=256)
with right:
    st.markdown(f"**As the model sees it** · {uploaded['resolution']}×{uploaded['resolution']}")
    st.image(pixels_to_pil(uploaded["pixels"], display_size(uploaded["resolution"], 256)), width=256,
             output_format="PNG")
st.caption(f"The current image of the Attribute, Journey and Timesteps pages: upload:{uploaded['sha256']} in the "
           "link, kept on this server (cache/uploads/) so that the link reopens it.")
