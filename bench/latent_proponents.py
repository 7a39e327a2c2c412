"""Class-prompted samples of a LoRA-finetuned latent model and where their top proponents come from.

    python bench/latent_proponents.py --checkpoint digits-latent --per-class 10 \\
        --grid docs/digits-latent-samples.png --out bench/results/latent_proponents.json

For every class c of the finetuning set (the model's prompt table), --per-class images are generated from the
class prompt ("a handwritten digit 7") with classifier-free guidance, and attributed with --method over the
finetuning set. Reported, over all samples:
- top-5 same-class fraction: the share of each sample's 5 strongest proponents whose class is the prompted one,
  with a bootstrap 95% CI over samples, against chance (the prompted class's share of the finetuning set);
- 1-NN agreement: the share of samples whose nearest training image (pixel L2, all ten digit classes of the
  full `digits` training split) has the prompted class: do the samples look like their class?
The grid has one row per class prompt.
"""

from __future__ import annotations

import argparse
import json
import sys
import time


import numpy as np

from attribution import (RunOptions, atomic_path, grid_image, load_dataset, open_attribution, Prompt, resolve_targets,
                         write_json)


def bootstrap_ci(values: np.ndarray, n: int = 2000, seed: int = 0) -> tuple[float, float]:
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, len(values), (n, len(values)))].mean(1)
    return float(np.quantile(means, 0.025)), float(np.quantile(means, 0.975))


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", default="digits-latent")
    p.add_argument("--method", default="dtrak")
    p.add_argument("--per-class", type=int, default=10)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--guidance", type=float, default=3.0)
    p.add_argument("--timesteps", type=int, default=10)
    p.add_argument("--proj-dim", type=int, default=2048)
    p.add_argument("--top", type=int, default=5)
    p.add_argument("--cache", default=None)
    p.add_argument("--grid", help="write the samples as a grid PNG (one row per class prompt)")
    p.add_argument("--out", help="write the figures as JSON")
    a = p.parse_args()
    start = time.time()
    att = open_attribution(RunOptions(a.checkpoint, method=a.method, device="cpu", timesteps=a.timesteps,
                                      proj_dim=a.proj_dim, cache=a.cache))
    model, train = att.target_model, att.train
    table = model.prompts
    t0 = time.time()
    att.featurize()
    featurize_s = time.time() - t0
    labels = np.array([train.label_name(i) for i in range(len(train))])
    ref = load_dataset("digits", "train", model.resolution, model.channels)  # all ten classes: the 1-NN reference
    ref_x = ref.pixels.reshape(len(ref), -1).astype(np.float32)
    ref_names = np.array([ref.label_name(i) for i in range(len(ref))])
    rows, grid, per_class = [], [], {}
    gen_s = score_s = 0.0
    for c, text in table.class_prompts().items():
        prompt = Prompt(text, guidance=a.guidance)
        t0 = time.time()
        targets = resolve_targets(f"gen:0-{a.per_class - 1}", model, train.spec, steps=a.steps, prompt=prompt)
        gen_s += time.time() - t0
        t0 = time.time()
        scores = att.scores(att.target_features(targets, cache=a.cache))
        score_s += time.time() - t0
        top = np.argsort(-scores, axis=1, kind="stable")[:, :a.top]
        same = (labels[top] == c).mean(1)
        pix = ((targets.images.numpy().transpose(0, 2, 3, 1) + 1) * 127.5).round().clip(0, 255).astype(np.uint8)
        d = ((pix.reshape(len(pix), -1).astype(np.float32)[:, None] - ref_x[None]) ** 2).sum(-1)
        nn = ref_names[d.argmin(1)] == c
        chance = float((labels == c).mean())
        per_class[c] = {"prompt": text, "top_same_class": float(same.mean()), "nn_agreement": float(nn.mean()),
                        "chance": chance}
        rows += [{"class": c, "same": float(s), "nn": bool(n), "chance": chance} for s, n in zip(same, nn)]
        grid.append(pix)
        print(f"{text!r}: top-{a.top} same-class {same.mean():.2f} (chance {chance:.2f}), 1-NN {nn.mean():.2f}",
              file=sys.stderr)
    same = np.array([r["same"] for r in rows])
    chance = np.array([r["chance"] for r in rows])
    nn = np.array([r["nn"] for r in rows], dtype=np.float64)
    lo, hi = bootstrap_ci(same)
    dlo, dhi = bootstrap_ci(same - chance)
    result = {"checkpoint": model.spec, "method": a.method, "dataset": train.spec, "n_train": len(train),
              "samples": len(rows), "per_class": a.per_class, "guidance": a.guidance, "steps": a.steps,
              "timesteps": a.timesteps, "proj_dim": a.proj_dim, "top": a.top,
              "top_same_class": float(same.mean()), "ci95": [lo, hi], "chance": float(chance.mean()),
              "excess_over_chance": float((same - chance).mean()), "excess_ci95": [dlo, dhi],
              "nn_agreement": float(nn.mean()), "nn_ci95": list(bootstrap_ci(nn)), "per_class_results": per_class,
              "parameters": model.describe_parameters(), "seconds": {"featurize": round(featurize_s, 1),
                                                                     "generate": round(gen_s, 1),
                                                                     "score": round(score_s, 1),
                                                                     "total": round(time.time() - start, 1)}}
    print(json.dumps(result, indent=2))
    if a.out:
        write_json(a.out, result)
    if a.grid:
        pixels = np.concatenate(grid)
        with atomic_path(a.grid) as tmp:
            grid_image(pixels, scale=4, columns=a.per_class).save(tmp, format="PNG")
    return 0


if __name__ == "__main__":
    sys.exit(main())
