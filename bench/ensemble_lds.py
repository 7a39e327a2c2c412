"""LDS versus the number of independently trained models in an ensemble (the TRAK paper's main accuracy lever).

    python bench/ensemble_lds.py --bank digits-crn --methods trak,dtrak,dtrak:avg --models 1,2,4 \
        --out bench/results/ensemble/digits-crn

The bank's full model (seed 0) is member 1; members 2.. are the same recipe (the bank's, with its randomness)
trained on the full training split at seeds 1, 2, ... into the cache folder every bank and study shares (a
counterfactual study's seed-1 control is the same model). Each method attributes the bank's targets with the first
M members (`A,B,C` checkpoints: scores averaged over members, `engine.Attribution`), and all (method, M) rows are
evaluated together on the bank, so their paired differences share bootstrap resamples. Each entry of --methods is
METHOD or METHOD:FN (an output function of D-TRAK, e.g. dtrak:avg).

Writes to --out: lds.csv (every row, both splits), cost.json (seconds to train each added model and to featurize it
per method, on this machine under its load) and ensemble.md (the tables for BENCHMARKS.md).
"""

from __future__ import annotations

import argparse
import csv
import json
import multiprocessing
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from attribution import RunOptions, Bank, holm, lds_table, load_dataset, open_attribution, run_on_bank
from attribution.evaluation.bank import FULL_SEED, bank_recipe, retrain_job, train_task


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--bank", required=True)
    p.add_argument("--methods", default="trak,dtrak,dtrak:avg")
    p.add_argument("--models", default="1,2,4", help="ensemble sizes M (comma-separated)")
    p.add_argument("--timesteps", type=int, default=10)
    p.add_argument("--proj-dim", type=int, default=4096)
    p.add_argument("--resamples", type=int, default=1000)
    p.add_argument("--jobs", type=int, default=2, help="models trained at a time (one thread each)")
    p.add_argument("--cache", default=None)
    p.add_argument("--out", required=True)
    a = p.parse_args()
    sizes = sorted({int(m) for m in a.models.split(",")})
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    bank = Bank.load(a.bank)
    recipe = bank_recipe(bank.meta)
    data = load_dataset(recipe.dataset, "train", recipe.resolution)
    key = recipe.key(data.content_hash)
    jobs = [retrain_job(recipe, key, None, len(data), FULL_SEED + s, f"full seed {FULL_SEED + s}", a.cache)
            for s in range(1, max(sizes))]
    cost_path = out / "cost.json"
    cost = json.loads(cost_path.read_text()) if cost_path.is_file() else {"train_seconds": {}, "featurize_seconds": {}}
    todo = [jb for jb in jobs if not (Path(jb["run_dir"]) / "retrain.json").is_file()]
    print(f"{bank.meta['name']}: {len(jobs)} extra members ({recipe.randomness}), {len(todo)} to train", flush=True)
    with ProcessPoolExecutor(max_workers=a.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        for jb, rec in zip(todo, pool.map(train_task, todo)):
            cost["train_seconds"][str(jb["seed"])] = rec["train_seconds"]
            print(f"  trained seed {jb['seed']} in {rec['train_seconds']} s", flush=True)
    members = [bank.model_spec] + [jb["run_dir"] for jb in jobs]
    named = {}
    for entry in [m.strip() for m in a.methods.split(",") if m.strip()]:
        method, _, fn = entry.partition(":")
        for m in sizes:
            att = open_attribution(RunOptions(",".join(members[:m]), method=method, device="cpu",
                                              dataset=bank.dataset, fn=fn or None, timesteps=a.timesteps,
                                              proj_dim=a.proj_dim, cache=a.cache))
            start = time.time()
            att.featurize()
            run = run_on_bank(bank, att)
            seconds = round(time.time() - start, 1)
            cost["featurize_seconds"].setdefault(f"{entry} M={m}", seconds)  # the first time: new members featurized
            named[f"{entry} M={m}"] = run.scores
            print(f"{entry} M={m}: {seconds} s", flush=True)
            cost_path.write_text(json.dumps(cost, indent=1))
    rows, md = [], [f"Bank `{bank.meta['name']}` "
                    f"({bank.meta.get('identity', {}).get('recipe', {}).get('randomness', 'stream')} "
                    f"retrains), K={a.timesteps}, k={a.proj_dim}, each method at its default λ; members: the bank's "
                    f"model and the recipe at seeds 1..{max(sizes) - 1}; two-way 95% CIs.\n"]
    for split in ("val", "gen"):
        table = lds_table(bank, named, split, n_resamples=a.resamples)
        md += [f"\n**{split} targets** ({table.shape['targets']})\n", "| method | M | LDS [95% CI] | of reachable | "
               "centered LDS |", "|---|---|---|---|---|"]
        for name, r in table.methods.items():
            share = table.of_reachable(name)
            md.append(f"| {name.rsplit(' M=', 1)[0]} | {name.rsplit('=', 1)[1]} | {r.standard.value:+.3f} "
                      f"[{r.standard.ci_two_way[0]:+.3f}, {r.standard.ci_two_way[1]:+.3f}] | "
                      f"{'' if share is None else f'{share[0]:.0%}'} | {r.centered.value:+.3f} |")
            rows.append({"split": split, "name": name, "standard": r.standard.value,
                         "low": r.standard.ci_two_way[0], "high": r.standard.ci_two_way[1],
                         "centered": r.centered.value})
        diffs = [table.compare(f"{e} M={max(sizes)}", f"{e} M={min(sizes)}")["standard"]
                 for e in dict.fromkeys(n.rsplit(" M=", 1)[0] for n in named)]
        md.append("\nM=%d − M=%d (paired, Holm over the %d shown): " % (max(sizes), min(sizes), len(diffs))
                  + ", ".join(f"{d.a.rsplit(' M=', 1)[0]} {d.difference:+.3f} [{d.ci_two_way[0]:+.3f}, "
                              f"{d.ci_two_way[1]:+.3f}]{' (real)' if ok else ''}" for d, ok in zip(diffs, holm(diffs))))
    with open(out / "lds.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    cost["load_avg_1min"] = round(os.getloadavg()[0], 2)
    cost_path.write_text(json.dumps(cost, indent=1))
    (out / "ensemble.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
