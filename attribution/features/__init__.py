"""Features: output functions x timesteps x noise -> per-sample gradients -> projector (and model-free
embeddings for the similarity baselines)."""
