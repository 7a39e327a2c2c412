"""Evaluating attributions against retraining: retraining recipes (`recipes.py`), the Ray fan-out
(`ray_engine.py`), ground-truth banks of retrained models (`bank.py`), the linear datamodeling score and its
statistics (`lds.py`: standard and centered LDS, noise ceilings, random baselines, model-aware confidence intervals
and paired comparisons, pure numpy/scipy; the retraining-free GCV lambda is `attribution/lambda_choice.py`), and
any engine method evaluated on a bank (`evaluate.py`); counterfactual studies (`counterfactual.py`: remove the top
proponents, retrain, regenerate; `counterfactual_stats.py`, `image_metrics.py`) and the retraining-based estimators
Empirical Influence and Datamodels (`retraining_estimators.py`).
"""
