"""Draw docs/journey.png: the journey of one generated digit, its per-step proponents and the formation curve.

    python docs/make_journey_figure.py [--checkpoint digits] [--seed 0] [--method dtrak] [--out docs/journey.png]

Uses the cached training features (featurized on the first run) and the cached journey; drawn with PIL only (no
plotting backend needed). Columns are the attributed steps; rows: x_t, x̂0, the top proponents with their
scores; below, the formation curve (x̂0 distance to the final image, proponent-to-final similarity, top-k overlap
with the last step).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from attribution import (RunOptions, atomic_path, formation, get_method, JourneyConfig, load_model, open_attribution,
                         pixels_to_pil, run_journey, tensor_to_pixels, top_indices)

CELL, PAD, LABEL_W, TOP = 64, 14, 110, 3
COLORS = {"distance": (31, 119, 180), "similarity": (255, 127, 14), "overlap": (127, 127, 127)}


def font(size: int):
    try:
        return ImageFont.truetype("DejaVuSans.ttf", size)
    except OSError:
        return ImageFont.load_default()


def draw_curve(draw, box, xs, ys, lo, hi, color, dash=False):
    x0, y0, x1, y1 = box
    pts = [(x0 + (x1 - x0) * i / max(1, len(xs) - 1), y1 - (y1 - y0) * (y - lo) / (hi - lo)) for i, y in
           enumerate(ys)]
    for a, b in zip(pts, pts[1:]):
        if not dash:
            draw.line([a, b], fill=color, width=2)
        else:
            for f in np.linspace(0, 1, 8)[::2]:
                p = (a[0] + (b[0] - a[0]) * f, a[1] + (b[1] - a[1]) * f)
                q = (a[0] + (b[0] - a[0]) * (f + 1 / 7), a[1] + (b[1] - a[1]) * (f + 1 / 7))
                draw.line([p, q], fill=color, width=2)
    for p in pts:
        draw.ellipse([p[0] - 3, p[1] - 3, p[0] + 3, p[1] + 3], fill=color)
    return pts


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--checkpoint", default="digits")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--method", default="dtrak")
    p.add_argument("--every", type=int, default=5)
    p.add_argument("--out", default=str(Path(__file__).with_name("journey.png")))
    args = p.parse_args()

    model = load_model(args.checkpoint, "cpu")
    method = get_method(args.method)
    attribution = open_attribution(RunOptions(model.spec, method=method.name), load=lambda spec: model)
    attribution.featurize()
    att = attribution.members[0]
    j = run_journey(att, JourneyConfig(seed=args.seed, every=args.every))
    scores = j.result(attribution).scores
    f = formation(j, scores, att.train, top=8)
    n = len(j)
    small, big = font(11), font(13)

    rows = 2 + TOP
    grid_h = rows * (CELL + 16)
    chart_h = 190
    width = LABEL_W + n * (CELL + PAD) + 150
    height = 30 + grid_h + chart_h + 40
    img = Image.new("RGB", (width, height), "white")
    d = ImageDraw.Draw(img)
    d.text((PAD, 6), f"Journey of {args.checkpoint} gen:{args.seed} ({method.title}, DDPM 50 steps, every "
                     f"{args.every}th step; R={j.meta['config']['resamples']})", fill="black", font=big)
    y = 30
    idx = top_indices(scores, TOP)
    labels = ["x_t", "x̂0"] + [f"proponent {r + 1}" for r in range(TOP)]
    for r in range(rows):
        d.text((PAD, y + CELL // 2 - 6), labels[r], fill="black", font=big)
        for c in range(n):
            x = LABEL_W + c * (CELL + PAD)
            if r == 0:
                tile = pixels_to_pil(tensor_to_pixels(torch.from_numpy(j.xt[c])), CELL)
                cap = f"step {int(j.steps[c])}"
            elif r == 1:
                tile = pixels_to_pil(tensor_to_pixels(torch.from_numpy(j.x0[c])), CELL)
                cap = f"t={int(j.timesteps[c])}"
            else:
                i = int(idx[c, r - 2])
                tile = att.train.thumbnail(i, CELL)
                cap = f"#{i} {scores[c, i]:+.2f}"
            img.paste(tile.convert("RGB"), (x, y))
            d.text((x, y + CELL + 1), cap, fill=(60, 60, 60), font=small)
        y += CELL + 16
    final = pixels_to_pil(tensor_to_pixels(torch.from_numpy(j.final)), CELL * 2)
    fx = LABEL_W + n * (CELL + PAD) + 10
    img.paste(final.convert("RGB"), (fx, 30))
    d.text((fx, 30 + CELL * 2 + 2), "final image", fill="black", font=big)

    # formation curve, one column per step, aligned with the grid above
    box = (LABEL_W + CELL // 2, y + 20, LABEL_W + (n - 1) * (CELL + PAD) + CELL // 2, y + chart_h - 20)
    d.rectangle([box[0] - 4, box[1] - 4, box[2] + 4, box[3] + 4], outline=(200, 200, 200))
    a, b = f.window()
    ia, ib = int(np.searchsorted(j.steps, a)), int(np.searchsorted(j.steps, b))
    sx = lambda i: box[0] + (box[2] - box[0]) * i / max(1, n - 1)  # noqa: E731
    d.rectangle([sx(ia), box[1], sx(ib), box[3]], fill=(232, 240, 250))
    d.text((sx(ia) + 3, box[1] + 2), "features decided", fill=COLORS["distance"], font=small)
    dmax = float(f.x0_distance.max()) or 1.0
    draw_curve(d, box, j.steps, f.x0_distance / dmax, 0, 1, COLORS["distance"])
    draw_curve(d, box, j.steps, np.clip(f.proponent_similarity, 0, 1), 0, 1, COLORS["similarity"])
    draw_curve(d, box, j.steps, f.overlap, 0, 1, COLORS["overlap"], dash=True)
    d.text((PAD, box[1]), "formation", fill="black", font=big)
    d.text((PAD, box[1] + 18), "(0 to 1)", fill=(90, 90, 90), font=small)
    legend = [("x̂0 distance to final (÷ max %.2f)" % dmax, "distance"),
              ("top-8 proponents ~ final (pixel corr.)", "similarity"), ("top-8 overlap with last step", "overlap")]
    lx = LABEL_W
    for text, key in legend:
        d.line([(lx, y + chart_h + 8), (lx + 18, y + chart_h + 8)], fill=COLORS[key], width=3)
        d.text((lx + 22, y + chart_h + 1), text, fill="black", font=small)
        lx += 22 + int(d.textlength(text, font=small)) + 24
    with atomic_path(args.out) as tmp:
        img.save(tmp, format="PNG")
    print(f"wrote {args.out} ({width}x{height}); window {a}-{b}; seconds {j.meta['seconds']}")


if __name__ == "__main__":
    main()
