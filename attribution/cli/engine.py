"""CLI commands of the attribution engine: featurize, score, self-influence."""

from __future__ import annotations

import argparse
import json

import numpy as np

from ..features.embeddings import CLIP_HELP
from ..methods import DEFAULT_METHOD, METHODS
from .common import info, progress_bar
from ..errors import ConfigError


def add_feature_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True,
                   help="digits, animals-2, NAME@epoch-N or a folder; several separated by commas = an ensemble "
                        "(checkpoint methods: the run's checkpoints up to the one given, or the list given)")
    p.add_argument("--dataset", help="training set spec (default: the one the checkpoint was trained on)")
    p.add_argument("--method", default=DEFAULT_METHOD, metavar="METHOD",
                   help="; ".join(f"{name}: {cls.summary}" for name, cls in METHODS.items()))
    p.add_argument("--fn", help="output function (D-TRAK only): square, simple, elbo, avg, l1, l2, linf, interp")
    p.add_argument("--eta", type=float, help="Simple/Square interpolation weight in [0, 1] (implies --fn interp)")
    p.add_argument("--timesteps", type=int, default=10, help="K, timesteps averaged over (default 10)")
    p.add_argument("--strategy", default="uniform", help="uniform (0, T/K, ...), cumulative (0..K-1) or training "
                                                            "(training images at their training timestep)")
    p.add_argument("--noises", type=int, default=1, help="noise draws per timestep")
    p.add_argument("--proj-dim", type=int, default=4096, help="k, the projection dimension (default 4096)")
    p.add_argument("--projector", default="auto", help="auto, sjlt, gaussian, trak-cuda, identity")
    p.add_argument("--seed", type=int, default=0, help="noise and projection seed")
    p.add_argument("--params", help="take gradients only over parameters with these comma-separated name prefixes")
    p.add_argument("--damping", type=float, help="ekfac: damping as a multiple of the mean EK-FAC eigenvalue "
                                                 "(default 0.1)")
    p.add_argument("--cache", help="cache root (default: cache/ or $ATTRIBUTION_CACHE)")
    p.add_argument("--store", help="use this feature-store folder instead of the automatic one")
    p.add_argument("--clip-weights", metavar="FILE", help="clip-dot/clip-cos: " + CLIP_HELP)
    p.add_argument("--clip-model", default="ViT-B-32", help="open_clip architecture of --clip-weights (default "
                                                            "ViT-B-32, the paper's CLIP ViT-B/32)")
    p.add_argument("--batch-size", type=int, default=16, help="training images per gradient batch")
    p.add_argument("--checkpoint-weights", default=None, metavar="lr|uniform",
                   help="checkpoint methods: lr (default) weights each checkpoint by the learning rate x epochs "
                        "since the previous one, all projected with --seed; uniform is TracInCP/GAS as the D-TRAK "
                        "paper runs them (appendix A.3): the mean over the checkpoints, checkpoint c projected with "
                        "seed + c")
    p.add_argument("--device", default="auto")


def build(args):
    """(Attribution, train dataset) from the shared options; several checkpoints form an ensemble, and a
    checkpoint method (tracin, retrac, tracincp, gas) runs over a training run's checkpoints."""
    from ..engine import open_attribution
    from ..methods import get_method

    method = get_method(args.method)
    attribution = open_attribution(args.checkpoint, method, args.device, dataset=args.dataset, fn=args.fn,
                                   eta=args.eta, timesteps=args.timesteps, strategy=args.strategy,
                                   noises=args.noises, proj_dim=args.proj_dim, projector=args.projector,
                                   seed=args.seed, params=args.params, cache=args.cache, store_dir=args.store,
                                   batch_size=args.batch_size, clip_model=args.clip_model,
                                   clip_weights=args.clip_weights, damping=getattr(args, "damping", None),
                                   checkpoint_weights=getattr(args, "checkpoint_weights", None))
    if len(attribution.members) > 1:
        info(f"{method.title} over {len(attribution.members)} checkpoints, weights "
             + ", ".join(f"{a.model.spec}: {w:.3g}" for a, w in zip(attribution.members, attribution.weights))
             + f" ({attribution.weights_note})")
    return attribution, attribution.train


def featurize_all(attribution) -> None:
    for att in attribution.members:  # open (or refuse: CacheMismatchError) every feature folder before any work
        _ = att.store
    for att in attribution.members:
        strategy = (f"each training image at its {att.train_timesteps_source} training timestep, targets at K="
                    f"{att.cfg.timesteps}" if att.cfg.strategy == "training" else f"K={att.cfg.timesteps} "
                    f"{att.cfg.strategy}")
        info(f"featurizing {att.train.spec} ({att.train.split}, {len(att.train)} images) with {att.model.spec}: "
             f"fn={att.cfg.fn}, {strategy}, {att.cfg.noises} noise(s)"
             + (", unit-normalised" if att.cfg.normalize else "")
             + f", {att.grad_dim:,} parameters -> k={att.proj_dim} ({att.cfg.projector})")
        info(f"cache: {att.store_path}")
        att.featurize(progress=progress_bar("featurize"))


def cmd_featurize(args) -> int:
    attribution, _ = build(args)
    featurize_all(attribution)
    for att in attribution.members:
        print(att.store_path)
    return 0


def check_lambda(method, lam: float | None) -> None:
    """Refuse a bad --lambda before anything is featurized (featurizing can take hours)."""
    from ..kernel import check_lambda as check

    if lam is not None and method.uses_lambda:
        check(lam)


def cmd_score(args) -> int:
    from ..report import rank
    from ..targets import resolve_targets

    from ..report import check_out

    check_out(args.out)
    attribution, train = build(args)
    method = attribution.method
    if args.top < 1:
        raise ConfigError(f"--top must be at least 1, got {args.top}")
    check_lambda(method, args.lam)
    targets = resolve_targets(args.target, attribution.target_model, train.spec)
    for note in targets.notes:
        info(note)
    method.check_targets(targets)  # before featurizing (e.g. Journey TRAK: an image without a trajectory)
    featurize_all(attribution)
    lam = attribution.resolve_lambda(args.lam)
    info(f"scoring {len(targets)} target(s) with {method.title}" + (f", lambda={lam:.4g}" if lam else ""))
    scores = attribution.scores(attribution.target_features(targets, cache=args.cache), lam)
    if args.out:
        from ..report import export_metadata, write_scores

        metas = [export_metadata(name, method.name, lam, args.checkpoint, train.spec, attribution.cfg)
                 for name in targets.names]
        what = write_scores(args.out, scores, train, metas)
        info(f"wrote {what}, {scores.shape[0]} target(s) x {scores.shape[1]} training images, to {args.out}")
    results = []
    for m in range(len(targets)):
        pro, opp = rank(scores[m], train, args.top, 1), rank(scores[m], train, args.top, -1)
        results.append({"method": method.name, "lambda": lam, "target": targets.names[m],
                        "target_label": targets.labels[m],
                        "proponents": [{"index": r.index, "label": r.class_name, "score": r.score} for r in pro],
                        "opponents": [{"index": r.index, "label": r.class_name, "score": r.score} for r in opp]})
    names = np.array([train.label_name(i) for i in range(len(train))])
    if len(targets) > 1 and set(targets.labels) <= set(names):  # labelled targets (val:A-B): a check that can fail
        from ..analysis.sanity import class_agreement

        info(class_agreement(scores, names, np.array(targets.labels), min(args.top, len(train))).describe())
    if args.json:
        print(json.dumps(results[0] if len(results) == 1 else results, indent=2))
        return 0
    for res in results:
        print(f"target {res['target']}" + (f" (label {res['target_label']})" if res["target_label"] else ""))
        for kind in ("proponents", "opponents"):
            print(f"  {kind}:")
            for r in res[kind]:
                print(f"    #{r['index']:<6} {r['label']:<10} {r['score']:+.6g}")
    return 0


def cmd_self_influence(args) -> int:
    from ..report import check_out

    check_out(args.out)
    attribution, train = build(args)
    method = attribution.method
    if not method.has_self_influence:
        method.self_influence(None, None)  # raises its one-line ConfigError before any featurizing
    if args.top < 1:
        raise ConfigError(f"--top must be at least 1, got {args.top}")
    check_lambda(method, args.lam)
    featurize_all(attribution)
    lam = attribution.resolve_lambda(args.lam)
    values = attribution.self_influence(lam)
    if args.out:
        from ..report import export_metadata, write_scores

        meta = export_metadata(None, method.name, lam, args.checkpoint, train.spec, attribution.cfg)
        if args.out.lower().endswith(".npy"):
            from ..fileio import save_npy

            save_npy(args.out, values.astype(np.float32))  # (N,), as before
        else:
            write_scores(args.out, values[None], train, [meta])
        info(f"wrote self-influence ({len(values)},) to {args.out}")
    order = np.argsort(-values, kind="stable")
    print(f"self-influence ({method.title}" + (f", lambda={lam:.4g}" if lam else "") + ")")
    print("  highest (atypical, memorised):")
    for i in order[:args.top]:
        print(f"    #{i:<6} {train.label_name(i):<10} {values[i]:.6g}")
    print("  lowest (typical, many similar images):")
    for i in order[::-1][:args.top]:
        print(f"    #{i:<6} {train.label_name(i):<10} {values[i]:.6g}")
    return 0


def add_commands(sub) -> None:
    f = sub.add_parser("featurize", help="compute and cache training-set features")
    add_feature_options(f)
    f.set_defaults(func=cmd_featurize)

    s = sub.add_parser("score", help="rank training images by influence on a target")
    add_feature_options(s)
    s.add_argument("--target", required=True, help="PATH (image or .npz), train:I, val:I, gen:SEED; ranges "
                                                          "train:A-B, val:A-B (class agreement reported), gen:A-B")
    s.add_argument("--lambda", dest="lam", type=float, help="ridge lambda (default: 0.1 x mean kernel eigenvalue)")
    s.add_argument("--top", type=int, default=5)
    s.add_argument("--json", action="store_true", help="print the result as JSON")
    s.add_argument("--out", help="write all scores: .npy (matrix, targets x training images), .csv (ranked table "
                                 "with target, method, lambda, checkpoint, dataset, features) or .npz (both)")
    s.set_defaults(func=cmd_score)

    si = sub.add_parser("self-influence", help="rank training images by self-influence (memorisation)")
    add_feature_options(si)
    si.add_argument("--lambda", dest="lam", type=float)
    si.add_argument("--top", type=int, default=10)
    si.add_argument("--out", help="write all self-influence values: .npy, .csv (ranked, with metadata) or .npz")
    si.set_defaults(func=cmd_self_influence)
