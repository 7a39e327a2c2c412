"""The LDS table of every method on a ground-truth bank, as it appears in BENCHMARKS.md.

    OMP_NUM_THREADS=2 python bench/lds_table.py --bank digits --out bench/results/lds-digits
    python bench/lds_table.py --bank digits --methods dtrak,trak,pixel-cos --out /tmp/lds   # a subset

Each entry of --methods is METHOD or METHOD:FN (an output function of D-TRAK, e.g. dtrak:l2). All methods are scored
on the bank's own model (checkpoint methods on its checkpoint run: `python -m attribution bank checkpoints`) with the
same feature options (K, k, projector, seed) and evaluated together, so the paired differences use the same
bootstrap resamples. Features are cached (a rerun costs only the statistics); the wall time of each method's
featurization and target features is recorded on first computation in timing.json (load-dependent: quote it with
the machine's load).

Writes to --out: lds.csv (every row of both splits, with each method's share of the reachable ceiling), lambda.csv
(default / GCV / held-out-chosen / LDS-optimal λ per method and split) and lds.md (the markdown tables pasted into
BENCHMARKS.md). Methods that cannot run (CLIP without weights)
are listed with their reason.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from pathlib import Path

from attribution import (AttributionError, Bank, get_method, holm, lambda_report, lds_table, METHODS, score_bank,
                         SINGLE_SEED)
from attribution.evaluation.lds import VARIANTS

DEFAULT = ("dtrak,dtrak:simple,dtrak:avg,dtrak:l1,dtrak:l2,dtrak:linf,dtrak:elbo,dtrak:interp,trak,journey-trak,"
           "grad-dot,grad-cos,relative-if,renorm-if,tracin,retrac,tracincp,gas,pixel-dot,pixel-cos,das,das0,ekfac,clip-cos")


def fmt(v: float, lo: float, hi: float) -> str:
    return f"{v:+.3f} [{lo:+.3f}, {hi:+.3f}]" if lo == lo else f"{v:+.3f}"


def share(s: tuple[float, tuple[float, float]] | None) -> str:
    return "" if s is None else f"{s[0]:.0%} [{s[1][0]:.0%}, {s[1][1]:.0%}]"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--bank", default="digits")
    p.add_argument("--methods", default=DEFAULT)
    p.add_argument("--timesteps", type=int, default=10)
    p.add_argument("--proj-dim", type=int, default=4096)
    p.add_argument("--resamples", type=int, default=1000)
    p.add_argument("--cache", default=None)
    p.add_argument("--out", required=True)
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    bank = Bank.load(args.bank)
    timing_path = out / "timing.json"
    timing = json.loads(timing_path.read_text()) if timing_path.is_file() else {}
    runs, skipped = {}, {}
    for entry in [m.strip() for m in args.methods.split(",") if m.strip()]:
        method, _, fn = entry.partition(":")
        if method not in METHODS:
            skipped[entry] = "not a registered method"
            continue
        label = entry if fn else method
        if not fn and len(get_method(method).fn_choices()) > 1:
            label = f"{method}:{get_method(method).default_fn}"
        start = time.time()
        options = dict(fn=fn or None, timesteps=args.timesteps, proj_dim=args.proj_dim, cache=args.cache)
        try:  # the training and the bank targets' features are cached: a rerun costs only the statistics
            runs[label] = score_bank(bank, method, device="cpu", **options)
        except AttributionError as exc:
            skipped[entry] = str(exc)
            print(f"{entry}: skipped ({exc})", flush=True)
            continue
        seconds = time.time() - start
        timing.setdefault(label, round(seconds, 1))  # the first computation (featurizing included); reruns reuse
        print(f"{label}: scored in {seconds:.0f} s", flush=True)
        timing_path.write_text(json.dumps(timing, indent=1))
    bank = Bank.load(args.bank)  # again: a bank still building has more outputs by now
    named = {k: r.scores for k, r in runs.items()}
    rows, lam_rows, md = [], [], []
    done = bank.finished()
    md.append(f"Bank `{args.bank}`: {done.masks.shape[0]} subsets x {len(bank.meta['seeds'])} seeds x "
              f"{bank.meta['noise_sets']} noise sets, N={bank.masks.shape[1]}, features K={args.timesteps}, "
              f"k={args.proj_dim}, each method at its default λ; two-way 95% CIs (retrained models and targets).\n")
    for split in ("val", "gen"):
        table = lds_table(bank, named, split, n_resamples=args.resamples)
        md.append(f"\n**{split} targets** ({table.shape['targets']}); common mode "
                  f"{table.common_mode_share:.0%} of F's across-subset variance\n")
        md.append("| method | LDS [95% CI] | of reachable | centered LDS [95% CI] | of reachable |")
        md.append("|---|---|---|---|---|")
        for r in table.rows():
            shares = {v: table.of_reachable(r["name"], v) if r["kind"] == "method" else None for v in VARIANTS}
            rows.append({"split": split, **r, **{f"{v}_of_reachable": sh[0] if sh else float("nan")
                                                  for v, sh in shares.items()}})
            md.append(f"| {r['name']} | "
                      f"{fmt(r['standard'], r['standard_ci_two_way_low'], r['standard_ci_two_way_high'])}"
                      f" | {share(shares['standard'])}"
                      f" | {fmt(r['centered'], r['centered_ci_two_way_low'], r['centered_ci_two_way_high'])}"
                      f" | {share(shares['centered'])} |")
        if table.ceilings.seed is None:
            md.append(f"\n{SINGLE_SEED}\n")
        if len(table.methods) > 1:
            held = table.best_held_out()
            md.append(f"\nBest method chosen on half of the targets, LDS on the other half: {held.chosen[0]} "
                      f"{held.held_out[0]:+.3f}; halves swapped: {held.chosen[1]} {held.held_out[1]:+.3f}.")
            best = max(table.methods, key=lambda k: table.methods[k].standard.value)
            diffs = [d for d in table.differences() if best in (d.a, d.b)]
            real = [d for d, ok in zip(diffs, holm(diffs)) if ok]
            md.append(f"Differences from the highest ({best}, chosen on these targets) that survive Holm's correction "
                      f"over the {len(diffs)} shown: "
                      + (", ".join(f"{d.a} − {d.b} {d.difference:+.3f} [{d.ci_two_way[0]:+.3f}, {d.ci_two_way[1]:+.3f}]"
                                   f" (p={d.p_two_way:.3f})" for d in real) or "none") + "\n")
        for name, run in runs.items():
            if not run.covers(split):
                md.append(f"{name}: generated targets only (no trajectory for {split} targets)\n")
            elif run.uses_lambda:
                rep = lambda_report(bank, run, split, n_resamples=200)
                held = rep.held_out
                lam_rows.append({"method": name, "split": split,
                                 "default": rep.default, "lds_default": rep.at(rep.default),
                                 "gcv": rep.gcv, "lds_gcv": rep.at(rep.gcv), "optimal": rep.best,
                                 "lds_optimal": rep.at(rep.best), "gcv_fraction_of_optimal": rep.gcv_within,
                                 "held_out_lambda_a": held.chosen[0], "held_out_lambda_b": held.chosen[1],
                                 "lds_held_out": held.value})
    md.append("\n| method | split | default λ → LDS | GCV λ → LDS | λ chosen on one half → LDS on the other | "
              "optimal on the same targets (optimistic) |")
    md.append("|---|---|---|---|---|---|")
    for r in lam_rows:
        md.append(f"| {r['method']} | {r['split']} | {r['default']:.3g} → {r['lds_default']:+.3f} | {r['gcv']:.3g} → "
                  f"{r['lds_gcv']:+.3f} | {r['held_out_lambda_a']:.3g}, {r['held_out_lambda_b']:.3g} → "
                  f"{r['lds_held_out']:+.3f} | {r['optimal']:.3g} → {r['lds_optimal']:+.3f} |")
    for entry, why in skipped.items():
        md.append(f"\nNot run: {entry}: {why}")
    for name, data in (("lds.csv", rows), ("lambda.csv", lam_rows)):
        if data:
            with open(out / name, "w", newline="") as f:
                w = csv.DictWriter(f, fieldnames=list(data[0]))
                w.writeheader()
                w.writerows(data)
    (out / "lds.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
