"""UI helpers shared by the attribution pages (Attribute, Self-influence): cached attributors, targets, tiles.

Not a page. Heavy objects are cached with `st.cache_resource` (an Attributor keeps its kernel decomposition in
memory, so moving the lambda slider costs milliseconds); the functions without Streamlit calls are unit-tested.
"""

from __future__ import annotations

import hashlib
import os
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import streamlit as st

from app_pages import _ui
from app_pages._image import ImageRef, image_target, pick_image
from app_pages._tiles import tile_caption, tiles
from app_pages._trust import held_out_button, trust_caption
from app_pages._ui import cached_model, fail
from attribution import (
    METHODS,
    Attribution,
    AttributionError,
    Attributor,
    ImageDataset,
    JourneyConfig,
    Kernel,
    Ranked,
    Result,
    RunOptions,
    Targets,
    export_metadata,
    export_name,
    featurize_on_cluster,
    fields_of,
    format_duration,
    from_pixels,
    get_method,
    key_prompt,
    metadata_arrays,
    open_attribution,
    positive_share,
    prompt_key,
    rank,
    ranking_rows,
    target_split,
    tensor_to_pixels,
    to_csv,
    to_npz_bytes,
    usable_projectors,
)
from attribution import PreparationTask as Task

PROJ_DIMS = (512, 1024, 2048, 4096, 8192, 16384)  # the k values offered (any k works on the command line)
OPTION = {spec.name: spec for spec in fields_of(RunOptions)}  # labels, help and choices of the option widgets
PROJECTORS = tuple(p for p in OPTION["projector"].choices if p == "auto" or p in usable_projectors())
METHOD_TITLES = {name: cls.title for name, cls in METHODS.items()}


def option_widget(container, name: str, key: str, choices=None, label: str | None = None, schema=RunOptions,
                  help: str | None = None, value=None, **kwargs):
    """The widget of one field of an options schema (`RunOptions` unless `schema`: `JourneyConfig`, ...),
    labelled, explained and defaulted by the schema (or `label`, `help`, `value`): a selectbox over its choices (or
    `choices`), else a number input (`kwargs`: min_value, max_value, ...)."""
    spec = OPTION[name] if schema is RunOptions else {s.name: s for s in fields_of(schema)}[name]
    label, help = label or spec.label, help or spec.help
    if choices is not None or spec.choices:
        return container.selectbox(label, list(choices if choices is not None else spec.choices), key=key,
                                   help=help, **kwargs)
    return container.number_input(label, value=spec.default if value is None else value, key=key, help=help,
                                  **kwargs)


def opts_key(opts: RunOptions) -> str:
    """A short digest of the options that is the same in every process (unlike `hash()`, which is salted per
    process for strings): for widget keys that must stay put across reruns and servers."""
    return hashlib.sha256(repr(opts).encode()).hexdigest()[:12]


@st.cache_resource(max_entries=6, show_spinner=False)
def cached_attribution(opts: RunOptions) -> Attribution:
    """One Attribution per (checkpoint, dataset, method, feature config): one attributor, or a run's checkpoints
    for the checkpoint methods; validation errors surface as AttributionError."""
    return open_attribution(opts, load=cached_model)


class BackgroundJob:
    """One piece of long work (a featurization, the preparation for class) in a background thread of the server,
    shared by every session that asks for the same `key`. It runs to the end even when the session that started
    it goes away (a closed tab, a lost connection: Streamlit stops that session's script, not this thread);
    sessions only watch it."""

    def __init__(self, name: str, work: Callable[[Callable[[int, int, str], None]], object], total: int = 1):
        self.done, self.total, self.message, self.error = 0, total, "starting", None
        self.thread = threading.Thread(target=self._run, args=(work,), daemon=True, name=name)
        self.thread.start()

    def _run(self, work) -> None:
        try:
            work(self._update)
        except Exception as exc:  # handed to every watching session
            self.error = exc

    def _update(self, done: int, total: int, message: str = "") -> None:
        self.done, self.total, self.message = done, total, message

    def watch(self, update, poll: float = 0.5) -> None:
        """Report progress to `update(done, total, message)` until the job ends; raise its error, if any."""
        while self.thread.is_alive():
            update(self.done, self.total, self.message)
            self.thread.join(poll)
        if self.error is not None:
            raise self.error
        update(self.done, self.total, self.message)


_JOBS: dict[str, BackgroundJob] = {}
_JOBS_LOCK = threading.Lock()


def background_job(key: str, work, total: int = 1, start: bool = True) -> BackgroundJob | None:
    """The running job for `key`, or (with `start`) a new one running `work(progress)` (a finished or failed job
    is replaced: the new one finds the finished work cached, or retries). Without `start`: None when none runs."""
    with _JOBS_LOCK:
        job = _JOBS.get(key)
        if job is None or not job.thread.is_alive():
            if not start:
                return None
            job = _JOBS[key] = BackgroundJob(key, work, total)
        return job


def find_job(key: str) -> BackgroundJob | None:
    """The job last started for `key`, running or ended (its `error` says how it ended); None when none was."""
    with _JOBS_LOCK:
        return _JOBS.get(key)


def ray_address() -> str | None:
    """Where the server's background featurizations run: on the Ray cluster at $RAY_ADDRESS when the server was
    started with one (HOST:PORT, or `local` for a Ray on this machine), else in the server's process."""
    return os.environ.get("RAY_ADDRESS", "").strip() or None


def featurize_job(member: Attributor) -> BackgroundJob:
    """The background featurization of `member`'s store (one per store, whoever asks), fanned out on Ray when the
    server was started with $RAY_ADDRESS."""
    address = ray_address()
    if address:
        return background_job(str(member.store_path), lambda progress: featurize_on_cluster(member, address, progress),
                              len(member.train))
    return background_job(str(member.store_path), lambda progress: member.featurize(progress=progress),
                          len(member.train))


def featurize_with_progress(att: Attribution, title: str = "") -> None:
    """Featurize every member of `att` in the background (see FeaturizeJob), one progress bar per checkpoint."""
    prefix = f"{title}: " if title else ""
    for member in att.members:
        featurize_job(member).watch(_ui.progress_bar(
            f"{prefix}featurizing {len(member.train)} training images with {member.model.spec}"))


def estimate_note(named: list[tuple[str, Attribution]], n_targets: int = 1) -> str:
    """Before Run: per result column (title, attribution), whether its training features are cached, else about
    how long its featurization and its targets' features will take here (from the throughput measured on this
    machine for that kind of features; a three-image timing until the first featurization), and the total, short
    enough for a caption."""
    total, parts, unknown, rough = 0.0, [], [], False
    for title, att in named:
        seconds, bases = att.estimate(n_targets, probe=True)
        featurized = all(m.featurize_estimate()[0] == 0 for m in att.members)
        rough = rough or any("rough" in b for b in bases)
        if seconds is None:
            unknown.append(title)
            parts.append(f"{title}: no estimate")
        elif not featurized:
            total += seconds
            parts.append(f"{title}: about {format_duration(seconds)}")
        else:
            total += seconds
    if not parts:
        return (f"The training features for these options are cached: a run takes about {format_duration(total)} "
                "(the targets' features).")
    basis = ("timed on three images here, a rough upper bound" if rough
             else "from the featurization speed measured on this machine")
    return (f"Not cached yet, so this run featurizes the training set first: {'; '.join(parts)} ({basis}). "
            + ("" if unknown else f"About {format_duration(total)} in all. ") + ray_clause()
            + "Progress is shown; the result is cached and an interrupted run resumes.")


def ray_clause() -> str:
    """What an estimate from this machine's one-process speed means when the training features run on Ray."""
    address = ray_address()
    if not address:
        return ""
    where = "a Ray on this machine" if address == "local" else f"the Ray cluster at {address}"
    return (f"The training features run as tasks on {where}: the figure is this server's one-process speed, not "
            "the cluster's. ")


def journey_note(att: Attribution, cfg: JourneyConfig, image=None) -> str:
    """Before a journey (of generated image `cfg.seed`, or of `image` noised forward): cached, or about how long
    its training features and step features will take here."""
    seconds, bases = Task("journey", att, journey=cfg, image=image).estimate(probe=True)
    if seconds == 0:
        return "This journey is cached: it shows in seconds."
    if seconds is None:
        return f"No estimate yet ({'; '.join(bases)})."
    featurized = all(m.featurize_estimate()[0] == 0 for m in att.members)
    return (f"About {format_duration(seconds)} on this machine ({'; '.join(bases)}); cached afterwards. "
            + ("" if featurized else ray_clause())).rstrip()


def featurize_note(att: Attribution) -> str:
    """`estimate_note` of one attribution, for pages with one result."""
    return estimate_note([(att.method.title, att)])


def feature_fn_options(method: str) -> list[str]:
    """Output functions the method accepts (`Method.fn_choices`)."""
    return list(get_method(method).fn_choices())


def target_from_pixels(pixels: np.ndarray, name: str, label: str | None = None) -> Targets:
    return from_pixels(pixels[None], [name], [label])


LAMBDA_HELP = ("λ is the ridge term in the kernel (ΦᵀΦ + λI)⁻¹ that turns gradient similarity into attribution. "
               "Small λ trusts every direction of the training features (closest to the exact inverse, sharper "
               "and noisier rankings); large λ damps them all and the ranking tends to plain gradient similarity "
               "(the scores shrink like 1/λ and the order stops changing). Its useful range scales with the "
               "features' eigenvalues, which differ per method, output function, K and k, so each feature set gets "
               "its own grid: 10⁻⁶ to 10² times the mean eigenvalue. The default is 0.1 × the mean eigenvalue.")


def lambda_grid(kernel: Kernel) -> tuple[list[float], float]:
    """(slider grid, default): a log-spaced grid (4 per decade, 3 significant digits) around the kernel's scale,
    with the default λ on it."""
    default = float(f"{kernel.default_lambda():.3g}")
    return sorted({float(f"{v:.3g}") for v in kernel.lambda_grid(per_decade=4)} | {default}), default


def _new_key() -> str:
    return uuid.uuid4().hex[:8]


@dataclass
class Lambda:
    """The λ one result is shown at: what its slider shows, what its scores use and what its command line says.

    Kept with the result it belongs to (not in the slider's widget state). The slider starts at this value and its
    key changes whenever code sets the value (`set`: Reset; a new result gets a new `Lambda`), so a browser that
    draws the slider anew (after another page, or after a run that did not show the results) shows this value, and
    the value it sends back is this one. Writing λ into the widget's state instead reaches no browser in which the
    slider was off the page: it showed the grid's first value while the scores stayed at the stored one."""

    value: float | None = None  # None until first shown: then the feature set's default λ
    key_id: str = field(default_factory=_new_key)

    def set(self, value: float) -> None:
        self.value, self.key_id = value, _new_key()

    @classmethod
    def after(cls, previous: Lambda | None) -> Lambda:
        """The λ of a new result that continues `previous` (same options): its value, under a new slider."""
        return cls(None if previous is None else previous.value)


def lambda_slider(label: str, kernel: Kernel, lam: Lambda, key: str) -> float:
    """A λ select-slider over `lambda_grid` showing `lam` (the default λ when it has no value or one off this
    grid), the default marked "default", and a Reset button; the value picked is written back to `lam`. `key`
    names the slider on its page (the widget key adds `lam.key_id`)."""
    grid, default = lambda_grid(kernel)
    if lam.value not in grid:  # unset, or from a grid this feature set does not have
        lam.set(default)
    lam.value = st.select_slider(label, grid, value=lam.value, key=f"{key}_{lam.key_id}", help=LAMBDA_HELP,
                                 format_func=lambda v: f"{v:.3g} (default)" if v == default else f"{v:.3g}")
    st.button("Reset λ", key=f"reset_{key}_{lam.key_id}",  # not "{key}_…": keep() must never restore a button
              icon=":material/restart_alt:", type="tertiary",
              disabled=lam.value == default, on_click=lam.set, args=(default,),
              help=f"Back to the default λ = {default:.3g}")
    return lam.value


def topk_stability(score_at, grid: list[float], lam: float, k: int = 5) -> list[tuple[float, int]]:
    """How stable the top-k is around `lam`: for each neighbouring grid value g (below, above), the number of
    images shared by the top-k at `lam` and at g. `score_at(λ)` returns the (N,) scores."""
    def top(v: float) -> set[int]:
        return set(np.argsort(-score_at(v), kind="stable")[:k].tolist())

    i = grid.index(lam)
    here = top(lam)
    return [(g, len(here & top(g))) for g in (grid[i - 1] if i > 0 else None, grid[i + 1] if i + 1 < len(grid)
                                                 else None) if g is not None]


def stability_caption(pairs: list[tuple[float, int]], k: int) -> str:
    if not pairs:
        return ""
    parts = ", ".join(f"{n}/{k} at λ = {g:.3g}" for g, n in pairs)
    verdict = ("stable" if min(n for _, n in pairs) >= k - 1 else
               "changing: compare a few λ values or check the LDS" if min(n for _, n in pairs) <= k // 2
               else "fairly stable")
    return f"Top-{k} shared with the neighbouring λ values on the slider: {parts} ({verdict})."


def lambda_controls(result: Result, opts: RunOptions, lam: Lambda, key: str, title: str = "") -> float | None:
    """The λ slider of one result column (an `Attribution.run` result, shown at `lam`) with its guidance: default
    marked, Reset, how stable the top-5 is at the neighbouring grid values; then, for every method, the verdict
    from the model's bank when one exists (app_pages/_trust.py) and the button that sets the λ chosen on its
    held-out targets. None for methods without λ."""
    att = result.attribution
    value = None
    if att.method.uses_lambda:
        kernel = att.members[0].train_features().kernel
        value = lambda_slider(f"λ ({title})" if title else "λ", kernel, lam, key)
        grid, _ = lambda_grid(kernel)
        st.caption(stability_caption(topk_stability(lambda v: result.at(v).scores[0], grid, value), 5))
    verdict_controls(att, opts, lam, value, key, target_split(result.targets), result.targets.keys[0])
    return value


def verdict_controls(att: Attribution, opts: RunOptions, lam: Lambda, value: float | None, key: str,
                     split: str = "val", exclude: str | None = None) -> None:
    """Beside a ranking shown at λ = `value` (None: a method without λ): the verdict from the model's bank
    (`trust_caption`) and, when it is shown and the method has λ, the button that sets `lam` to the λ chosen on
    the bank's held-out `split` targets (`exclude`: the target attributed, a bank target's key, left out)."""
    shown = trust_caption(att, opts_key(opts), value, key, split)
    if shown is not None and value is not None:
        grid, _ = lambda_grid(att.members[0].train_features().kernel)
        held_out_button(*shown, opts_key(opts), grid, value, lam.set, split, exclude, key)


def ranked_tiles(items: list[Ranked], data: ImageDataset, title: str, key: str) -> None:
    """A row of training images with index, class and signed score under each (the paper's figure style), each
    with a Details button (see app_pages/_tiles.py).

    `key` names the row's container (CSS class `.st-key-<key>` in the browser, `get_by_key` in AppTest).
    """
    st.markdown(f"**{title}**")
    if not items:
        st.caption("none with this sign")
        return
    tiles(data, [r.index for r in items], [tile_caption(data, r.index, r.score) for r in items], key)


def top_lists(scores: np.ndarray, data: ImageDataset, n_pro: int, n_opp: int):
    return rank(scores, data, n_pro, 1), rank(scores, data, n_opp, -1)


def choose_target(model) -> tuple[Targets, str, ImageRef]:
    """The Attribute page's target: the current image (generated, uploaded, training or validation image; the
    picker of app_pages/_image.py), the spec the command line names it by, and the image's name. Stops the page
    with guidance or one error line when there is none."""
    ref = pick_image(model, "attr")
    try:
        target, spec = image_target(model, ref, st.session_state.get("dataset"))
    except AttributionError as exc:
        fail(exc)
    return target, spec, ref


def prompt_options(target: Targets) -> list[tuple[str, object]]:
    """The command line's prompt options for a target: --prompt/--guidance (and --negative-prompt) for one generated
    from a prompt, --prompt for an image attributed under one (its noise key carries it), none otherwise."""
    made = target.generated[0] if target.generated else None
    if made is not None and made.prompt is not None:
        opts = [("--prompt", made.prompt.text), ("--guidance", made.prompt.guidance)]
        return opts + ([("--negative-prompt", made.prompt.negative)] if made.prompt.negative else [])
    text = key_prompt(target.keys[0]) if target.keys[0].startswith("file/") else None
    return [] if text is None else [("--prompt", text)]


@dataclass(frozen=True)
class ColumnTarget:
    """A target as one result column attributes it: the pixels and noise key (`targets`), the command line's options
    that name them (`cli`: --target, then any prompt options) and, when --target names an image file the page made,
    that file (`file`: name and PNG bytes, offered for download, with a `note` that says why)."""

    targets: Targets
    cli: tuple[tuple[str, object], ...]
    file: tuple[str, bytes] | None = None
    note: str = ""

    @classmethod
    def of(cls, target: Targets, spec: str) -> ColumnTarget:
        """`target` under the spec the page picked it by; an image generated otherwise than the CLI's gen:SEED
        (the default sampler, 50 steps) is named by its PNG, which the column offers."""
        made = target.generated[0] if target.generated else None
        if made is None or spec.startswith("gen:"):
            return cls(target, (("--target", spec), *prompt_options(target)))
        return cls(target, (("--target", spec), *prompt_options(target)),
                   (spec, _ui.png_bytes(tensor_to_pixels(target.images)[0])),
                   f"Sampled with {made.sampler}, {made.steps} steps (gen:SEED is the default sampler, 50): the "
                   f"command line reads `{spec}` (download above).")

    def on_another_checkpoint(self, checkpoint: str) -> ColumnTarget:
        """This target, picked with `checkpoint`, for a column with another checkpoint: the same pixels. gen:SEED
        names the image a checkpoint generates, another image for another checkpoint, so that column attributes
        this checkpoint's image as the PNG the Generate page's zip names it by (seed-SEED.png), which the column
        offers and its command line reads. A dataset image or an image file is the same pixels for every
        checkpoint."""
        spec = dict(self.cli)["--target"]
        if not spec.startswith("gen:"):
            return self
        made = self.targets.generated[0]
        name, pixels = f"seed-{made.seed:06d}.png", tensor_to_pixels(self.targets.images)[0]
        targets = target_from_pixels(pixels, name)
        text = None if made.prompt is None else made.prompt.text
        targets.keys[0] = prompt_key(targets.keys[0], text)  # the key the CLI gives the file under --prompt
        return ColumnTarget(targets, (("--target", name), *prompt_options(targets)), (name, _ui.png_bytes(pixels)),
                            f"The first column's image, {spec} of {_ui.checkpoint_name(checkpoint)}, read from "
                            f"`{name}` (download above); {spec} of this checkpoint is another image.")


@dataclass
class Column:
    """One result column of the Attribute page as computed: its downloads and command line read the same options,
    target and λ as its scores."""

    title: str
    opts: RunOptions
    target: ColumnTarget
    result: Result | None = None  # set by Run
    lam: Lambda = field(default_factory=Lambda)


@dataclass
class Computed:
    """What the Attribute page computed, kept in one session-state entry: the target it was computed for
    (`target_id`: model, dataset, spec, noise key and pixels; the results are shown only while that target is the
    one chosen) and its columns."""

    target_id: tuple
    target_spec: str
    columns: list[Column]

    def lambda_of(self, opts: RunOptions) -> Lambda | None:
        """The λ of the column computed with `opts` (a new Run with the same options continues from it)."""
        return next((c.lam for c in self.columns if c.opts == opts), None)


def result_footer(i: int, column: Column, att: Attribution, scores: np.ndarray, lam: float | None, n_pro: int,
                  pro: list[Ranked]) -> None:
    """Under result column `i` of the Attribute page: the top's share of the positive score mass and its
    same-class share (`pro`: the proponents shown), the score downloads (.csv, .npz), the image file its command
    line reads when the page made it, and the command line that reproduces the column."""
    target, cli = column.target.targets, list(column.target.cli)
    share = positive_share(scores, n_pro)
    st.caption(f"The top {n_pro} hold {share:.0%} of the positive score mass (a normalised share, not a "
               f"probability). Same-class share of the top {n_pro}: "
               + (f"{np.mean([r.class_name == target.labels[0] for r in pro]):.0%}"
                  if target.labels[0] in att.train.class_names and pro else "n/a"))
    meta = export_metadata(dict(cli)["--target"], column.opts.method, lam, column.opts.checkpoint, att.train.spec,
                           att.cfg)
    rows = ranking_rows(scores, att.train, meta)
    d1, d2, *d3 = st.columns(3 if column.target.file else 2)
    d1.download_button("Scores (.csv)", to_csv(rows), file_name=export_name("scores", meta, "csv"),
                       mime="text/csv", key=f"attr_csv_{i}")
    d2.download_button("Scores (.npz)", to_npz_bytes(scores=scores[None].astype(np.float32),
                                                     target_image=target.images.numpy(),
                                                     **metadata_arrays([meta])),
                       file_name=export_name("scores", meta, "npz"), key=f"attr_npz_{i}")
    if column.target.file:
        name, data = column.target.file
        d3[0].download_button("Target image (.png)", data, file_name=name, mime="image/png", key=f"attr_png_{i}")
        st.caption(column.target.note)
    st.code(column.opts.command_line("score", att.cfg, att.train.spec, [*cli[:1], ("--lambda", lam),
                                                                         ("--top", n_pro), *cli[1:]]),
            language="bash", wrap_lines=True)
