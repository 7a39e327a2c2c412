"""UI helpers shared by the attribution pages (Attribute, Self-influence): cached attributors, targets, tiles.

Not a page. Heavy objects are cached with `st.cache_resource` (an Attributor keeps its kernel decomposition in
memory, so moving the lambda slider costs milliseconds); the functions without Streamlit calls are unit-tested.
"""

from __future__ import annotations

import hashlib
import threading
from dataclasses import dataclass

import numpy as np
import streamlit as st
from attribution.data import ImageDataset
from attribution.engine import Attribution, Attributor, open_attribution
from attribution.report import Ranked, rank
from attribution.kernel import Kernel
from attribution.methods import DEFAULT_METHOD, METHODS, get_method
from attribution.targets import Targets, from_pixels

from app_pages._ui import cached_model, display_size

PROJ_DIMS = (512, 1024, 2048, 4096, 8192, 16384)
PROJECTORS = ("auto", "sjlt", "gaussian", "identity")
METHOD_TITLES = {name: cls.title for name, cls in METHODS.items()}


@dataclass(frozen=True)
class RunOptions:
    """Everything the user picks in the Attribute form (hashable: it keys the caches)."""

    checkpoint: str
    dataset: str | None
    method: str = DEFAULT_METHOD
    fn: str | None = None
    eta: float | None = None
    timesteps: int = 10
    strategy: str = "uniform"
    proj_dim: int = 4096
    projector: str = "auto"
    seed: int = 0
    checkpoint_weights: str = "lr"  # checkpoint methods: lr or uniform (methods.over_checkpoints)


def opts_key(opts: RunOptions) -> str:
    """A short digest of the options that is the same in every process (unlike `hash()`, which is salted per
    process for strings): for widget keys that must stay put across reruns and servers."""
    return hashlib.sha256(repr(opts).encode()).hexdigest()[:12]


@st.cache_resource(max_entries=6, show_spinner=False)
def cached_attribution(opts: RunOptions) -> Attribution:
    """One Attribution per (checkpoint, dataset, method, feature config): one attributor, or a run's checkpoints
    for the checkpoint methods; validation errors surface as AttributionError."""
    return open_attribution(opts.checkpoint, get_method(opts.method), load=cached_model, dataset=opts.dataset,
                            fn=opts.fn, eta=opts.eta, timesteps=opts.timesteps, strategy=opts.strategy,
                            proj_dim=opts.proj_dim, projector=opts.projector, seed=opts.seed,
                            checkpoint_weights=opts.checkpoint_weights)


class FeaturizeJob:
    """One featurization of one feature store in a background thread of the server, shared by every session
    that asks for that store. It runs to the end even when the session that started it goes away (a closed tab,
    a lost connection: Streamlit stops that session's script, not this thread); sessions only watch it."""

    def __init__(self, member: Attributor):
        self.done, self.total, self.message, self.error = 0, len(member.train), "starting", None
        self.thread = threading.Thread(target=self._run, args=(member,), daemon=True,
                                       name=f"featurize {member.store_path.name}")
        self.thread.start()

    def _run(self, member: Attributor) -> None:
        try:
            member.featurize(progress=self._update)
        except Exception as exc:  # handed to every watching session
            self.error = exc

    def _update(self, done: int, total: int, message: str) -> None:
        self.done, self.total, self.message = done, total, message

    def watch(self, update, poll: float = 0.5) -> None:
        """Report progress to `update(done, total, message)` until the job ends; raise its error, if any."""
        while self.thread.is_alive():
            update(self.done, self.total, self.message)
            self.thread.join(poll)
        if self.error is not None:
            raise self.error
        update(self.done, self.total, self.message)


_JOBS: dict[str, FeaturizeJob] = {}
_JOBS_LOCK = threading.Lock()


def featurize_job(member: Attributor) -> FeaturizeJob:
    """The running job for `member`'s store, or a new one (a finished or failed job is replaced: the new one
    finds the finished rows cached, or retries)."""
    with _JOBS_LOCK:
        job = _JOBS.get(str(member.store_path))
        if job is None or not job.thread.is_alive():
            job = _JOBS[str(member.store_path)] = FeaturizeJob(member)
        return job


def featurize_with_progress(att: Attribution, title: str = "") -> None:
    """Featurize every member of `att` in the background (see FeaturizeJob), one progress bar per checkpoint."""
    from app_pages import _ui

    prefix = f"{title}: " if title else ""
    for member in att.members:
        featurize_job(member).watch(_ui.progress_bar(
            f"{prefix}featurizing {len(member.train)} training images with {member.model.spec}"))


def featurize_note(att: Attribution) -> str:
    """Before Run: whether the training features are cached, else about how long featurizing will take here
    (from the throughput measured on this machine; a one-image timing until the first featurization)."""
    from attribution.engine import format_duration

    total, bases = 0.0, []
    for member in att.members:
        seconds, basis = member.featurize_estimate(probe=True)
        if seconds:
            total += seconds
            bases.append(basis)
    if not total:
        return "The training features for these options are cached: a run takes seconds."
    return (f"The training features for these options are not cached yet: featurizing will take about "
            f"{format_duration(total)} on this machine ({'; '.join(bases)}). Progress is shown; the result is "
            "cached and an interrupted run resumes.")


def feature_fn_options(method: str) -> list[str]:
    """Output functions the method accepts (`Method.fn_choices`)."""
    return list(get_method(method).fn_choices())


def target_from_pixels(pixels: np.ndarray, name: str, label: str | None = None) -> Targets:
    return from_pixels(pixels[None], [name], [label])


@st.cache_data(max_entries=16, show_spinner="Generating the target (DDPM, 50 steps)…")
def generated_pixels(checkpoint: str, seed: int) -> np.ndarray:
    """uint8 (R, R, C): the image `checkpoint` generates from `seed` (what the CLI's gen:SEED target is), sampled
    once per (checkpoint, seed) rather than on every rerun of the page."""
    import torch

    from attribution.data import tensor_to_pixels
    from attribution.sampling import sample

    return tensor_to_pixels(torch.from_numpy(sample(cached_model(checkpoint), 1, int(seed)).final))[0]


def lambda_slider(label: str, kernel: Kernel, key: str) -> float:
    """A λ select-slider over a log-spaced grid (4 per decade, 3 significant digits) around the kernel's scale,
    starting at the default λ. Give each feature set its own `key`: another set has another grid, which an old
    value may not be on."""
    default = float(f"{kernel.default_lambda():.3g}")
    grid = sorted({float(f"{v:.3g}") for v in kernel.lambda_grid(per_decade=4)} | {default})
    return st.select_slider(label, grid, value=default, key=key, format_func=lambda v: f"{v:.3g}")


def ranked_tiles(items: list[Ranked], data: ImageDataset, title: str, key: str) -> None:
    """A row of training images with index, class and signed score under each (the paper's figure style).

    `key` names the row's container (CSS class `.st-key-<key>` in the browser, `get_by_key` in AppTest).
    """
    with st.container(key=key):
        st.markdown(f"**{title}**")
        if not items:
            st.caption("none with this sign")
            return
        size = display_size(data.resolution, 80)
        with st.container(horizontal=True, gap="xsmall"):  # same tile size in every row, whatever the count
            for r in items:
                st.image(data.thumbnail(r.index, size), width=size, output_format="PNG",
                         caption=f"#{r.index} · {r.class_name} · {r.score:+.3g}")


def top_lists(scores: np.ndarray, data: ImageDataset, n_pro: int, n_opp: int):
    return rank(scores, data, n_pro, 1), rank(scores, data, n_opp, -1)
