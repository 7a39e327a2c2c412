"""How far a removal moves a retrained model, with common random numbers (crn) and with one stream (stream).

    nice -n 5 python bench/crn_distances.py --recipe digits-eval --out bench/results/crn-distances --jobs 2

Retrains the recipe on the full training split and on the split minus one image and minus a random 5% (the
counterfactual study's random removal for gen:0), at seed 0, in both modes, plus the full split at seed 1 with CRN
(--stream-seed-pair adds it for the stream too): a different seed is the reference a removal's change is read
against. The models are trained as a bank trains them (`train_task`: one torch thread, into the cache folder keyed
by recipe, index set and seed), so a later bank or study of the same recipe reuses them (the CRN full model at seed 0
is a CRN bank's full model).

For each pair it reports the weight L2 distance; the distance in F, the bank's output (each target's Simple loss
over 100 uniform timesteps, 2 noise sets) on the first 10 validation and 10 generated targets of --bank: RMS over
targets of the difference, its mean over targets (the common mode: a removal also shortens training by a few steps)
and the RMS of the difference without it (centered, what the centered LDS sees), and the ratio of the centered RMS
to the spread of F across those targets; and the median pixel L2 between the two models' regenerated images
gen:0..9 (DDPM 50 steps, the counterfactual study's measure on 8-bit images).
Writes distances.json and distances.md (the table in BENCHMARKS.md) to --out.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import replace
from pathlib import Path


import numpy as np
import torch
from safetensors.torch import load_file

from attribution import Bank, COUNTERFACTUAL_RANDOM as RANDOM, load_dataset, load_model, resolve_checkpoint
from attribution.evaluation.bank import retrain_job, simple_loss_outputs, train_task
from attribution.evaluation.counterfactual import Cell, regenerate, removed_indices
from attribution.evaluation.image_metrics import pixel_l2
from attribution.evaluation.recipes import get_recipe

ONE_IMAGE_SEED = 2024  # the removed image: default_rng(ONE_IMAGE_SEED).integers(N)


def weights(run_dir: str) -> dict[str, torch.Tensor]:
    info = resolve_checkpoint(run_dir)
    return load_file(str(info.weights_path))


def weight_l2(a: dict, b: dict) -> float:
    return float(torch.sqrt(sum(((a[k].double() - b[k].double()) ** 2).sum() for k in a)))


def spread_of(f: np.ndarray) -> float:
    """RMS of F across targets about its mean."""
    return float(np.sqrt(((f - f.mean()) ** 2).mean()))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--recipe", default="digits-eval")
    p.add_argument("--bank", default="digits", help="whose targets F is measured on (val:0-9, gen:0-9)")
    p.add_argument("--out", default="bench/results/crn-distances")
    p.add_argument("--jobs", type=int, default=2, help="retrains at a time (one thread each)")
    p.add_argument("--cache", help="cache root of the retrained models (default: cache/ or $ATTRIBUTION_CACHE)")
    p.add_argument("--stream-seed-pair", action="store_true", help="also retrain the stream full model at seed 1")
    p.add_argument("--modes", default="crn,crn-slots,stream", help="randomness modes to compare (train.py)")
    a = p.parse_args()

    recipe = get_recipe(a.recipe)
    data = load_dataset(recipe.dataset, "train", recipe.resolution)
    n = len(data)
    one = int(np.random.default_rng(ONE_IMAGE_SEED).integers(n))
    five = removed_indices(Cell(0, RANDOM, "proponents", int(round(0.05 * n)), 0), n, None)
    subsets = {"full": None, "minus one": [i for i in range(n) if i != one],
               "minus 5%": [int(i) for i in np.setdiff1d(np.arange(n), five)]}
    models = {}  # (mode, subset, seed) -> job
    modes = [m.strip() for m in a.modes.split(",") if m.strip()]
    for mode in modes:
        r = replace(recipe, randomness=mode)
        key = r.key(data.content_hash)
        runs = [(name, 0) for name in subsets] + ([("full", 1)] if mode != "stream" or a.stream_seed_pair else [])
        for name, seed in runs:
            models[mode, name, seed] = retrain_job(r, key, subsets[name], n, seed, f"{name} ({mode})", a.cache)
    todo = [jb for jb in models.values() if not (Path(jb["run_dir"]) / "retrain.json").is_file()]
    print(f"{len(models)} models, {len(todo)} to train ({a.jobs} at a time); removed image {one}, 5% = {len(five)} "
          f"images", flush=True)
    start = time.time()
    with ProcessPoolExecutor(max_workers=a.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        for jb, rec in zip(todo, pool.map(train_task, todo)):
            print(f"  trained {jb['subset']} seed {jb['seed']} in {rec['train_seconds']} s", flush=True)
    train_wall = round(time.time() - start, 1) if todo else None  # None: every model was already trained

    torch.set_num_threads(1)
    bank = Bank.load(a.bank)
    rows = [bank.target_keys.index(k) for k in [f"val/{i}" for i in range(10)] + [f"gen/{s}" for s in range(10)]]
    images, keys = torch.from_numpy(bank.target_images[rows]), [bank.target_keys[r] for r in rows]
    measured = {}
    for m, jb in models.items():
        model = load_model(jb["run_dir"], "cpu")
        measured[m] = {"w": weights(jb["run_dir"]), "F": simple_loss_outputs(model, images, keys, 100, 2).mean(0),
                       "gen": regenerate(model, range(10), 50, "ddpm"),
                       "train_seconds": json.loads((Path(jb["run_dir"]) / "retrain.json").read_text())["train_seconds"]}
    results = []
    for mode in modes:
        full = measured[mode, "full", 0]
        spread = spread_of(full["F"])
        for other in [("minus one", 0), ("minus 5%", 0), ("full", 1)]:
            if (mode, *other) not in measured:
                continue
            b = measured[mode, *other]
            d = b["F"] - full["F"]
            f_rms, f_centered = float(np.sqrt((d ** 2).mean())), float(np.sqrt(((d - d.mean()) ** 2).mean()))
            results.append({"randomness": mode, "pair": "full seed 0 vs " + (f"{other[0]} seed 0" if other[1] == 0
                                                                             else "full seed 1"),
                            "weight_l2": weight_l2(full["w"], b["w"]), "F_rms": f_rms, "F_mean_shift": float(d.mean()),
                            "F_centered_rms": f_centered, "F_centered_over_spread": f_centered / spread,
                            "image_l2_median": float(np.median([pixel_l2(x, y) for x, y in
                                                                                zip(full["gen"], b["gen"])]))})
    norm = float(torch.sqrt(sum((v.double() ** 2).sum() for v in measured[modes[0], "full", 0]["w"].values())))
    info = {"recipe": a.recipe, "n_train": n, "removed_one": one, "removed_5pct": len(five), "targets": keys,
            "F_spread": spread_of(measured[(modes[0], "full", 0)]["F"]),
            "weight_norm_full_crn": norm, "train_wall_seconds": train_wall, "jobs": a.jobs,
            "load_avg_1min": round(os.getloadavg()[0], 2),
            "train_seconds": {f"{m[0]} {m[1]} seed {m[2]}": v["train_seconds"] for m, v in measured.items()},
            "stream_full_equals_bank_model": resolve_checkpoint(models["stream", "full", 0]["run_dir"]).content_hash()
            == bank.meta["model"]["content_hash"] if a.recipe == bank.meta["recipe_name"] and "stream" in modes
            else None,
            "results": results}
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "distances.json").write_text(json.dumps(info, indent=2) + "\n")
    lines = ["| randomness | pair | weight L2 | F: RMS difference | F: mean shift | F: centered RMS | centered / "
             "spread of F | image L2 (median) |", "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['randomness']} | {r['pair']} | {r['weight_l2']:.2f} | {r['F_rms']:.2e} | "
              f"{r['F_mean_shift']:+.2e} | {r['F_centered_rms']:.2e} | {r['F_centered_over_spread']:.3f} | "
              f"{r['image_l2_median']:.2f} |" for r in results]
    (out / "distances.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"weight norm of the {modes[0]} full model {norm:.1f}; stream full model equals the bank's model: "
          f"{info['stream_full_equals_bank_model']}")


if __name__ == "__main__":
    main()
