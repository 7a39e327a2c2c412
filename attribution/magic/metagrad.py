"""Metagradients: d f(theta_T(w)) / d w for every training example, by reverse mode through the whole run.

REPLAY: the forward run keeps some states (theta, m, v); the backward sweep walks the steps from last to first,
recomputes each step from its saved input state with the graph kept (create_graph: the step contains the loss
gradient, so its derivative needs second derivatives), and pulls the adjoint (a_theta, a_m, a_v) back through
it, adding each batch's contribution to d f / d w. Adam's moments are part of the state, so the adjoint flows
through them too.

Memory policies:
  "all"   keep every state: T+1 states, one replay of each step (fastest);
  "sqrt"  keep every ceil(sqrt(T))-th state; before sweeping a segment, replay it forward from its checkpoint:
          about 2 sqrt(T) states in memory, one extra forward pass over the run.
"auto" picks "all" when T+1 states fit in `memory_budget` bytes.
"""

from __future__ import annotations

import math
import resource
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..errors import ConfigError
from .weighted_train import State, WeightedRun

Objective = Callable[[torch.Tensor], torch.Tensor]   # theta -> scalar


@dataclass
class MetagradResult:
    grad: torch.Tensor        # (N,) d f / d w_i at w
    value: float              # f(theta_T(w))
    seconds: float
    seconds_forward: float
    stored_states: int        # most states held at once
    state_bytes: int          # bytes of those states
    peak_rss_bytes: int       # process peak resident memory (includes everything else in the process)
    policy: str


def _state_bytes(state: State) -> int:
    return sum(t.numel() * t.element_size() for t in state)


def metagradient(run: WeightedRun, objective: Objective, w: torch.Tensor | None = None, policy: str = "auto",
                 memory_budget: int = 512 * 2 ** 20, progress: Callable[[str, int, int], None] | None = None
                 ) -> MetagradResult:
    """Gradient of objective(theta_T) with respect to the example weights, at weights w (default ones)."""
    if policy not in ("auto", "all", "sqrt"):
        raise ConfigError(f"unknown checkpoint policy {policy!r}; use auto, all or sqrt")
    w = run.check_weights(w).detach()
    steps = run.config.steps
    start = time.perf_counter()
    state = run.initial_state()
    one = _state_bytes(state)
    if policy == "auto":
        policy = "all" if (steps + 1) * one <= memory_budget else "sqrt"
    every = 1 if policy == "all" else max(1, math.ceil(math.sqrt(steps)))
    saved: dict[int, State] = {0: state}
    for k in range(steps):
        state = run.step(state, w, k)
        if (k + 1) % every == 0 and k + 1 < steps:
            saved[k + 1] = state
        if progress:
            progress("forward", k + 1, steps)
    t_forward = time.perf_counter() - start

    theta_t = state[0].detach().requires_grad_(True)
    with torch.enable_grad():
        value = objective(theta_t)
        (a_theta,) = torch.autograd.grad(value, theta_t)
    a_m, a_v = torch.zeros_like(a_theta), torch.zeros_like(a_theta)
    grad_w = torch.zeros_like(w)
    most = len(saved)
    done = 0
    for seg_start in sorted(saved, reverse=True):
        seg_end = min(seg_start + every, steps)
        segment = {seg_start: saved[seg_start]}
        for k in range(seg_start, seg_end - 1):            # replay the segment forward (nothing to do for "all")
            segment[k + 1] = run.step(segment[k], w, k)
        most = max(most, len(saved) + len(segment) - 1)
        for k in range(seg_end - 1, seg_start - 1, -1):
            theta, m, v = (s.detach().requires_grad_(True) for s in segment.pop(k))
            wk = w.detach().clone().requires_grad_(True)
            with torch.enable_grad():
                new = run.step((theta, m, v), wk, k, create_graph=True)
                grads = torch.autograd.grad(new, (theta, m, v, wk), grad_outputs=(a_theta, a_m, a_v),
                                            allow_unused=True)
            a_theta, a_m, a_v = (g.detach() if g is not None else torch.zeros_like(a_theta) for g in grads[:3])
            if grads[3] is not None:
                grad_w += grads[3].detach()
            done += 1
            if progress:
                progress("backward", done, steps)
        del saved[seg_start]
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return MetagradResult(grad=grad_w, value=float(value.detach()), seconds=seconds, seconds_forward=t_forward,
                          stored_states=most, state_bytes=most * one, peak_rss_bytes=int(peak), policy=policy)
