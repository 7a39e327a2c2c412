"""EK-FAC influence's LDS along its damping, damping rule and curvature copies per image, on a ground-truth bank.

    OMP_NUM_THREADS=1 python bench/ekfac_sweep.py --bank digits --out bench/results/lds-digits/sweep-ekfac
    python bench/ekfac_sweep.py --bank digits --dampings 0.01,0.1 --grid global:2 --out /tmp/ek  # a part

Every configuration is `score_bank(bank, "ekfac", damping=D, damping_rule=R, curvature_samples=C)`: one factor fit
per copies-per-image C (cached without the damping, so the damping values and rules of one C share it), one
whitened featurization of the training set and of the bank's targets per (D, R, C), all cached (a rerun costs only
the statistics). They are evaluated in one LDS table per split together with the baselines (`--baselines`, default
TRAK and D-TRAK with the Avg output), so every paired difference uses the same bootstrap resamples.

Features at K = `--timesteps` (default 10) and k = 4096 (the LDS tables' defaults). Writes to --out: sweep.csv
(one row per configuration and split: LDS and centered LDS with their two-way 95% CIs, and the paired differences
from each baseline with theirs) and sweep.md (the tables pasted into BENCHMARKS.md).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from attribution import Bank, lds_table, score_bank, to_csv


def ci(lo: float, hi: float) -> str:
    return f"[{lo:+.3f}, {hi:+.3f}]"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--bank", default="digits")
    p.add_argument("--dampings", default="0.0001,0.001,0.01,0.1,1",
                   help="damping factors (x the rule's mean eigenvalue); default 1e-3..10 x the default 0.1")
    p.add_argument("--grid", default="global:2,global:8,module:2,module:8",
                   help="RULE:COPIES pairs (damping rule, curvature copies per training image), each swept along "
                        "--dampings")
    p.add_argument("--baselines", default="trak,dtrak:avg", help="METHOD or METHOD:FN, scored beside EK-FAC")
    p.add_argument("--timesteps", type=int, default=10, help="K of the features (EK-FAC's and the baselines')")
    p.add_argument("--cache", default=None)
    p.add_argument("--out", required=True)
    args = p.parse_args()
    bank = Bank.load(args.bank)
    runs, configs = {}, {}  # k = 4096, the LDS tables' default
    for entry in [b.strip() for b in args.baselines.split(",") if b.strip()]:
        method, _, fn = entry.partition(":")
        runs[entry] = score_bank(bank, method, device="cpu", fn=fn or None, timesteps=args.timesteps,
                                 cache=args.cache)
    for pair in [g.strip() for g in args.grid.split(",") if g.strip()]:
        rule, _, samples = pair.partition(":")
        for damping in [float(d) for d in args.dampings.split(",")]:
            label = f"ekfac {rule} c{samples} d{damping:g}"
            start = time.time()
            runs[label] = score_bank(bank, "ekfac", device="cpu", damping=damping, damping_rule=rule,
                                     curvature_samples=int(samples), timesteps=args.timesteps, cache=args.cache)
            configs[label] = (rule, int(samples), damping)
            print(f"{label}: scored in {time.time() - start:.0f} s (the fit and features: once)", flush=True)
    named = {k: r.scores for k, r in runs.items()}
    baselines = [k for k in runs if k not in configs]
    rows, md = [], []
    for split in ("val", "gen"):
        table = lds_table(bank, named, split)  # 1000 bootstrap resamples, as the lds command
        md.append(f"\n**{split} targets** ({table.shape['targets']}); baselines: "
                  + ", ".join(f"{b} {table.methods[b].standard.value:+.3f} {ci(*table.methods[b].standard.ci_two_way)}"
                              for b in baselines) + "\n")
        md.append("| rule | copies | damping | LDS [95% CI] | centered LDS [95% CI] | "
                  + " | ".join(f"− {b} [95% CI]" for b in baselines) + " |")
        md.append("|---|---|---|---|---|" + "---|" * len(baselines))
        for label, (rule, samples, damping) in configs.items():
            r = table.methods[label]
            diffs = {b: table.compare(label, b)["standard"] for b in baselines}
            rows.append({"split": split, "rule": rule, "samples": samples, "damping": damping,
                         "lds": r.standard.value, "low": r.standard.ci_two_way[0], "high": r.standard.ci_two_way[1],
                         "centered": r.centered.value, "centered_low": r.centered.ci_two_way[0],
                         "centered_high": r.centered.ci_two_way[1],
                         **{f"minus_{b}": d.difference for b, d in diffs.items()},
                         **{f"minus_{b}_low": d.ci_two_way[0] for b, d in diffs.items()},
                         **{f"minus_{b}_high": d.ci_two_way[1] for b, d in diffs.items()}})
            md.append(f"| {rule} | {samples} | {damping:g} | {r.standard.value:+.3f} {ci(*r.standard.ci_two_way)} | "
                      f"{r.centered.value:+.3f} {ci(*r.centered.ci_two_way)} | "
                      + " | ".join(("**" if d.real else "") + f"{d.difference:+.3f} {ci(*d.ci_two_way)}"
                                   + ("**" if d.real else "") for d in diffs.values()) + " |")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "sweep.csv").write_text(to_csv(rows))
    (out / "sweep.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
