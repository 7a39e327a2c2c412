"""CLI command `journey`: per-denoising-step attribution of one generated (or uploaded) image.

    python -m attribution journey --checkpoint digits --seed 3 --every 5 --out out/journey-3

Writes to --out: journey.npz (per-step x_t, x̂0, features, the full steps x N score matrix, top/bottom indices and
scores, formation measures), journey.json (options, lambda, per-step proponents/opponents and measures) and
formation.html (the plotly formation curve). The computed journey is cached, so a rerun (another --lambda or
--top) only re-scores.
"""

from __future__ import annotations

import re
import time
from pathlib import Path

import numpy as np

from ..analysis.formation import formation, step_rankings, top_indices
from ..data.images import load_image_pixels, pixels_to_tensor
from ..errors import ConfigError, ImageError
from ..engine import open_attribution
from ..figures import formation_figure
from ..fileio import save_npz, write_json
from ..journey import JourneyConfig, run_journey
from ..kernel import check_lambda
from ..methods import METHODS
from ..models import load_model
from ..options import add_arguments, from_args
from ..run_options import JOURNEY_OPTIONS, add_run_options, run_options
from ..sampling import check_prompt
from ..targets import resolve_targets
from .common import add_prompt_options, info, progress_bar, prompt_from, write_figures

JOURNEY_METHODS = [name for name, cls in METHODS.items() if cls.per_step]  # kernel methods that score one step
DATASET_IMAGE = re.compile(r"(train|val):\d+")


def add_commands(sub) -> None:
    j = sub.add_parser("journey", help="attribute every denoising step of one generated image (Journey-TRAK)")
    add_run_options(j, only=JOURNEY_OPTIONS)
    src = j.add_mutually_exclusive_group(required=True)
    add_arguments(src, JourneyConfig, only=("seed",))  # a generated image, or:
    src.set_defaults(seed=None)
    src.add_argument("--image", help="an image without a trajectory, attributed by noising it forward: an image file, "
                                     "or train:I / val:I (an image of the training set's splits)")
    add_arguments(j, JourneyConfig, exclude=("seed",))  # which steps, and how each is attributed
    add_prompt_options(j)
    j.add_argument("--lambda", dest="lam", type=float, help="ridge lambda (default: 0.1 x mean kernel eigenvalue)")
    j.add_argument("--top", type=int, default=5, help="proponents/opponents listed per step (default 5)")
    j.add_argument("--feature-seed", type=int, default=0, help="noise and projection seed of the features")
    j.add_argument("--out", help="folder for journey.npz, journey.json and formation.html")
    j.set_defaults(func=cmd_journey)


def cmd_journey(args) -> int:
    if args.method not in JOURNEY_METHODS:
        raise ConfigError(f"journey scores steps with {' or '.join(JOURNEY_METHODS)}, got --method {args.method}")
    if args.top < 1:
        raise ConfigError(f"--top must be at least 1, got {args.top}")
    if args.lam is not None:
        check_lambda(args.lam)
    prompt = prompt_from(args)
    text = {} if prompt is None else {"prompt": prompt.text, "negative": prompt.negative, "guidance": prompt.guidance}
    cfg = from_args(JourneyConfig, args, seed=args.seed if args.seed is not None else 0, **text)
    model = load_model(args.checkpoint, args.device)
    cfg = cfg.for_model(model)
    cfg.check(model.schedule)
    check_prompt(model, prompt)
    image, name = None, f"gen:{args.seed}"
    attribution = open_attribution(run_options(args, seed=args.feature_seed), load=lambda spec: model)
    att = attribution.members[0]
    if args.image and DATASET_IMAGE.fullmatch(args.image):
        image, name = resolve_targets(args.image, model, att.train.spec).images[0], args.image
    elif args.image:
        path = Path(args.image).expanduser()
        if not path.is_file():
            raise ImageError(f"--image {args.image!r} is neither train:I, val:I nor an existing image file")
        image, name = pixels_to_tensor(load_image_pixels(path, model.resolution, model.channels)), path.name
    if image is not None:
        info(f"{name} has no sampling trajectory: attributing it by noising it forward (x_t = the image noised to "
             "each step's t, x̂0 = the model's one-step prediction)")
    info(f"training features: {att.train.spec} ({len(att.train)} images), fn={att.cfg.fn}, K={att.cfg.timesteps}, "
         f"k={att.proj_dim} ({att.cfg.projector}); cache: {att.store_path}")
    att.featurize(progress=progress_bar("featurize"))
    run_journey_cli(attribution, cfg, args, image, name)
    return 0


def run_journey_cli(attribution, cfg, args, image, name) -> None:
    att, method = attribution.members[0], attribution.method
    steps = cfg.step_indices()
    info(f"journey of {name}: {cfg.sampler} {cfg.steps} steps, attributing {len(steps)} step(s) "
         f"{steps.tolist()} with {method.title}, R={cfg.resamples} re-noisings each")
    start = time.perf_counter()
    journey = run_journey(att, cfg, progress_bar("journey"), args.cache, image=image, name=name)
    info(f"journey ready in {time.perf_counter() - start:.1f} s (computed in {journey.meta['seconds']} s)")
    result = journey.result(attribution).at(args.lam)  # the steps' scores at --lambda (default: the default)
    lam, scores = result.lam, result.scores
    form = formation(journey, scores, att.train, top=max(args.top, 1))
    rankings = step_rankings(scores, att.train, args.top)
    a, b = form.window()
    print(f"{name}: x̂0 approaches the final image between steps {a} and {b} (lambda={lam:.4g})")
    for i, (s, t) in enumerate(zip(journey.steps, journey.timesteps)):
        pro = rankings[i]["proponents"][:3]
        top = ", ".join(f"#{r['index']} ({r['label']}) {r['score']:+.3g}" for r in pro) or "none"
        print(f"  step {int(s):>3} t={int(t):>4}  x̂0 dist {form.x0_distance[i]:.3f}  "
              f"proponents~final {form.proponent_similarity[i]:+.2f}  overlap {form.overlap[i]:.2f}  top: {top}")
    if not args.out:
        return

    out = Path(args.out)
    pro_i, opp_i = top_indices(scores, args.top, 1), top_indices(scores, args.top, -1)
    save_npz(out / "journey.npz", **journey.arrays(), scores=scores.astype(np.float32),
             top_index=pro_i, top_score=np.take_along_axis(scores, pro_i, 1).astype(np.float32),
             bottom_index=opp_i, bottom_score=np.take_along_axis(scores, opp_i, 1).astype(np.float32),
             x0_distance=form.x0_distance, proponent_similarity=form.proponent_similarity, overlap=form.overlap)
    write_json(out / "journey.json", {
        **journey.meta, "method": method.name, "lambda": lam, "top": args.top, "features_decided": [a, b],
        "steps": [{"step": int(s), "t": int(t), "x0_distance": float(form.x0_distance[i]),
                   "proponent_similarity": float(form.proponent_similarity[i]), "overlap": float(form.overlap[i]),
                   **rankings[i]} for i, (s, t) in enumerate(zip(journey.steps, journey.timesteps))]})
    fig = formation_figure(form, title=f"Feature formation of {name} ({method.title})")
    written = write_figures(out / "formation.html", [fig], f"Feature formation of {name}")
    info(f"wrote journey.npz, journey.json and {', '.join(written)} to {out}")
