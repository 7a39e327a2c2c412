"""What every CLI command shares: progress bars on stderr and informational lines."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

from tqdm import tqdm

from ..figures import write_png
from ..fileio import atomic_path
from ..sampling import DEFAULT_GUIDANCE, Prompt


def progress_bar(desc: str) -> Callable[[int, int, str], None]:
    """A progress callback (done, total, message) drawn as a tqdm bar on stderr."""
    bar = None

    def update(done: int, total: int, message: str = "") -> None:
        nonlocal bar
        if bar is None or bar.total != total:
            if bar is not None:
                bar.close()
            bar = tqdm(total=total, desc=desc, unit="it", file=sys.stderr, dynamic_ncols=True)
        bar.n = done
        if message:
            bar.set_postfix_str(message, refresh=False)
        bar.refresh()
        if done >= total:
            bar.close()
            bar = None

    return update


def info(msg: str) -> None:
    print(msg, file=sys.stderr)


def write_figures(path, figures, title: str) -> list[str]:
    """`figures` as one self-contained HTML file at `path` (plotly.js inline: works offline) and each as a PNG
    beside it (`<stem>.png`, or `<stem>-1.png`, ... for several) through kaleido and the machine's Chromium; a PNG
    that cannot be made is skipped with one line on stderr. Returns the names written."""
    path = Path(path)
    parts = [fig.to_html(full_html=False, include_plotlyjs="inline" if i == 0 else False)
             for i, fig in enumerate(figures)]
    with atomic_path(path) as tmp:
        Path(tmp).write_text(f"<!doctype html><html><head><meta charset='utf-8'><title>{title}</title></head>"
                             f"<body><h2>{title}</h2>" + "\n".join(parts) + "</body></html>\n")
    written = [path.name]
    for i, fig in enumerate(figures):
        png = path.with_name(f"{path.stem}.png" if len(figures) == 1 else f"{path.stem}-{i + 1}.png")
        note = write_png(fig, png)
        if note:
            info(f"{png.name}: {note}")
        else:
            written.append(png.name)
    return written


def add_ray_options(p, cache_help: str | None = "cache root (default: cache/ or $ATTRIBUTION_CACHE)") -> None:
    """--ray-address, --num-cpus and --cache (None: the command has its own) of the commands that fan out on Ray
    (bank build, counterfactual, featurize --ray)."""
    p.add_argument("--ray-address", help="an existing Ray cluster (HOST:PORT; default $RAY_ADDRESS, else a local "
                                         "Ray sized to this machine)")
    p.add_argument("--num-cpus", type=int, help="CPUs of the local Ray (default: all)")
    if cache_help is not None:
        p.add_argument("--cache", help=cache_help)


def add_prompt_options(p) -> None:
    """--prompt, --negative-prompt and --guidance: what a text-conditional (latent) model generates."""
    p.add_argument("--prompt", help="text prompt of a text-conditional model (e.g. 'a cat painting'), or the class "
                                    "name of a class-conditional one (e.g. 7)")
    p.add_argument("--negative-prompt", default="", help="classifier-free guidance pushes away from it (default: "
                                                         "the empty, unconditional prompt)")
    p.add_argument("--guidance", type=float, default=DEFAULT_GUIDANCE,
                   help=f"classifier-free guidance scale, at least 1 (default {DEFAULT_GUIDANCE}; 1 = none)")


def prompt_from(args) -> Prompt | None:
    """The `Prompt` of --prompt/--negative-prompt/--guidance, or None without --prompt (checked where it is used:
    a conditional model needs one, an unconditional one takes none)."""
    if getattr(args, "prompt", None) is None:
        return None
    prompt = Prompt(args.prompt, args.negative_prompt, args.guidance)
    prompt.check()
    return prompt
