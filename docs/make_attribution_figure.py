"""The README's sanity figure and statistics for D-TRAK on a shipped model.

    python docs/make_attribution_figure.py --checkpoint digits --out docs/attribution-digits.png

1. Training images as targets: the fraction whose top D-TRAK proponent is the image itself (a consistency check
   only: it holds for random features too, the self-score being a leverage score; not evidence of quality).
2. Generated images as targets: a pixel logistic-regression classifier trained on the training split labels each
   generated image; we report how often the top-5 proponents share that label, with a 95% interval over the
   targets, against chance (`attribution.analysis.sanity.class_agreement`).
3. A figure in the D-TRAK paper's style: each row is a target, then its top proponents and opponents with scores.
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import torch
from PIL import Image, ImageDraw

from attribution import RunOptions, get_method, load_model, open_attributor, rank, sample, tensor_to_pixels


def tile(pixels: np.ndarray, size: int) -> Image.Image:
    arr = pixels[:, :, 0] if pixels.shape[-1] == 1 else pixels
    return Image.fromarray(arr).convert("RGB").resize((size, size), Image.Resampling.NEAREST)


def figure(rows, size=64, pad=6, text_h=14) -> Image.Image:
    """rows: list of (target pixels, target caption, [(pixels, caption)] proponents, [...] opponents)."""
    n_pro = max(len(r[2]) for r in rows)
    n_opp = max(len(r[3]) for r in rows)
    cols = 1 + n_pro + n_opp
    gap = 16
    w = cols * (size + pad) + 2 * gap + pad
    h = 20 + len(rows) * (size + text_h + pad) + pad
    img = Image.new("RGB", (w, h), "white")
    draw = ImageDraw.Draw(img)
    draw.text((pad, 4), "target", fill="black")
    draw.text((pad + size + pad + gap, 4), "proponents (score)", fill=(0, 90, 160))
    draw.text((pad + (1 + n_pro) * (size + pad) + 2 * gap, 4), "opponents (score)", fill=(200, 90, 0))
    for r, (tpix, tcap, pros, opps) in enumerate(rows):
        y = 20 + r * (size + text_h + pad)
        x = pad
        img.paste(tile(tpix, size), (x, y))
        draw.text((x, y + size + 1), tcap, fill="black")
        for j, (pix, cap) in enumerate(pros):
            x = pad + gap + (1 + j) * (size + pad)
            img.paste(tile(pix, size), (x, y))
            draw.text((x, y + size + 1), cap, fill=(0, 90, 160))
        for j, (pix, cap) in enumerate(opps):
            x = pad + 2 * gap + (1 + n_pro + j) * (size + pad)
            img.paste(tile(pix, size), (x, y))
            draw.text((x, y + size + 1), cap, fill=(200, 90, 0))
    return img


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--checkpoint", default="digits")
    p.add_argument("--timesteps", type=int, default=10)
    p.add_argument("--proj-dim", type=int, default=4096)
    p.add_argument("--n-train", type=int, default=100, help="training targets for the self-proponent rate")
    p.add_argument("--n-gen", type=int, default=100, help="generated targets for the same-class rate")
    p.add_argument("--sampler", default="ddpm")
    p.add_argument("--out", default="docs/attribution-digits.png")
    a = p.parse_args()

    model = load_model(a.checkpoint)
    method = get_method("dtrak")
    att = open_attributor(model, RunOptions(model.spec, method=method.name, timesteps=a.timesteps, proj_dim=a.proj_dim))
    att.featurize()
    train = att.train
    lam = att.resolve_lambda(method, None)
    rng = np.random.default_rng(0)

    # 1. training images as targets
    idx = np.sort(rng.choice(len(train), size=min(a.n_train, len(train)), replace=False))
    S = att.scores(method, att.features_of(train.tensors(idx), [f"train/{i}" for i in idx]), lam)
    self_top = float(np.mean(S.argmax(1) == idx))

    # 2. generated images as targets, labelled by a pixel classifier trained on the training split
    from sklearn.linear_model import LogisticRegression

    X = train.pixels.reshape(len(train), -1) / 255.0
    clf = LogisticRegression(max_iter=2000).fit(X, train.labels)
    traj = sample(model, a.n_gen, seed=0, sampler=a.sampler)
    gen_pix = tensor_to_pixels(torch.from_numpy(traj.final))
    gen_lab = clf.predict(gen_pix.reshape(len(gen_pix), -1) / 255.0)
    G = att.features_of(torch.from_numpy(traj.final), [f"gen/{s}" for s in traj.seeds])
    Sg = att.scores(method, G, lam)
    top5 = np.argsort(-Sg, axis=1)[:, :5]
    same = float(np.mean(train.labels[top5] == gen_lab[:, None]))
    chance = float(np.mean([np.mean(train.labels == c) for c in gen_lab]))
    from attribution.analysis.sanity import class_agreement

    agreement = class_agreement(Sg, train.labels, gen_lab, top=5)
    stats = {"checkpoint": model.spec, "K": a.timesteps, "k": a.proj_dim, "lambda": lam,
             "train_targets": len(idx), "self_is_top_proponent": self_top,
             "generated_targets": a.n_gen, "sampler": a.sampler, "top5_same_class_as_classifier": same,
             "chance_same_class": chance, "top5_same_class_ci95": [agreement.low, agreement.high],
             "self_is_top_proponent_note": "consistency check only (holds for random features)"}
    print(json.dumps(stats, indent=2))

    # 3. the figure: 2 training targets, 4 generated targets
    rows = []
    for i in idx[:2]:
        s = S[list(idx).index(i)]
        rows.append((train.pixels[i], f"train #{i}",
                     [(train.pixels[r.index], f"#{r.index} {r.score:+.2g}") for r in rank(s, train, 5, 1)],
                     [(train.pixels[r.index], f"#{r.index} {r.score:+.2g}") for r in rank(s, train, 3, -1)]))
    for m in range(4):
        s = Sg[m]
        rows.append((gen_pix[m], f"seed {traj.seeds[m]}",
                     [(train.pixels[r.index], f"{r.class_name} {r.score:+.2g}") for r in rank(s, train, 5, 1)],
                     [(train.pixels[r.index], f"{r.class_name} {r.score:+.2g}") for r in rank(s, train, 3, -1)]))
    figure(rows).save(a.out)
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
