"""Data attribution for diffusion models.

Data flows one way through the sub-packages:

    data/ (datasets) -> models/ (checkpoints, adapter) -> features/ (output function x timesteps x noise
    -> per-sample gradients -> projector) -> store.py (cache/) -> kernel.py (one eigendecomposition, any lambda)
    -> methods/ (scores: proponents, opponents, self-influence) -> cli.py and the Streamlit pages.

This package never imports Streamlit.
"""

import os

# Nothing in this project may download weights or data: keep the Hugging Face hub offline for every import below.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")

__version__ = "0.1.0"
