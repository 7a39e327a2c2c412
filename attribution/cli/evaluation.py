"""CLI command `lds`: how far to trust an attribution method, measured on a ground-truth bank.

    python -m attribution lds --bank digits --method dtrak,trak
    python -m attribution lds --bank digits --scores my_scores.npy --name mine
    python -m attribution lds --bank digits --method dtrak --sweep lambda --out results/
    python -m attribution lds --bank digits --method dtrak --sweep K --values 1,5,10,20 --out results/
    python -m attribution lds --bank digits --method dtrak --sweep checkpoint   # needs `bank checkpoints`

Every figure comes with its 95% bootstrap intervals (over targets, and two-way over retrained models and targets),
beside the bank's ceilings (reachable by a perfect method, seed-vs-seed, noise-vs-noise) and each method's share of
the reachable one, random baselines and the common-mode share. Paired differences carry a bootstrap p-value and are
marked real after Holm's correction over all those shown; the best method and the best λ are chosen on one half of
the targets and reported on the other.
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import numpy as np

from ..errors import ConfigError
from ..fileio import atomic_path, read_npy, read_npz
from ..kernel import check_lambda
from ..run_options import FEATURE_OPTIONS, add_run_options, comparison_options
from .common import add_ray_options, info, progress_bar, write_figures

# The options of an attribution (RunOptions) that `lds` takes: all but the checkpoint, training set and method, which
# the bank and --method give.
LDS_RUN_OPTIONS = (*FEATURE_OPTIONS, "checkpoint_weights", "cache", "batch_size", "device")

SCORES_FIX = ("give the score matrix (targets x training images, numbers) as a .npy saved with numpy.save, or the "
              ".npz that `score --out FILE.npz` writes")


def read_score_file(p: Path) -> np.ndarray:
    """The score matrix of a --scores file: a .npy array or a .npz with a 'scores' array; one line otherwise."""
    if not p.is_file():
        raise ConfigError(f"--scores {p} is not an existing file; {SCORES_FIX}")
    if p.suffix == ".npy":
        return read_npy(p, SCORES_FIX, f"--scores {p.name}")
    if p.suffix == ".npz":
        return read_npz(p, ("scores",), SCORES_FIX, f"--scores {p.name}")["scores"]
    kind = "a ranked table, not a matrix" if p.suffix == ".csv" else f"a {p.suffix or 'suffix-less'} file"
    raise ConfigError(f"--scores {p.name} is {kind}; {SCORES_FIX}")


def add_commands(sub) -> None:
    p = sub.add_parser("lds", help="linear datamodeling score of methods (or a score file) on a ground-truth bank")
    p.add_argument("--bank", required=True, help="a bank name under banks/ (e.g. digits) or a bank folder")
    p.add_argument("--method", default="", help="comma-separated methods to evaluate, METHOD:FN for an output "
                                                "function, e.g. dtrak,dtrak:avg,trak")
    p.add_argument("--scores", action="append", default=[],
                   help="a score matrix, targets x training images in the bank's order: a .npy array, or the .npz "
                        "that `score --out` writes (its 'scores'); repeatable")
    p.add_argument("--split", default="val,gen", help="target splits to report: val, gen, all (comma-separated)")
    p.add_argument("--lambda", dest="lam", type=float, help="ridge lambda (default: each method's default)")
    # the options of `score` (RunOptions), each applied to the methods that use it
    add_run_options(p, only=LDS_RUN_OPTIONS)
    p.add_argument("--sweep", choices=["lambda", "K", "k", "checkpoint"],
                   help="also report LDS along lambda (instant, from the kernel's eigendecomposition), K (timesteps), "
                        "k (projection dimension) or the checkpoints of the bank's run (each featurizes once); a "
                        "table, and with --out a CSV and a figure")
    p.add_argument("--values", help="values of a K or k sweep, comma-separated (default K: 1,2,5,10,20; k: "
                                    "512,...,8192); a checkpoint sweep uses every checkpoint of the bank's run")
    p.add_argument("--resamples", type=int, default=1000, help="bootstrap resamples (default 1000)")
    p.add_argument("--ray", action="store_true", help="featurize each method's training set as Ray tasks first "
                                                      "(`featurize --ray`): a local Ray, or --ray-address")
    add_ray_options(p, cache_help=None)
    p.add_argument("--out", help="folder for lds.csv (and sweep.csv / sweep.html)")
    p.set_defaults(func=cmd_lds)


def bank_feature_options(args: argparse.Namespace, methods: list[str]):
    """`options(entry)`: the options of `score` (LDS_RUN_OPTIONS, from the RunOptions schema) for the method of
    `entry` (METHOD or METHOD:FN) on a bank's model and training set (`run_options.comparison_options`: an option a
    method cannot use applies to the others in `methods` and is left out for it; one that none of them can use is
    refused here, in one line, before any work)."""
    values = {name: getattr(args, name) for name in LDS_RUN_OPTIONS if name != "device"}
    chosen = comparison_options(methods, **values, checkpoint=str(args.bank))

    def options(entry: str) -> dict:
        return {k: getattr(chosen[entry], k) for k in values}

    return options


def featurize_bank_on_ray(bank, methods: list[str], feature_options, args) -> dict:
    """`lds --ray`, `estimators --ray`: each method's training features on the bank's model fanned out as Ray tasks,
    before scoring. Returns each method's opened attribution (its stores complete), for scoring without loading the
    model again; the methods share each loaded model (a model is read-only once loaded, as in the app)."""
    import functools  # lazy: keeps the start of the other commands fast
    import os  # lazy: keeps the start of the other commands fast

    from ..evaluation.evaluate import open_on_bank  # lazy: keeps the start of the other commands fast
    from ..models import load_model  # lazy: keeps the start of the other commands fast
    from ..evaluation.ray_engine import RayCluster, probe_address  # lazy: Ray only for a fan-out
    from ..evaluation.ray_featurize import featurize_on_ray

    address = args.ray_address or os.environ.get("RAY_ADDRESS")
    if address:
        probe_address(address)
    if args.num_cpus is not None and args.num_cpus < 1:
        raise ConfigError(f"--num-cpus must be at least 1, got {args.num_cpus}")
    load = functools.cache(lambda spec: load_model(spec, args.device))
    opened = {name: open_on_bank(bank, name, args.device, load, **feature_options(name)) for name in methods}
    with RayCluster(address, args.num_cpus) as cluster:
        info(f"featurizing on {cluster.describe()}")
        for name, attribution in opened.items():
            featurize_on_ray(attribution, cluster, progress=lambda member, name=name: progress_bar(f"{name} features"))
    return opened


def bank_runs(bank, methods: list[str], feature_options, args) -> dict:
    """Each method run on every bank target (`score_bank`), its training features first fanned out on Ray with
    `--ray` (`featurize_bank_on_ray`, then the attributions it opened are scored): `lds` and `estimators`."""
    from ..evaluation.evaluate import run_on_bank, score_bank  # lazy: keeps the start of the other commands fast

    opened = featurize_bank_on_ray(bank, methods, feature_options, args) if args.ray and methods else {}
    runs = {}
    for name in methods:
        info(f"{name}: featurizing {bank.dataset} with the bank's model (cached after the first run)")
        if name in opened:  # featurized on Ray: score the attribution opened for it (the model loaded once)
            runs[name] = run_on_bank(bank, opened[name], progress=progress_bar(f"{name} features"))
        else:
            runs[name] = score_bank(bank, name, progress=progress_bar(f"{name} features"), device=args.device,
                                    **feature_options(name))
    return runs


def _ci(lo_hi) -> str:
    lo, hi = lo_hi
    return f"[{lo:+.3f}, {hi:+.3f}]" if np.isfinite(lo) else ""


def _fraction(table, row: dict, variant: str) -> float:
    """A method row's LDS as a fraction of the reachable ceiling (NaN for other rows or without a ceiling)."""
    share = table.of_reachable(row["name"], variant) if row["kind"] == "method" else None
    return share[0] if share is not None else float("nan")


def _share(table, name: str, variant: str) -> str:
    share = table.of_reachable(name, variant)
    return "" if share is None else f"{share[0]:.0%} [{share[1][0]:.0%}, {share[1][1]:.0%}]"


def _write_csv(path: Path, rows: list[dict]) -> None:
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def cmd_lds(args: argparse.Namespace) -> int:
    # lazy: the engine, diffusers and plotly add seconds to the start of every other command
    from ..evaluation.bank import Bank  # lazy: keeps the start of the other commands fast
    from ..evaluation.lds import SINGLE_SEED, VARIANTS, holm  # lazy: keeps the start of the other commands fast
    from ..evaluation.evaluate import (SPLITS,  # lazy: keeps the start of the other commands fast
                                       check_external_scores, finished_bank, lambda_report, lds_table,
                                       option_sweep)
    from ..figures import lds_lambda_figure, lds_option_figure  # lazy: keeps the start of the other commands fast

    splits = [s.strip() for s in args.split.split(",") if s.strip()]
    for s in splits:
        if s not in SPLITS:
            raise ConfigError(f"unknown split {s!r}; use val, gen or all")
    methods = [m.strip() for m in args.method.split(",") if m.strip()]
    if not methods and not args.scores:
        raise ConfigError("name at least one --method or --scores FILE.npy")
    if args.resamples < 10:
        raise ConfigError(f"--resamples must be at least 10, got {args.resamples}")
    if args.lam is not None:
        check_lambda(args.lam)
    bank = Bank.load(args.bank)
    finished_bank(bank)  # at least two finished subsets, before any featurizing
    info(bank.summary())
    named: dict[str, np.ndarray] = {}
    for path in args.scores:
        p = Path(path)
        scores = read_score_file(p)
        named[p.stem] = check_external_scores(bank, scores, p.name)
    runs = {}
    feature_options = bank_feature_options(args, methods)  # unknown methods fail here, before any featurizing

    if args.sweep in ("K", "k", "checkpoint") and not methods:
        raise ConfigError(f"a {args.sweep} sweep needs --method (score files have no options to sweep)")
    if args.sweep == "checkpoint":
        bank.checkpoint_specs()  # the one-line error when the bank has no checkpoint run, before featurizing
    for name, run in bank_runs(bank, methods, feature_options, args).items():
        runs[name] = run
        lam = args.lam if run.uses_lambda and args.lam is not None else run.default_lambda
        label = name + (f" (lambda={lam:.3g})" if lam is not None else "")
        named[label] = run.at(lam).scores
    rows_out, sweeps = [], []
    for split in splits:
        table = lds_table(bank, named, split, n_resamples=args.resamples)
        n_t = table.shape["targets"]
        print(f"\n{split} targets ({n_t}), {table.shape['subsets']} subsets x {table.shape['seeds']} seeds x "
              f"{table.shape['noise_sets']} noise sets; common mode = {table.common_mode_share:.0%} of F's "
              "variance across subsets")
        print(f"  {'':34} {'LDS':>7} {'95% CI models+targets':>22} {'of reachable':>13} {'centered':>9} "
              f"{'95% CI':>18} {'of reachable':>13}")
        for row in table.rows():
            shares = {v: _share(table, row["name"], v) if row["kind"] == "method" else "" for v in VARIANTS}
            print(f"  {row['name'][:34]:34} {row['standard']:+7.3f} "
                  f"{_ci((row['standard_ci_two_way_low'], row['standard_ci_two_way_high'])):>22} "
                  f"{shares['standard']:>13} {row['centered']:+9.3f} "
                  f"{_ci((row['centered_ci_two_way_low'], row['centered_ci_two_way_high'])):>18} "
                  f"{shares['centered']:>13}")
            rows_out.append({"split": split, **row,
                             **{f"{v}_of_reachable": _fraction(table, row, v) for v in VARIANTS}})
        if table.ceilings.seed is None:
            print(f"  {SINGLE_SEED}")
        else:
            print("  reachable: what a perfect method would score against the mean of the bank's seeds; the "
                  "seed-vs-seed figure (one retrain against another) is lower, and methods can exceed it")
        diffs = table.differences() if len(table.methods) > 1 else []
        for diff, confirmed in zip(diffs, holm(diffs)):
            verdict = ("real, also after Holm's correction" if confirmed else "real, but not after Holm's correction"
                       ) if diff.real else "within noise"
            print(f"  {diff.a} - {diff.b}: {diff.difference:+.3f} {_ci(diff.ci_two_way)} p={diff.p_two_way:.3f} "
                  f"({verdict})")
        if diffs:
            print(f"  (Holm: over the {len(diffs)} differences shown, family-wise 5%)")
        if len(table.methods) > 1:
            held = table.best_held_out()
            print(f"  best method chosen on half of the targets, reported on the other half: {held.chosen[0]} "
                  f"{held.held_out[0]:+.3f} / {held.chosen[1]} {held.held_out[1]:+.3f} (swapped halves)")
        for name, run in runs.items():
            if not run.covers(split):
                print(f"  {name}: attributes generated images only (no LDS on {split} targets)")
            if not run.uses_lambda or not run.covers(split):
                continue
            report = lambda_report(bank, run, split, n_resamples=args.resamples)
            held = report.held_out
            print(f"  {name}: retraining-free lambda (GCV) {report.gcv:.3g} -> LDS {report.at(report.gcv):+.3f}; "
                  f"default {report.default:.3g} -> LDS {report.at(report.default):+.3f}; lambda chosen on half of "
                  f"the targets -> LDS on the other half: {held.chosen[0]:.3g} -> {held.held_out[0]:+.3f}, "
                  f"{held.chosen[1]:.3g} -> {held.held_out[1]:+.3f} (on the same targets: {report.best:.3g} -> "
                  f"{report.at(report.best):+.3f}, optimistic)")
            if args.sweep == "lambda":
                sweep = report.sweep
                for lam, s, c in zip(sweep.lambdas, sweep.standard, sweep.centered):
                    print(f"    lambda {lam:10.3g}  LDS {s:+.3f}  centered {c:+.3f}")
                sweeps.append((name, split, sweep, {"default": report.default, "GCV": report.gcv,
                                                    "optimal": report.best},
                               {"reachable": report.reachable, "seed-vs-seed (lower)": report.ceiling}))
    option_rows, option_figures = [], []
    if args.sweep in ("K", "k", "checkpoint"):
        values = [v.strip() for v in args.values.split(",") if v.strip()] if args.values else None
        if values and args.sweep != "checkpoint" and not all(v.isdigit() and int(v) > 0 for v in values):
            raise ConfigError(f"--values of a {args.sweep} sweep must be positive integers, got {args.values!r}")
        for name in methods:
            points = option_sweep(bank, name, args.sweep, values, splits,
                                  progress=lambda label: progress_bar(label), n_resamples=args.resamples,
                                  device=args.device, **feature_options(name))
            print(f"\n{name}: LDS along {args.sweep} (two-way 95% CI; default lambda at each point)")
            for p in points:
                cells = "  ".join(f"{sp} {t.methods[name].standard.value:+.3f} "
                                  f"{_ci(t.methods[name].standard.ci_two_way)}" for sp, t in p.tables.items())
                print(f"  {args.sweep}={p.value!s:>10}  {cells}  ({p.seconds:.0f} s)")
                for sp, t in p.tables.items():
                    r = t.methods[name]
                    option_rows.append({"method": name, "sweep": args.sweep, "value": p.value, "split": sp,
                                        "lds": r.standard.value, "low": r.standard.ci_two_way[0],
                                        "high": r.standard.ci_two_way[1], "centered": r.centered.value,
                                        "lambda": p.lam, "seconds": round(p.seconds, 1)})
            lines = {sp: (np.array([p.tables[sp].methods[name].standard.value for p in points]),
                          np.array([p.tables[sp].methods[name].standard.ci_two_way for p in points]))
                     for sp in splits}
            ceil = {sp: (c.standard.value if (c := points[0].tables[sp].ceilings.reachable) is not None else None)
                    for sp in splits}
            option_figures.append(lds_option_figure([p.value for p in points], lines, args.sweep, ceil,
                                                    f"{name}: LDS versus {args.sweep}", log_x=args.sweep == "k"))
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        _write_csv(out / "lds.csv", rows_out)
        info(f"wrote {out / 'lds.csv'}")
        if sweeps:
            rows = [{"method": n, "split": sp, "lambda": float(lam), "lds": float(a), "centered": float(c)}
                    for n, sp, sw, _, _ in sweeps for lam, a, c in zip(sw.lambdas, sw.standard, sw.centered)]
            _write_csv(out / "sweep.csv", rows)
            figures = [lds_lambda_figure(sw.lambdas, sw.standard, sw.centered, sw.standard_ci_targets, marks, ceil,
                                         title=f"{n}: LDS versus λ ({sp} targets)")
                       for n, sp, sw, marks, ceil in sweeps]
            written = write_figures(out / "sweep.html", figures, "LDS versus lambda")
            info(f"wrote sweep.csv, {', '.join(written)} to {out}")
        if option_rows:
            _write_csv(out / f"sweep-{args.sweep}.csv", option_rows)
            written = write_figures(out / f"sweep-{args.sweep}.html", option_figures, f"LDS versus {args.sweep}")
            info(f"wrote sweep-{args.sweep}.csv, {', '.join(written)} to {out}")
    return 0
