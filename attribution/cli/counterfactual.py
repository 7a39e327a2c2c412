"""CLI commands `counterfactual` (remove top proponents, retrain, regenerate, measure) and `estimators` (Empirical
Influence and Datamodels fitted on a bank's subset models, LDS on held-out subsets).

    python -m attribution counterfactual --bank digits --targets gen:0-9 --remove 0.05 \\
        --methods random,pixel-cos,trak,dtrak [--opponents] [--remove-grid 0.05,0.1,0.2] [--seeds 2] [--controls]
    python -m attribution estimators --bank digits --method dtrak,trak [--ray]
"""

from __future__ import annotations

import argparse
import math

from ..errors import ConfigError
from ..evaluation.counterfactual import StudySpec  # (its module loads nothing the parser does not: no Ray)
from ..options import add_arguments, from_args
from ..run_options import FEATURE_OPTIONS, add_run_options, given_options
from .common import add_ray_options, info, progress_bar
from .evaluation import LDS_RUN_OPTIONS, bank_feature_options, bank_runs


def add_commands(sub) -> None:
    p = sub.add_parser("counterfactual", help="remove each method's top proponents of generated images, retrain "
                                              "(on Ray), regenerate from the same seed and measure the change")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--bank", help="a ground-truth bank: its model, recipe and seed (studies saved in the bank)")
    src.add_argument("--checkpoint", help="a training run folder: its final checkpoint, run.json recipe and seed")
    add_arguments(p, StudySpec, argparse_choices=False)  # what to compute: the study's schema
    p.set_defaults(steps=None)  # the bank's sampling steps unless given
    p.add_argument("--remove-grid", dest="removals", metavar="K,K,..", default=argparse.SUPPRESS,
                   help="the same as --remove (several K: a dose-response)")
    # the methods' feature options, those of `score` (--clip-weights also adds the CLIP cosine measure)
    add_run_options(p, only=FEATURE_OPTIONS)
    p.add_argument("--out", help="study folder (default: the bank's counterfactual/ folder, else the cache)")
    add_ray_options(p)
    p.set_defaults(func=cmd_counterfactual)

    e = sub.add_parser("estimators", help="Empirical Influence and Datamodels fitted on part of a bank's subset "
                                          "models, LDS on the held-out subsets (beside any --method)")
    e.add_argument("--bank", required=True, help="a bank name under banks/ or a bank folder")
    e.add_argument("--method", default="", help="methods to compare on the same held-out subsets, e.g. dtrak,trak")
    e.add_argument("--split", default="val,gen", help="target splits: val, gen, all (comma-separated)")
    e.add_argument("--fit-fraction", type=float, default=0.5, help="share of the finished subsets used to fit")
    e.add_argument("--resamples", type=int, default=1000)
    add_run_options(e, only=LDS_RUN_OPTIONS)  # the options of `score` and `lds`, for the --method rows
    e.add_argument("--ray", action="store_true", help="featurize each method's training set as Ray tasks first "
                                                      "(`featurize --ray`): a local Ray, or --ray-address")
    add_ray_options(e, cache_help=None)
    e.set_defaults(func=cmd_estimators)


def _fmt(v, spec: str = "+.3f") -> str:
    return "" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)


def cmd_counterfactual(args: argparse.Namespace) -> int:
    import os  # lazy: keeps the start of the other commands fast

    from ..evaluation.ray_engine import probe_address  # lazy: keeps the start of the other commands fast

    address = args.ray_address or os.environ.get("RAY_ADDRESS")
    if address:
        probe_address(address)  # fail in seconds, before any model is loaded
    if args.num_cpus is not None and args.num_cpus < 1:
        raise ConfigError(f"--num-cpus must be at least 1, got {args.num_cpus}")
    from ..evaluation.counterfactual import (Study,  # lazy: keeps the start of the other commands fast
                                             run_study, source_from_bank, source_from_checkpoint)
    from ..evaluation.counterfactual_stats import (seed_noise,  # lazy: keeps the start of the other commands fast
                                                   summary_rows)

    steps = args.steps
    if args.bank:
        source = source_from_bank(args.bank)
        if steps is None:
            from ..evaluation.bank import Bank  # lazy: keeps the start of the other commands fast

            steps = int(Bank.load(args.bank).meta["identity"].get("gen_steps", 50))
    else:
        source = source_from_checkpoint(args.checkpoint)
    spec = from_args(StudySpec, args, steps=steps or 50, features=given_options(args, FEATURE_OPTIONS))
    report = run_study(source, spec, folder=args.out, address=args.ray_address, num_cpus=args.num_cpus,
                       progress=progress_bar("counterfactual"), log=info, cache=args.cache)
    info(f"{report.cells_total - report.cells_done_before} cells computed ({report.models_trained} models trained, "
         f"{report.models_reused} reused), {report.cells_done_before} from cache, in {report.seconds:.0f} s")
    study = Study.load(report.folder)
    n = study.meta["n_train"]
    print(f"{study.name}: {len(study.cells)} cells; change measured against the original image "
          "(L2 up and SSIM/CLIP down = more change)")
    print(f"  {'direction':11} {'K':>5} {'seed':>4} {'method':12} {'n':>3} {'L2 med':>7} {'SSIM med':>8} "
          f"{'CLIP med':>8}  {'L2 - random [95% CI]':>28} {'Wilcoxon p':>10}")
    for r in summary_rows(study):
        ci = (f"{_fmt(r.get('l2_vs_random'))} [{_fmt(r.get('l2_vs_random_ci_low'))}, "
              f"{_fmt(r.get('l2_vs_random_ci_high'))}]" if r.get("l2_vs_random") is not None else "")
        print(f"  {r['direction']:11} {r['k']:>5} {r['seed']:>4} {r['method'][:12]:12} {r['targets']:>3} "
              f"{_fmt(r['l2_median'], '.3f'):>7} {_fmt(r['ssim_median'], '.3f'):>8} "
              f"{_fmt(r['clip_median'], '.3f'):>8}  {ci:>28} {_fmt(r.get('l2_vs_random_p'), '.3g'):>10}")
    for s in seed_noise(study):
        print(f"  seed noise: {s['method']} {s['direction']} K={s['k']} seeds {s['seeds']}: median L2 "
              f"{s['l2_median']:.3f}, SSIM {s['ssim_median']:.3f} ({s['targets']} targets)")
    print(f"  K as a share of the {n} training images: " +
          ", ".join(f"{k} = {k / n:.1%}" for k in study.meta["asked"]["counts"]))
    print(report.folder)
    return 0


def cmd_estimators(args: argparse.Namespace) -> int:
    import numpy as np  # lazy: keeps the start of the other commands fast

    from ..evaluation.bank import Bank  # lazy: keeps the start of the other commands fast
    from ..evaluation.evaluate import SPLITS, finished_bank  # lazy: keeps the start of the other commands fast
    from ..evaluation.retraining_estimators import heldout_lds_table  # lazy: keeps the start of the other commands fast

    splits = [s.strip() for s in args.split.split(",") if s.strip()]
    for s in splits:
        if s not in SPLITS:
            raise ConfigError(f"unknown split {s!r}; use val, gen or all")
    bank = Bank.load(args.bank)
    finished_bank(bank)
    info(bank.summary())
    named: dict[str, np.ndarray] = {}
    methods = [m.strip() for m in args.method.split(",") if m.strip()]
    feature_options = bank_feature_options(args, methods)
    for name, run in bank_runs(bank, methods, feature_options, args).items():
        named[name] = run.scores
    for split in splits:
        table, note = heldout_lds_table(bank, named, split, args.fit_fraction, n_resamples=args.resamples)
        print(f"\n{split} targets ({table.shape['targets']}): fitted on subsets {note['fit_subsets']}, LDS on the "
              f"held-out subsets {note['heldout_subsets']} only"
              + (f"; {note['ei_undefined']} images were in every or no fitting subset (EI 0)"
                 if note["ei_undefined"] else ""))
        for row in table.rows():
            print(f"  {row['name'][:34]:34} LDS {row['standard']:+7.3f} "
                  f"[{row['standard_ci_two_way_low']:+.3f}, {row['standard_ci_two_way_high']:+.3f}]  centered "
                  f"{row['centered']:+7.3f}")
    return 0
