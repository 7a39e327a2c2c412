"""CLI commands `magic train|query|validate|smoothness`: exact influence on a query's bits/dim (MAGIC).

    python -m attribution magic train                       # the deterministic weighted run (cache/magic/<id>)
    python -m attribution magic query --seed 0 --top 10     # d bpd / d w for a generated image, cached
    python -m attribution magic validate --sets 50          # leave-1%-out retrains, Spearman per cached query
    python -m attribution magic smoothness                  # metasmoothness over batch size x lr x eps_root
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ..errors import ConfigError
from .common import info, progress_bar


def _recipe_args(p) -> None:
    from ..magic.runs import OdeConfig  # lazy: keeps the start of the other commands fast
    from ..magic.score_model import ScoreModelConfig  # lazy: keeps the start of the other commands fast
    from ..magic.weighted_train import TrainConfig  # lazy: keeps the start of the other commands fast

    m, t, o = ScoreModelConfig(), TrainConfig(), OdeConfig()
    p.add_argument("--dataset", default="digits", help="training set (grayscale; default digits)")
    p.add_argument("--resolution", type=int, default=8, help="image side (default 8: digits' native size)")
    p.add_argument("--hidden", type=int, default=m.hidden, help=f"hidden width of the score MLP ({m.hidden})")
    p.add_argument("--steps", type=int, default=t.steps, help=f"training steps ({t.steps})")
    p.add_argument("--batch-size", type=int, default=t.batch_size, help=f"batch size ({t.batch_size})")
    p.add_argument("--lr", type=float, default=t.lr, help=f"Adam learning rate ({t.lr:g}, schedule below)")
    p.add_argument("--schedule", choices=["linear", "constant"], default=t.schedule)
    p.add_argument("--eps-root", type=float, default=t.eps_root,
                   help=f"Adam epsilon inside the square root ({t.eps_root:g})")
    p.add_argument("--seed", type=int, default=0, help="data order, times, noises and initialisation")
    p.add_argument("--dtype", choices=["float32", "float64"], default=t.dtype)
    p.add_argument("--ode-steps", type=int, default=o.steps, help=f"probability-flow ODE steps for bits/dim "
                                                                   f"({o.steps})")
    p.add_argument("--solver", choices=["heun", "rk4"], default=o.solver)


def _spec(args):
    from ..magic.runs import MagicSpec, OdeConfig  # lazy: keeps the start of the other commands fast
    from ..magic.score_model import ScoreModelConfig  # lazy: keeps the start of the other commands fast
    from ..magic.weighted_train import TrainConfig  # lazy: keeps the start of the other commands fast

    if args.resolution < 2:
        raise ConfigError(f"--resolution must be at least 2, got {args.resolution}")
    return MagicSpec(args.dataset, args.resolution,
                     ScoreModelConfig(dim=args.resolution ** 2, hidden=args.hidden, seed=args.seed),
                     TrainConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr, schedule=args.schedule,
                                 eps_root=args.eps_root, seed=args.seed, dtype=args.dtype),
                     OdeConfig(steps=args.ode_steps, solver=args.solver))


RUN_HELP = "a MAGIC run folder, or its name under the cache's magic/ folder (both printed by magic train)"


def add_commands(sub) -> None:
    m = sub.add_parser("magic", help="exact influence on a query's bits/dim through metagradients (MAGIC)")
    msub = m.add_subparsers(dest="magic_command", required=True)

    t = msub.add_parser("train", help="train the deterministic weighted score model MAGIC differentiates through")
    _recipe_args(t)
    t.add_argument("--cache", help="cache root (default: cache/ or $ATTRIBUTION_CACHE)")
    t.set_defaults(func=cmd_train)

    q = msub.add_parser("query", help="metagradient of one query's bits/dim with respect to every example weight")
    q.add_argument("--run", required=True, help=RUN_HELP)
    src = q.add_mutually_exclusive_group(required=True)
    src.add_argument("--seed", type=int, help="a generated image: sample from the run's model with this seed")
    src.add_argument("--image", help="an image file of the run's size, grayscale")
    src.add_argument("--train-index", type=int, help="a training image")
    src.add_argument("--val-index", type=int, help="a held-out (val split) image")
    q.add_argument("--policy", choices=["auto", "all", "sqrt"], default="auto",
                   help="keep every state (all), sqrt(T) checkpoints (sqrt), or all when it fits (auto)")
    q.add_argument("--top", type=int, default=10, help="influencers listed each way (default 10)")
    q.add_argument("--out", help="write the scores and influencers to this JSON file")
    q.set_defaults(func=cmd_query)

    v = msub.add_parser("validate", help="leave-fraction-out retraining: Spearman of predicted vs actual change")
    v.add_argument("--run", required=True, help=RUN_HELP)
    v.add_argument("--fraction", type=float, default=0.01, help="fraction removed per retrain (default 0.01)")
    v.add_argument("--sets", type=int, default=50, help="number of removed sets (default 50)")
    v.add_argument("--set-seed", type=int, default=0)
    v.add_argument("--workers", type=int, default=1, help="Ray workers, one torch thread each (1: in process)")
    v.add_argument("--fd", help="also check these comma-separated training indices by finite differences")
    v.add_argument("--out", help="write the per-query results to this JSON file")
    v.set_defaults(func=cmd_validate)

    s = msub.add_parser("smoothness", help="metasmoothness over a grid of batch size, lr and eps_root")
    _recipe_args(s)
    s.add_argument("--batch-sizes", default="64,256")
    s.add_argument("--lrs", default="3e-3,1e-2,3e-2")
    s.add_argument("--eps-roots", default="1e-8,1e-6,1e-4")
    s.add_argument("--h", type=float, default=0.1, help="weight perturbation size (default 0.1)")
    s.add_argument("--out", help="write the grid to this JSON file")
    s.set_defaults(func=cmd_smoothness)


def cmd_train(args) -> int:
    from ..magic.query import train_run  # lazy: keeps the start of the other commands fast
    from ..magic.runs import MagicRun  # lazy: keeps the start of the other commands fast

    spec = _spec(args)
    run = MagicRun(spec, root=args.cache)
    info(f"MAGIC run {spec.run_id}: {run.run.n} {spec.dataset} images at {spec.resolution}x{spec.resolution}, "
         f"{spec.model.n_params:,} parameters, {spec.train.steps} steps -> {run.path}")
    if run.trained:
        info("already trained; reusing it")
    train_run(run, progress=progress_bar("train"))
    prov = run.provenance()
    print(json.dumps({"run": str(run.path), "train_seconds": prov.get("train_seconds"),
                      "train_loss": prov.get("train_loss")}))
    return 0


def _query_pixels(run, args) -> tuple[np.ndarray, str]:
    if args.seed is not None:
        return run.sample(run.theta(), 1, args.seed)[0], f"gen:{args.seed}"
    if args.image:
        return run.image_pixels(args.image), args.image
    if args.train_index is not None:
        return run.dataset.pixels[run.dataset.check_index(args.train_index)], f"train:{args.train_index}"
    from ..data import load_dataset  # lazy: keeps the start of the other commands fast

    val = load_dataset(run.spec.dataset, "val", resolution=run.spec.resolution, channels=1)
    return val.pixels[val.check_index(args.val_index)], f"val:{args.val_index}"


def cmd_query(args) -> int:
    from ..magic.query import query_metagradient  # lazy: keeps the start of the other commands fast
    from ..magic.runs import open_run  # lazy: keeps the start of the other commands fast

    if args.top < 1:
        raise ConfigError(f"--top must be at least 1, got {args.top}")
    run = open_run(args.run)
    pixels, label = _query_pixels(run, args)
    x = run.query_vector(pixels)
    info(f"metagradient of bits/dim of {label} through {run.spec.train.steps} training steps "
         f"({run.run.n} example weights)")
    rec = query_metagradient(run, x, policy=args.policy, progress=_stage_progress())
    grad = np.asarray(rec["grad"])
    order = np.argsort(grad)
    # removing example i changes bpd by about -g_i: the most negative g_i raise the likelihood the most (helpers)
    out = {"query": rec["id"], "label": label, "bpd": rec["meta"]["bpd"], "cached": rec["cached"],
           "cost": {k: rec["meta"][k] for k in ("seconds", "policy", "stored_states", "state_bytes",
                                                  "peak_rss_bytes", "runs_of_training")},
           "most_helpful": [{"index": int(i), "score": float(grad[i])} for i in order[:args.top]],
           "most_harmful": [{"index": int(i), "score": float(grad[i])} for i in order[::-1][:args.top]]}
    if args.out:
        from ..fileio import write_json  # lazy: keeps the start of the other commands fast

        write_json(Path(args.out), {**out, "scores": grad.tolist()})
    print(json.dumps(out, indent=1))
    return 0


def _stage_progress():
    bars = {}

    def update(stage, done, total):
        if stage not in bars:
            bars[stage] = progress_bar(stage)
        bars[stage](done, total)

    return update


def cmd_validate(args) -> int:
    from ..magic.runs import open_run  # lazy: keeps the start of the other commands fast
    from ..magic.validate import (check_fraction, evaluate,  # lazy: keeps the start of the other commands fast
                                  finite_difference_check, retrain)

    check_fraction(args.fraction)
    if args.workers < 1:
        raise ConfigError(f"--workers must be at least 1, got {args.workers}")
    run = open_run(args.run)
    queries = run.list_queries()
    if not queries:
        raise ConfigError(f"{run.path} has no cached queries; run `python -m attribution magic query --run "
                          f"{run.path} --seed 0` first")
    info(f"{args.sets} retrains with {args.fraction:g} of {run.run.n} examples removed; {len(queries)} queries")
    retrain(run, args.fraction, args.sets, seed=args.set_seed, workers=args.workers, progress=progress_bar("retrain"))
    results = []
    for q in queries:
        r = evaluate(run, q, args.fraction, seed=args.set_seed)
        if args.fd:
            idx = [int(s) for s in args.fd.split(",") if s.strip()]
            for i in idx:
                run.dataset.check_index(i)
            r["finite_differences"] = finite_difference_check(run, q, idx)
        results.append(r)
        lo, hi = r["ci"]
        print(f"query {q['id']}: Spearman {r['spearman']:.3f} [{lo:.3f}, {hi:.3f}] over {r['n_sets']} sets "
              f"(Pearson {r['pearson']:.3f})")
    if args.out:
        from ..fileio import write_json  # lazy: keeps the start of the other commands fast

        write_json(Path(args.out), {"fraction": args.fraction, "results": results})
    return 0


def cmd_smoothness(args) -> int:
    from ..magic.runs import load_training_data  # lazy: keeps the start of the other commands fast
    from ..magic.score_model import ScoreModel  # lazy: keeps the start of the other commands fast
    from ..magic.smoothness import smoothness_grid  # lazy: keeps the start of the other commands fast

    def floats(s, name):
        try:
            return [float(v) for v in s.split(",") if v.strip()]
        except ValueError:
            raise ConfigError(f"--{name} must be comma-separated numbers, got {s!r}") from None

    spec = _spec(args)
    data, _ = load_training_data(spec.dataset, spec.resolution)
    rows = smoothness_grid(data, ScoreModel(spec.model), spec.train,
                           batch_sizes=[int(b) for b in floats(args.batch_sizes, "batch-sizes")],
                           lrs=floats(args.lrs, "lrs"), eps_roots=floats(args.eps_roots, "eps-roots"), h=args.h,
                           progress=lambda i, n, r: info(f"[{i}/{n}] {json.dumps(r)}"))
    if args.out:
        from ..fileio import write_json  # lazy: keeps the start of the other commands fast

        write_json(Path(args.out), {"rows": rows})
    print(json.dumps(rows, indent=1))
    return 0
