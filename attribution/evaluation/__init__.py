"""Evaluation of attribution methods against retrained models: the linear datamodeling score (LDS) and its
statistics (`lds.py`: standard and centered LDS, noise ceilings, random baselines, model-aware confidence intervals
and paired comparisons, all pure numpy/scipy), and the ground-truth banks of retrained models they are computed on.
"""
