"""Feature formation along a journey: how far each denoising step already is from the final image.

    f = formation(journey, scores, train)     # x̂0 distance, proponents ~ final image, top-k overlap per step
    a, b = f.window()                          # the steps over which x̂0 moves most of the way to the final image

`journey` comes from `attribution.journey.run_journey`; `scores` are its per-step scores (steps x N).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..journey import Journey
from ..report import rank


@dataclass
class Formation:
    """How far each chosen step already is from the final image.

    Attributes:
        steps, timesteps: as in the journey.
        x0_distance: RMS pixel distance of x̂0 to the final image.
        proponent_similarity: mean pixel correlation of the step's top-k proponents with the final image.
        overlap: |top-k of the step ∩ top-k of the last chosen step| / k.
        top: k.
    """

    steps: np.ndarray
    timesteps: np.ndarray
    x0_distance: np.ndarray
    proponent_similarity: np.ndarray
    overlap: np.ndarray
    top: int

    def window(self, lo: float = 0.1, hi: float = 0.9) -> tuple[int, int]:
        """(first, last) step index over which x̂0's distance to the final image falls from `hi` to `lo` of its
        total drop: where the image's features are decided."""
        d = self.x0_distance
        span = d[0] - d[-1]
        if len(d) < 2 or span <= 0:
            return int(self.steps[0]), int(self.steps[-1])
        rel = (d - d[-1]) / span
        start = int(np.argmax(rel <= hi))
        end = int(np.argmax(rel <= lo))
        return int(self.steps[max(0, start - 1)]), int(self.steps[end])


    def covered(self, fraction: float) -> int:
        """The first step at which x̂0 has covered `fraction` of its total drop in distance to the final image."""
        d = self.x0_distance
        span = d[0] - d[-1]
        if len(d) < 2 or span <= 0:
            return int(self.steps[-1])
        return int(self.steps[int(np.argmax((d[0] - d) / span >= fraction))])

    def settled(self, share: float = 0.5) -> int:
        """The first step from which the top-k overlap with the last step stays at or above `share`."""
        below = np.flatnonzero(self.overlap < share)
        return int(self.steps[0] if not len(below) else self.steps[min(below[-1] + 1, len(self.steps) - 1)])

    def summary(self) -> str:
        """One sentence on when the image and its proponents are decided: the proponents only where an earlier
        step already holds half of the last step's top-k (else how many it holds at most)."""
        h, n, s = self.covered(0.5), self.covered(0.9), self.settled(0.5)
        last, k = int(self.steps[-1]), self.top
        text = f"x̂0 is halfway to the final image at step {h} and 90% of the way at step {n} (of {last}); "
        if s < last:
            return text + (f"from step {s} on, at least half of the last step's top-{k} proponents are among the "
                           f"step's top-{k}.")
        shared = int(round(float(self.overlap[:-1].max()) * k)) if len(self.overlap) > 1 else 0
        held = "none" if shared == 0 else f"at most {shared}"
        return text + (f"the proponents keep changing to the end: an earlier step's top-{k} holds {held} of the "
                       f"last step's top-{k}.")


def pixel_correlation(images: np.ndarray, ref: np.ndarray) -> np.ndarray:
    """Pearson correlation of each image's pixels with `ref`'s (images (m, ...), ref (...)): (m,)."""
    a = images.reshape(len(images), -1).astype(np.float64)
    b = ref.reshape(-1).astype(np.float64)
    a = a - a.mean(1, keepdims=True)
    b = b - b.mean()
    den = np.linalg.norm(a, axis=1) * np.linalg.norm(b)
    return np.divide(a @ b, den, out=np.zeros(len(a)), where=den > 0)


def top_indices(scores: np.ndarray, top: int, sign: int = 1) -> np.ndarray:
    """(n, top): per row, the indices of the `top` largest (sign=1) or most negative (sign=-1) scores."""
    return np.argsort(-sign * scores, axis=1, kind="stable")[:, :top]


def formation(journey: Journey, scores: np.ndarray, train, top: int = 8) -> Formation:
    """Formation measures of a journey from its (n, N) scores and the training set (pixels of the proponents)."""
    idx = top_indices(scores, top)
    final = journey.final
    sim = np.array([pixel_correlation(train.tensors(row).numpy(), final).mean() for row in idx])
    last = set(idx[-1].tolist())
    overlap = np.array([len(last & set(row.tolist())) / top for row in idx])
    return Formation(journey.steps, journey.timesteps, journey.x0_distance(), sim, overlap, top)


def step_rankings(scores: np.ndarray, train, top: int = 5) -> list[dict]:
    """Per step: proponents and opponents ({index, label, score}), as in `score --json`."""
    out = []
    for row in scores:
        out.append({kind: [{"index": r.index, "label": r.class_name, "score": r.score}
                           for r in rank(row, train, top, sign)]
                    for kind, sign in (("proponents", 1), ("opponents", -1))})
    return out
