"""Data attribution for diffusion models: which training images made the model generate this?

Data flows one way through the sub-packages:

    data/ (datasets) -> models/ (checkpoints, adapter) -> features/ (output function x timesteps x noise
    -> per-sample gradients -> projector) -> store.py (cache/) -> kernel.py (one eigendecomposition, any lambda)
    -> methods/ (scores: proponents, opponents, self-influence) -> engine.py (the lifecycle) -> evaluation/,
    analysis/, magic/ -> cli/ and the Streamlit pages.

This module is the public API: the app's pages import from it only (an import contract checks it), and so do the
scripts in bench/ and docs/ for everything listed here. Names are loaded on first use, so `import attribution` stays
cheap (the command line imports what a command needs). A few names are qualified where the module's own name is
generic (`prepare.run` is `run_preparation` here, `magic.validate.evaluate` is `evaluate_magic`).

    from attribution import RunOptions, open_attribution, resolve_targets
    attribution = open_attribution(RunOptions(checkpoint="digits", method="dtrak"))
    # run featurizes the training set once (cached under cache/), then scores the target
    result = attribution.run(resolve_targets("val:0", attribution.target_model, "digits"))
    result.ranking[0][:10]        # the ten strongest proponents of val:0; result.at(0.1) re-scores at another lambda

This package never imports Streamlit.
"""

from __future__ import annotations

import importlib
import os

# Nothing in this project may download weights or data: keep the Hugging Face hub offline for every import below.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")

__version__ = "0.1.0"

# Module (under attribution.) -> the public names it gives; "public=name" where the public name differs.
_API = {
    "errors": "AttributionError CacheMismatchError CheckpointError ConfigError DatasetError FileFormatError ImageError",
    "device": "describe_device resolve_device",
    "fileio": "atomic_path write_json",
    "data": "BUILTIN_DATASETS SPLITS ImageDataset load_dataset load_image_pixels open_image pixels_to_pil "
            "pixels_to_tensor tensor_to_pixels training_dataset_of",
    "data.images": "IMAGE_SUFFIXES enlarged_note grid_image",
    "models": "Demo DiffusionModel list_shipped load_model resolve_checkpoint",
    "models.adapter": "key_prompt prompt_key",
    "train": "TrainConfig train_model=train",
    "sampling": "DEFAULT_GUIDANCE Prompt SAMPLERS gen_key sample",
    "targets": "Generated Targets from_pixels generated_label resolve_targets",
    "features.config": "DEFAULT_PROJ_DIM DEFAULT_TIMESTEPS FeatureConfig",
    "features.projectors": "make_projector usable_projectors",
    "features.timesteps": "training_timesteps",
    "store": "cache_root counterfactual_root uploads_dir",
    "kernel": "Kernel",
    "methods": "DEFAULT_METHOD METHODS RECOMMENDED_METHOD TIMESTEP_BIAS_METHODS get_method method_entries "
               "parse_method_entry",
    "methods.over_checkpoints": "run_checkpoints",
    "journey": "JourneyConfig run_journey",
    "report": "Ranked agreement_caption export_metadata export_name metadata_arrays positive_share rank ranking_rows "
              "to_csv to_npz_bytes",
    "engine": "Attribution Attributor Result format_duration open_attribution open_attributor",
    "options": "fields_of",
    "run_options": "JOURNEY_OPTIONS RunOptions",
    "prepare": "EVALUATION_SETTINGS=EVALUATION PreparationTask=Task TOUR_SETTINGS=TOUR TourSettings checkpoint_tasks "
               "estimate_text plan_preparation=plan preparation_estimates=estimates run_preparation=run "
               "share_measured_rate",
    "analysis.formation": "formation top_indices",
    "analysis.influential": "top_k_stats",
    "analysis.memorisation": "class_ranks size_normalized",
    "analysis.norms": "NormConfig sample_curve training_norms",
    "evaluation.bank": "Bank bank_for_model banks_dir list_banks",
    "evaluation.evaluate": "SweepPoint bank_targets_cached lambda_report lds_table open_on_bank option_sweep "
                           "run_on_bank score_bank split_rows",
    "evaluation.lds": "SINGLE_SEED LdsTable holm",
    "evaluation.retraining_estimators": "heldout_lds_table",
    "evaluation.ray_featurize": "featurize_on_cluster",
    "evaluation.verdict": "BASELINE_SIMILARITY HeldOutLambda held_out_lambda target_split verdict",
    "evaluation.counterfactual": "COUNTERFACTUAL_CONTROL=CONTROL COUNTERFACTUAL_RANDOM=RANDOM "
                                 "CounterfactualStudy=Study list_studies",
    "evaluation.counterfactual_stats": "COUNTERFACTUAL_METRICS=METRICS best_supported dose_response "
                                       "counterfactual_per_target=per_target counterfactual_rows=summary_rows "
                                       "counterfactual_seed_noise=seed_noise counterfactual_verdict=verdict",
    "magic.query": "query_metagradient train_magic_run=train_run",
    "magic.runs": "MagicRun MagicSpec list_magic_runs=list_runs open_magic_run=open_run",
    "magic.validate": "evaluate_magic=evaluate magic_fit_summary=fit_summary",
    "figures": "formation_figure influential_figure lds_lambda_figure lds_option_figure norm_curve_figure "
               "norm_scatter_figure per_checkpoint_figure per_target_figure selected_points",
}

_WHERE: dict[str, tuple[str, str]] = {}
for _module, _names in _API.items():
    for _entry in _names.split():
        _public, _, _name = _entry.partition("=")
        _WHERE[_public] = (_module, _name or _public)

__all__ = sorted(_WHERE)


def __getattr__(name: str):
    """Load a public name from its module on first use (PEP 562)."""
    try:
        module, attr = _WHERE[name]
    except KeyError:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
    value = getattr(importlib.import_module(f"{__name__}.{module}"), attr)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
