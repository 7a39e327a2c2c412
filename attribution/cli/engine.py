"""CLI commands of the attribution engine: featurize, score, self-influence."""

from __future__ import annotations

import json

import numpy as np

from ..analysis.sanity import class_agreement
from ..engine import open_attribution
from ..errors import ConfigError
from ..fileio import save_npy
from ..kernel import check_lambda as check
from ..report import check_out, export_metadata, rank, write_scores
from ..run_options import add_run_options, run_options
from ..targets import resolve_targets
from .common import add_prompt_options, add_ray_options, info, progress_bar, prompt_from


def build(args):
    """(Attribution, train dataset) from the shared options (`RunOptions`); several checkpoints form an ensemble,
    and a checkpoint method runs over a training run's checkpoints."""
    attribution = open_attribution(run_options(args))
    method = attribution.method
    if len(attribution.members) > 1:
        info(f"{method.title} over {len(attribution.members)} checkpoints, weights "
             + ", ".join(f"{a.model.spec}: {w:.3g}" for a, w in zip(attribution.members, attribution.weights))
             + f" ({attribution.weights_note})")
    return attribution, attribution.train


def member_progress(att):
    """Says what one member will featurize and where, and returns its progress bar (`Attribution.featurize`'s
    and `Attribution.run`'s per-member progress)."""
    what = f"featurizing {att.train.spec} ({att.train.split}, {len(att.train)} images) with {att.model.spec}: "
    if "gradients" not in att.cfg.featurizer.option_groups:  # an embedding: no output function, timesteps or k
        info(what + f"{att.cfg.featurizer.description}, {att.proj_dim:,} dimensions")
    else:
        strategy = (f"each training image at its {att.featurizer.train_timesteps_source} training timestep, targets "
                    f"at K={att.cfg.timesteps}" if att.cfg.strategy == "training" else f"K={att.cfg.timesteps} "
                    f"{att.cfg.strategy}")
        info(what + f"fn={att.cfg.fn}, {strategy}, {att.cfg.noises} noise(s)"
             + (", unit-normalised" if att.cfg.normalize else "")
             + f", {att.grad_dim:,} parameters -> k={att.proj_dim} ({att.cfg.projector})")
    info(f"cache: {att.store_path}")
    return progress_bar("featurize")


def featurize_all(attribution) -> None:
    attribution.featurize(member_progress)


def cmd_featurize(args) -> int:
    if args.ray or args.ray_address or args.shard_size is not None:
        attribution = featurize_ray(args)
    else:
        attribution, _ = build(args)
        featurize_all(attribution)
    for att in attribution.members:
        print(att.store_path)
    return 0


def featurize_ray(args):
    """`featurize --ray`: the missing training rows fanned out as Ray tasks (`evaluation.ray_featurize`)."""
    import os  # lazy: keeps the start of the other commands fast

    from ..evaluation.ray_engine import RayCluster, probe_address  # lazy: Ray only for a fan-out
    from ..evaluation.ray_featurize import featurize_on_ray

    address = args.ray_address or os.environ.get("RAY_ADDRESS")
    if address:
        probe_address(address)  # fail in seconds, before any model is loaded
    if args.num_cpus is not None and args.num_cpus < 1:
        raise ConfigError(f"--num-cpus must be at least 1, got {args.num_cpus}")
    if args.shard_size is not None and args.shard_size < 1:
        raise ConfigError(f"--shard-size must be at least 1, got {args.shard_size}")
    attribution = open_attribution(run_options(args))  # bad options: one line before Ray starts
    with RayCluster(address, args.num_cpus) as cluster:
        info(f"featurizing on {cluster.describe()}")
        return featurize_on_ray(attribution, cluster, args.shard_size, member_progress)


def check_lambda(method, lam: float | None) -> None:
    """Refuse a bad --lambda before anything is featurized (featurizing can take hours)."""
    if lam is not None and method.uses_lambda:
        check(lam)


def cmd_score(args) -> int:
    check_out(args.out)
    attribution, train = build(args)
    method = attribution.method
    if args.top < 1:
        raise ConfigError(f"--top must be at least 1, got {args.top}")
    check_lambda(method, args.lam)
    targets = resolve_targets(args.target, attribution.target_model, train.spec, prompt=prompt_from(args))
    for note in targets.notes:
        info(note)
    result = attribution.run(targets, args.lam, member_progress, cache=args.cache)
    scores, lam = result.scores, result.lam
    info(f"scored {len(targets)} target(s) with {method.title}" + (f", lambda={lam:.4g}" if lam else ""))
    if args.out:
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
        meta = export_metadata(None, method.name, lam, args.checkpoint, train.spec, attribution.cfg)
        if args.out.lower().endswith(".npy"):
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
    add_run_options(f)
    f.add_argument("--ray", action="store_true", help="split the training set into shards featurized as Ray tasks "
                                                      "(a local Ray sized to this machine, or --ray-address)")
    f.add_argument("--shard-size", type=int, help="training images per Ray task (default: about 4 tasks per slot)")
    add_ray_options(f, cache_help=None)
    f.set_defaults(func=cmd_featurize)

    s = sub.add_parser("score", help="rank training images by influence on a target")
    add_run_options(s)
    s.add_argument("--target", required=True, help="PATH (image or .npz), train:I, val:I, gen:SEED; ranges "
                                                          "train:A-B, val:A-B (class agreement reported), gen:A-B")
    add_prompt_options(s)
    s.add_argument("--lambda", dest="lam", type=float, help="ridge lambda (default: 0.1 x mean kernel eigenvalue)")
    s.add_argument("--top", type=int, default=5)
    s.add_argument("--json", action="store_true", help="print the result as JSON")
    s.add_argument("--out", help="write all scores: .npy (matrix, targets x training images), .csv (ranked table "
                                 "with target, method, lambda, checkpoint, dataset, features) or .npz (both)")
    s.set_defaults(func=cmd_score)

    si = sub.add_parser("self-influence", help="rank training images by self-influence (memorisation)")
    add_run_options(si)
    si.add_argument("--lambda", dest="lam", type=float)
    si.add_argument("--top", type=int, default=10)
    si.add_argument("--out", help="write all self-influence values: .npy, .csv (ranked, with metadata) or .npz")
    si.set_defaults(func=cmd_self_influence)
