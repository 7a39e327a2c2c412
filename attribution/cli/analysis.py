"""CLI commands of the timestep analysis: `norms` (gradient norm versus timestep) and `influential` (distinct
top-k proponents per method over many targets, the Diffusion-ReTrac paper's "generally influential" statistic)."""

from __future__ import annotations

import csv
from dataclasses import asdict, fields
from pathlib import Path

import numpy as np

from ..analysis.influential import top_k_stats
from ..analysis.norms import NormConfig, check_timesteps, sample_curve, training_norms
from ..data import training_dataset_of
from ..errors import ConfigError
from ..features.timesteps import training_timesteps
from ..figures import influential_figure, norm_curve_figure, norm_scatter_figure, per_checkpoint_figure
from ..fileio import atomic_path, save_npz, write_json
from ..engine import open_attribution
from ..methods import get_method
from ..methods.over_checkpoints import run_checkpoints
from ..models import load_model
from ..options import add_arguments, from_args
from ..run_options import RunOptions, add_run_options
from ..targets import resolve_targets
from .common import info, progress_bar, write_figures
from .engine import member_progress

# What `influential` takes from `RunOptions` (its methods are a list: --methods).
INFLUENTIAL_OPTIONS = ("checkpoint", "dataset", "timesteps", "proj_dim", "projector", "seed", "cache", "device")


def _write_csv(path: Path, rows: list[dict]) -> None:
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def cmd_norms(args) -> int:
    cfg = from_args(NormConfig, args)
    specs = (run_checkpoints(args.checkpoint) if args.all_checkpoints
             else [s.strip() for s in args.checkpoint.split(",") if s.strip()])
    models = [load_model(s, args.device) for s in specs]
    train = training_dataset_of(models[-1], args.dataset)
    index = train.check_index(args.index)
    grid = None
    if args.timesteps:
        try:
            grid = [int(v) for v in args.timesteps.split(",") if v.strip()]
        except ValueError:
            raise ConfigError(f"--timesteps takes comma-separated integers, got {args.timesteps!r}") from None
        check_timesteps(grid, models[-1].num_timesteps)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    curves, trained_at, results, summary = {}, {}, [], []
    for model in models:
        info(f"{model.spec}: gradient norms of train:{index} at {cfg.grid if grid is None else len(grid)} timesteps "
             f"(fixed noise), then of {min(cfg.samples, len(train))} training images at their training timestep")
        curves[model.spec] = sample_curve(model, train.tensors([index])[0], f"{train.split}/{index}", cfg, grid)
        all_t, source = training_timesteps(model, train, cfg.seed)
        trained_at[model.spec] = int(all_t[index])
        res = training_norms(model, train, cfg, args.cache, progress_bar(f"norms {model.spec}"))
        results.append(res)
        summary.append({"checkpoint": model.spec, "timesteps": source, "samples": len(res.norms),
                        "spearman_norm_vs_t": round(res.spearman(), 4), "bins": res.binned(10, model.num_timesteps),
                        "sample": {"index": index, "training_timestep": int(all_t[index])}})
        info(f"  {source} training timesteps; Spearman(norm, t) = {res.spearman():+.3f} over {len(res.norms)} images")
    _write_csv(out / "training_norms.csv", [row for r in results for row in r.table(train.label_name)])
    _write_csv(out / "sample_curve.csv", [{"checkpoint": c, "index": index, "timestep": int(t), "norm": float(v)}
                                          for c, (ts, ns) in curves.items() for t, v in zip(ts, ns)])
    write_json(out / "summary.json", {"dataset": train.spec, "config": asdict(cfg),
                                      "checkpoints": summary})
    figures = [norm_curve_figure(curves, trained_at, f"Gradient norm of train:{index} ({train.label_name(index)}) "
                                 "versus timestep, fixed noise"),
               norm_scatter_figure(results[-1], train.label_name, num_timesteps=models[-1].num_timesteps)]
    if len(results) > 1:
        figures.append(per_checkpoint_figure(results, num_timesteps=models[-1].num_timesteps))
    write_figures(out / "norms.html", figures, f"Gradient norm versus timestep: {train.spec}")
    print(f"{'checkpoint':<22} {'timesteps':<9} {'images':>6} {'Spearman(norm,t)':>17}  median norm t<100 / t>=900")
    for s in summary:
        lo, hi = s["bins"][0]["median"], s["bins"][-1]["median"]
        print(f"{s['checkpoint']:<22} {s['timesteps']:<9} {s['samples']:>6} {s['spearman_norm_vs_t']:>+17.3f}  "
              f"{lo:.4g} / {hi:.4g}")
    print(f"wrote {out / 'norms.html'}, training_norms.csv, sample_curve.csv, summary.json")
    return 0


def cmd_influential(args) -> int:
    names = [m.strip() for m in args.methods.split(",") if m.strip()]
    methods = [get_method(m) for m in names]  # unknown names fail here, before any work
    if args.top < 1:
        raise ConfigError(f"--top must be at least 1, got {args.top}")
    values = {f.name: getattr(args, f.name) for f in fields(RunOptions) if hasattr(args, f.name) and f.name != "method"}
    # each method takes the options that apply to it; a bad value is refused here, before any work
    options = {m.name: RunOptions.for_method(m.name, **values) for m in methods}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    targets = None
    stats, all_scores = [], {}
    for method in methods:
        attribution = open_attribution(options[method.name])
        if targets is None:
            targets = resolve_targets(args.targets, attribution.target_model, attribution.train.spec)
            info(f"{len(targets)} target(s): {targets.names[0]} .. {targets.names[-1]}")
        scores = attribution.run(targets, None, member_progress, cache=args.cache).scores
        info(f"scored with {method.title} ({len(attribution.members)} checkpoint(s))")
        all_scores[method.name] = scores.astype(np.float32)
        stats.append(top_k_stats(method.name, scores, args.top))
    write_json(out / "influential.json", {"targets": targets.names, "checkpoint": args.checkpoint,
                                          "top": args.top, "methods": [s.to_dict() for s in stats]})
    save_npz(out / "scores.npz", **{k.replace("-", "_"): v for k, v in all_scores.items()})
    write_figures(out / "influential.html", [influential_figure(stats)], "Generally influential training samples")
    print(f"{'method':<10} {'unique top-' + str(args.top):>14} {'share':>6}  most recurring (index x targets)")
    for s in stats:
        rec = ", ".join(f"#{i}x{c}" for i, c in s.recurring[:5])
        print(f"{s.method:<10} {s.unique:>14} {s.unique_share:>6.0%}  {rec}")
    print(f"wrote {out / 'influential.json'}, influential.html, scores.npz")
    return 0


def add_commands(sub) -> None:
    n = sub.add_parser("norms", help="gradient norm versus timestep: one image over a grid, the training set at "
                                     "its training timesteps")
    add_run_options(n, only=("checkpoint", "dataset", "cache", "device"))
    add_arguments(n, NormConfig, argparse_choices=False)  # a bad value: one line from NormConfig
    n.add_argument("--all-checkpoints", action="store_true",
                   help="every checkpoint of the run up to the one given (the per-checkpoint view)")
    n.add_argument("--index", type=int, default=0, help="training image of the single-sample curve (default 0)")
    n.add_argument("--timesteps", help="explicit comma-separated timesteps for the curve instead of --grid")
    n.add_argument("--out", default="norms", help="output folder (default ./norms)")
    n.set_defaults(func=cmd_norms)

    i = sub.add_parser("influential", help="distinct top-k proponents per method over many targets "
                                           "(generally influential samples)")
    add_run_options(i, only=INFLUENTIAL_OPTIONS)
    i.add_argument("--methods", default="tracin,retrac,trak,dtrak", help="comma-separated methods")
    i.add_argument("--targets", default="gen:0-99", help="target spec, e.g. gen:0-99 (default) or a .npz")
    i.add_argument("--top", type=int, default=10, help="k of the top-k (default 10)")
    i.add_argument("--out", default="influential", help="output folder (default ./influential)")
    i.set_defaults(func=cmd_influential)
