"""MAGIC measurements on digits 8x8: bits/dim sanity table, ODE convergence, metagradient cost, validation.

    nice -n 10 python bench/magic.py --queries 4 --sets 50          # everything, resumable (cache/magic/...)
    python bench/magic.py --stage sanity                             # one stage

Stages (each appends to --out, default out/magic-bench.json):
  sanity       bits/dim of training images, the same rotated 90 degrees, averages of 4 training images, uniform noise
  convergence  bits/dim of 4 training images against the ODE step count, Heun and RK4
  queries      generated images (seeds 0..q-1); each query's metagradient in its own process (peak memory)
  validate     leave-1%-out retrains, Spearman per query with a bootstrap CI; finite differences on 3 weights
  cost         one query with every state kept against sqrt(T) checkpoints, in fresh processes
  baselines    TRAK (bits/dim output) and D-TRAK on the same model, queries and removed sets
  grid         metasmoothness over batch size x lr x eps_root at the default recipe's size
  smooth       metasmoothness of the run's own recipe only
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from attribution import evaluate_magic as evaluate, MagicRun, MagicSpec, train_magic_run as train_run
from attribution.magic.validate import finite_difference_check, retrain

ROOT = Path(__file__).resolve().parents[1]


def cli(*args) -> str:
    out = subprocess.run([sys.executable, "-m", "attribution", "magic", *args], cwd=ROOT, check=True,
                         capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    return out.stdout


def sanity(run: MagicRun, theta) -> dict:
    g = np.random.default_rng(0)
    x = run.data[g.choice(run.run.n, 8, replace=False)]
    side = run.spec.resolution
    rot = torch.rot90(x.view(8, side, side), 1, (1, 2)).reshape(8, -1)
    avg = torch.stack([run.data[g.choice(run.run.n, 4, replace=False)].mean(0) for _ in range(8)])
    noise = torch.from_numpy(g.random((8, side * side)))
    out = {}
    for name, xs in (("training", x), ("rotated 90 deg", rot), ("average of 4", avg), ("uniform noise", noise)):
        with torch.no_grad():
            b = run.bpd(theta, xs).double().numpy()
        out[name] = {"mean": float(b.mean()), "min": float(b.min()), "max": float(b.max())}
    return out


def convergence(run: MagicRun, theta) -> dict:
    from attribution.magic.likelihood import bits_per_dim

    x = run.data[:4].to(theta.dtype)
    rows = {}
    for solver, steps_list in (("heun", (8, 16, 32, 64, 128)), ("rk4", (4, 8, 16, 32, 64))):
        for steps in steps_list:
            start = time.perf_counter()
            with torch.no_grad():
                b = bits_per_dim(run.score_fn(theta), x, steps=steps, solver=solver, eps=run.spec.ode.eps)
            rows[f"{solver}-{steps}"] = {"bpd": b.double().numpy().round(4).tolist(),
                                         "seconds": time.perf_counter() - start,
                                         "evaluations": steps * (2 if solver == "heun" else 4)}
    return rows


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--stage", default="all", choices=["all", "sanity", "convergence", "queries", "validate", "cost",
                                                     "baselines", "grid", "smooth"])
    p.add_argument("--queries", type=int, default=4)
    p.add_argument("--sets", type=int, default=50)
    p.add_argument("--run", help="a trained MAGIC run folder (default: the default recipe's run, trained if needed)")
    p.add_argument("--out", default=str(ROOT / "out" / "magic-bench.json"))
    args = p.parse_args()
    torch.set_num_threads(1)
    out_path = Path(args.out)
    results = json.loads(out_path.read_text()) if out_path.is_file() else {}

    def save():
        out_path.parent.mkdir(parents=True, exist_ok=True)
        out_path.write_text(json.dumps(results, indent=1) + "\n")

    if args.run:
        from attribution.magic.runs import open_run

        run = open_run(args.run)
    else:
        run = MagicRun(MagicSpec())
    theta = train_run(run)
    results["run"] = {"path": str(run.path), **run.provenance(), "spec": run.spec.to_dict()}
    stages = (["sanity", "convergence", "queries", "validate", "baselines", "cost", "grid"] if args.stage == "all"
              else [args.stage])
    if "sanity" in stages:
        results["sanity"] = sanity(run, theta)
        save()
        print(json.dumps(results["sanity"], indent=1), flush=True)
    if "convergence" in stages:
        results["convergence"] = convergence(run, theta)
        save()
        print(json.dumps(results["convergence"]), flush=True)
    if "queries" in stages:
        for s in range(args.queries):
            res = json.loads(cli("query", "--run", str(run.path), "--seed", str(s), "--top", "3"))
            results.setdefault("queries", {})[f"gen:{s}"] = res
            save()
            print(json.dumps(res), flush=True)
    if "validate" in stages:
        start = time.perf_counter()
        retrain(run, 0.01, args.sets, seed=0)
        results["retrain_seconds"] = time.perf_counter() - start
        rows = []
        for i, q in enumerate(run.list_queries()):
            r = evaluate(run, q, 0.01, 0)
            if i == 0:
                r["finite_differences"] = finite_difference_check(run, q, np.argsort(q["grad"])[[0, -1, 500]])
            rows.append(r)
            print(q["id"], r["spearman"], r["ci"], r.get("finite_differences"), flush=True)
        results["validation"] = rows
        save()
    if "baselines" in stages:
        from attribution.magic.baselines import scores
        from attribution.magic.validate import bootstrap_ci, spearman, validation_dir

        qs = run.list_queries()
        xq = torch.stack([torch.as_tensor(q["x"]) for q in qs])
        sets = np.asarray(json.loads((validation_dir(run, 0.01, 0) / "sets.json").read_text())["sets"])
        rows = {}
        for method in ("trak", "dtrak"):
            start = time.perf_counter()
            tau = scores(run, theta, xq, method)
            seconds = time.perf_counter() - start
            for q, t in zip(qs, tau):
                r = evaluate(run, q, 0.01, 0)
                pred = np.array([t[sets[j]].sum() for j in range(r["n_sets"])])
                rows.setdefault(q["id"], {})[method] = {"spearman": spearman(pred, np.array(r["actual"])),
                                                        "ci": bootstrap_ci(pred, np.array(r["actual"])),
                                                        "seconds_all_queries": seconds}
        results["baselines"] = rows
        save()
        print(json.dumps(rows, indent=1), flush=True)
    if "grid" in stages:
        from attribution.magic.smoothness import metasmoothness, smoothness_grid

        results["grid"] = smoothness_grid(run.data, run.model, run.spec.train, batch_sizes=(64, 256, 512),
                                          lrs=(3e-3, 1e-2, 3e-2), eps_roots=(1e-8, 1e-6, 1e-4),
                                          progress=lambda i, n, r: print(i, n, r, flush=True))
        results["recipe_smoothness"] = metasmoothness(run.run)
        save()
    if "smooth" in stages:
        from attribution.magic.smoothness import metasmoothness

        results["recipe_smoothness"] = metasmoothness(run.run)
        save()
        print("metasmoothness", results["recipe_smoothness"], flush=True)
    if "cost" in stages:
        cost = {}
        for policy in ("all", "sqrt"):
            code = ("import json,sys,torch;torch.set_num_threads(1);from attribution.magic.runs import open_run;"
                    "from attribution.magic.query import query_metagradient as q;r=open_run(sys.argv[1]);"
                    "x=r.dataset.pixels[0];res=q(r,r.query_vector(x),policy=sys.argv[2],use_cache=False);"
                    "print(json.dumps(res['meta']))")
            o = subprocess.run([sys.executable, "-c", code, str(run.path), policy], cwd=ROOT, check=True,
                               capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}).stdout
            cost[policy] = json.loads(o.strip().splitlines()[-1])
            print(policy, cost[policy], flush=True)
        results["cost"] = cost
        save()


if __name__ == "__main__":
    main()
