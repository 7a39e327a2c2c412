"""Evaluating attributions against retraining: recipes, the Ray fan-out, ground-truth banks and LDS statistics."""
