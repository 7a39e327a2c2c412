"""Analyses over the engine's gradients and scores: gradient norm versus timestep (`norms`) and generally
influential training samples (`influential`)."""
