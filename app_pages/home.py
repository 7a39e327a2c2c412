"""Home: what the app does, how far to trust it (from what it measures) and where to start: the Tour."""

import streamlit as st

st.title("Which training images made this image?")
st.markdown(
    """
This app traces images made by a diffusion model back to the **training images** that shaped them, with
TRAK-style data attribution (D-TRAK, TRAK, DAS and the gradient baselines of the D-TRAK paper), checkpoint-based
attribution (Diffusion-TracIn and -ReTrac, TracInCP, GAS) and per-denoising-step attribution (Journey). Every
training image gets a signed score for a target image:

- **Proponents** have large *positive* scores: training on them made the model more likely to produce the target.
- **Opponents** have large *negative* scores: they pushed the model away from the target.
"""
)
st.page_link("app_pages/tour.py", label="**Start with the Tour**: five steps through one generated digit, one button "
             "each", icon=":material/school:")

st.subheader("How far to trust the scores")
st.markdown(
    """
Scores are estimates from the gradients of the trained model, not a replay of training. The app measures how well
they predict retraining (the **Evaluation** page: the linear datamodeling score, LDS, against models retrained on
random halves of the training set). On the digits bank a perfect method would reach LDS +0.64 on validation digits
and +0.52 on generated ones (retraining noise caps it there); D-TRAK reaches **37% / 24%** of that, D-TRAK with
the Avg output (the recommended setting) 52% / 46%, and plain pixel similarity as much (51% / 49%). The
**Counterfactual** page shows the test a student can see: retrained without a method's top 20% of proponents
(with common random numbers, so only the removal differs), the model redraws its images **2.4x** as far from the
original with D-TRAK Avg's proponents removed as with random images removed, 3.1x with pixel similarity's (and
2.3-2.8x and 3.1-4.2x when 5% or 10% are removed); D-TRAK's default output and TRAK do no better than random.

So read a ranking as a lead to check, not a verdict: the sentence beside a result gives the LDS of its method and
λ where the model has a bank.
"""
)

st.subheader("Then, on your own image")
st.markdown(
    """
1. **Pick a dataset and a checkpoint** in the sidebar. The shipped `digits` model is the quickest; any training
   run folder works too.
2. **Choose the image:** generate one from a seed, upload your own, or pick a training or validation image. It is
   the current image of every page, and in the link.
3. **Attribute it:** the Attribute page ranks every training image by its influence on the image; the
   Self-influence page ranks them by how much they support themselves (memorisation).
4. **Follow its journey:** the Journey page attributes each denoising step.
5. **See the timestep bias:** the Timesteps page plots gradient norms against the diffusion timestep and counts the
   "generally influential" training images each method keeps returning.
"""
)
col1, col2, col3, col4, col5, col6 = st.columns(6)
col1.page_link("app_pages/generate.py", label="Generate images", icon=":material/auto_awesome:")
col2.page_link("app_pages/upload.py", label="Upload an image", icon=":material/upload:")
col3.page_link("app_pages/attribute.py", label="Attribute", icon=":material/hub:")
col4.page_link("app_pages/journey.py", label="Journey", icon=":material/route:")
col5.page_link("app_pages/evaluation.py", label="Evaluation", icon=":material/fact_check:")
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
