"""Home: what the app does and how to start."""

import streamlit as st

st.title("Which training images made this image?")
st.markdown(
    """
This app traces images made by a diffusion model back to the **training images** that shaped them, with
TRAK-style data attribution (D-TRAK and TRAK, with the gradient baselines of the D-TRAK paper), checkpoint-based
attribution (Diffusion-TracIn and -ReTrac, TracInCP, GAS) and per-denoising-step attribution (Journey). Every
training image gets a signed score for a target image:

- **Proponents** have large *positive* scores: training on them made the model more likely to produce the target.
  Removing them would make it less likely.
- **Opponents** have large *negative* scores: they pushed the model away from the target.

Scores are estimates from gradients of the trained model, not a replay of training; they rank images well but are
not calibrated probabilities.
"""
)

st.subheader("How to start")
st.markdown(
    """
1. **Pick a dataset and a checkpoint** in the sidebar. The shipped `digits` model is the quickest; any training
   run folder works too.
2. **Choose a target image:** generate one from a seed, or upload your own.
3. **Attribute it:** the Attribute page ranks every training image by its influence on the target; the
   Self-influence page ranks them by how much they support themselves (memorisation).
4. **Follow one image's journey:** the Journey page attributes each denoising step, showing where the image's
   features are decided and how its proponents change along the way.
5. **See the timestep bias:** the Timesteps page plots gradient norms against the diffusion timestep and counts the
   "generally influential" training images each method keeps returning.
6. **Look at the training data** the model learnt from, filtered by class.
"""
)
col1, col2, col3, col4, col5, col6 = st.columns(6)
col1.page_link("app_pages/generate.py", label="Generate images", icon=":material/auto_awesome:")
col2.page_link("app_pages/upload.py", label="Upload an image", icon=":material/upload:")
col3.page_link("app_pages/attribute.py", label="Attribute", icon=":material/hub:")
col4.page_link("app_pages/journey.py", label="Journey", icon=":material/route:")
col5.page_link("app_pages/timesteps.py", label="Timesteps", icon=":material/timeline:")
col6.page_link("app_pages/training_data.py", label="Training data", icon=":material/grid_view:")

st.subheader("From the command line")
st.markdown("The same library runs without the app; every command prints what it computes and where it writes.")
st.code(
    """python -m attribution train --dataset digits --out runs/digits          # train a small DDPM
python -m attribution generate --checkpoint digits --n 16 --out out/gen   # images with seeds 0..15
python -m attribution score --checkpoint digits --target gen:3             # proponents and opponents
python -m attribution journey --checkpoint digits --seed 3 --out out/j3     # per denoising step
python -m attribution norms --checkpoint digits --samples 500               # gradient norm vs timestep
python -m attribution app                                                  # this app""",
    language="bash",
)
