"""EK-FAC curvature of the diffusion training loss, and the whitened gradients influence functions score with.

The influence of a training image x_n on a measurement m of a target is (Koh & Liang 2017; for diffusion models
Mlodozeniec et al., ICLR 2025, "DInf")

    tau_n = grad m(target)^T (H + lambda I)^{-1} grad L(x_n),

H the Gauss-Newton matrix (GGN) of the training loss. Here H is approximated by EK-FAC (George et al. 2018;
Grosse et al. 2023), layer by layer over the UNet's `nn.Linear` and `nn.Conv2d` layers (weight and bias as one
(out, in + 1) matrix):

- K-FAC: H_l ~ A_l (x) S_l, A_l the second moment of the layer's inputs (for a convolution: its unfolded
  patches, per position) and S_l that of the output gradients, over every training image's `samples` noisy copies
  (a timestep drawn uniformly from [0, T) and a noise draw each, as DInf draws them per example);
- the eigenvalue correction: with A_l = Q_A diag Q_A^T and S_l = Q_S diag Q_S^T, Lambda_l = the mean over copies
  of (Q_S^T G_c Q_A)^2, G_c a copy's gradient of the layer's weight matrix. Lambda is what EK-FAC keeps: the
  diagonal of H in the Kronecker eigenbasis;
- output gradients: "mc" draws one r ~ N(0, (2/D) I) per copy and backpropagates r through the network (the
  Monte Carlo Fisher, equal to the GGN of the MSE loss in expectation: the MSE's Hessian in the output is (2/D) I);
  "ggn" backpropagates every output dimension (the exact GGN; D backward passes per copy: tiny models only).

For a single linear layer K-FAC is exact (the GGN of the MSE is A (x) (2/D) I), and so is EK-FAC: a test checks
the influence against the explicit inverse. That test cannot see the output-side eigenbasis (there S is a multiple
of the identity, so every basis is an eigenbasis); `tests/methods/test_ekfac_conv.py` checks a conv -> tanh -> linear
network (stride 1 and 2, "ggn" and "mc") against its GGN, A, S and Kronecker eigenbases built by brute force.

Influence as a dot product: with H = Q diag(Lambda) Q^T and the damping lambda,

    tau_n = <D^{-1/2} Q^T g_target, D^{-1/2} Q^T g_n>,    D = Lambda + lambda,

so `whiten` maps a flat gradient to D^{-1/2} Q^T g (the gradient in the eigenbasis, divided by the square root of
the damped eigenvalue), and whitened gradients are projected, cached and scored like any other features (the
projection preserves dot products in expectation). Self-influence is the whitened gradient's squared norm.

Damping rules (`DAMPING_RULES`; `damping` is 0.1 by default, the same factor as the kernel's default lambda here):

- "global" (the default): one lambda for every tracked layer, `damping` x the mean of all the eigenvalues of all
  tracked layers (every entry of every Lambda_l counts once, so the layers with the most parameters dominate it).
  As damping grows the scores tend to the plain gradient dot product over the tracked parameters divided by lambda.
- "module": kronfluence's heuristic (its `damping_factor=None`: `FactorConfig.prepare` adds
  0.1 x torch.mean(lambda_matrix) to each module's own eigenvalues, `kronfluence/factor/config.py`): per layer,
  lambda_l = `damping` x the mean of that layer's Lambda_l. Layers with small curvature get a small damping.

The damping enters only `whiten`: the fitted factors (Q_A, Q_S, Lambda) are cached without it, so another damping
or rule re-whitens the gradients but never refits the curvature.

Layers outside Linear/Conv2d (GroupNorm, LayerNorm, embeddings) and grouped or non-zero-padded convolutions are
not tracked: their parameters are left out of the features, and `Layout.skipped` names them.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import ConfigError
from ..models.adapter import DiffusionModel
from ..store import CurvatureStore
from .gradients import GradientFeatures
from .timesteps import noise_seed

FISHER = ("mc", "ggn")
DAMPING_RULES = ("global", "module")
DEFAULT_DAMPING = 0.1  # x the mean eigenvalue (of all tracked layers, or of each layer under the "module" rule)
DEFAULT_SAMPLES = 2  # noisy copies per training image for the factors


@dataclass(frozen=True)
class CurvatureSpec:
    """How the curvature is estimated.

    Attributes:
        samples: noisy copies per training image (each a uniform timestep and a noise draw). DInf uses 125 x 2 on
            a GPU; 2 by default here, for CPUs (3,236 copies on the digits set: the factors are means over all of
            them, and the eigenbasis of a few-hundred-dimensional covariance needs far fewer).
        fisher: "mc" (one sampled output gradient per copy) or "ggn" (every output dimension: exact, slow).
        seed: seed of the copies' timesteps, noise and sampled output gradients.
        params: comma-separated parameter-name prefixes (None: the model's trainable parameters).
    """

    samples: int = DEFAULT_SAMPLES
    fisher: str = "mc"
    seed: int = 0
    params: str | None = None

    def __post_init__(self):
        if self.samples < 1:
            raise ConfigError(f"curvature samples per image must be positive, got {self.samples}")
        if self.fisher not in FISHER:
            raise ConfigError(f"unknown curvature {self.fisher!r}; use one of: {', '.join(FISHER)}")

    def to_dict(self) -> dict:
        return {"kind": "ekfac", "samples": self.samples, "fisher": self.fisher, "seed": self.seed,
                "params": self.params}


def check_damping(damping: float, rule: str = "global") -> None:
    """The one check of an EK-FAC damping: a positive, finite multiple of the mean EK-FAC eigenvalue, under one of
    the `DAMPING_RULES`."""
    if not (damping > 0 and np.isfinite(damping)):
        raise ConfigError(f"EK-FAC damping must be a positive number (a multiple of the mean EK-FAC eigenvalue), "
                          f"got {damping}")
    if rule not in DAMPING_RULES:
        raise ConfigError(f"unknown EK-FAC damping rule {rule!r}; use one of: {', '.join(DAMPING_RULES)}")


@dataclass
class Layer:
    """One tracked layer: its module, parameter names and matrix shape (out, in incl. the bias column)."""

    name: str
    module: torch.nn.Module
    weight: str
    bias: str | None
    out_dim: int
    in_dim: int

    @property
    def size(self) -> int:
        return self.out_dim * self.in_dim


@dataclass
class Layout:
    """Which parameters EK-FAC tracks, where each sits in a flat gradient (`gradients.per_sample_gradients`
    order), and what it leaves out."""

    layers: list[Layer]
    offsets: dict[str, tuple[int, int]]  # parameter name -> (start, numel) in the flat gradient
    skipped: list[str]  # "name (Type)" of parameters' modules that are not tracked

    @property
    def dim(self) -> int:
        return sum(layer.size for layer in self.layers)

    def describe(self) -> dict:
        return {"layers": len(self.layers), "dim": self.dim, "skipped": self.skipped}


def layout(model: DiffusionModel, params: str | None = None) -> Layout:
    """The tracked layers among the parameters that get gradients (all trainable ones, or a named subset)."""
    chosen = model.parameters(params)
    offsets, start = {}, 0
    for name, p in chosen.items():
        offsets[name] = (start, p.numel())
        start += p.numel()
    layers, covered, skipped = [], set(), []
    for mname, m in model.module.named_modules():
        wname, bname = f"{mname}.weight", f"{mname}.bias"
        if wname not in chosen:
            continue
        if isinstance(m, torch.nn.Conv2d) and (m.groups != 1 or m.padding_mode != "zeros"
                                               or isinstance(m.padding, str)):
            continue  # reported below as untracked
        if not isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)):
            continue
        has_bias = m.bias is not None and bname in chosen
        w = chosen[wname]
        layers.append(Layer(mname, m, wname, bname if has_bias else None, w.shape[0],
                            int(np.prod(w.shape[1:])) + int(has_bias)))
        covered.update({wname, bname} if has_bias else {wname})
    modules = dict(model.module.named_modules())
    for name in chosen:
        if name not in covered:
            owner = name.rsplit(".", 1)[0]
            kind = type(modules.get(owner)).__name__ if owner in modules else "?"
            entry = f"{owner} ({kind})"
            if entry not in skipped:
                skipped.append(entry)
    if not layers:
        raise ConfigError("EK-FAC tracks nn.Linear and nn.Conv2d layers and the chosen parameters have none "
                          f"(untracked: {', '.join(skipped[:4])})")
    return Layout(layers, offsets, skipped)


def copy_inputs(model: DiffusionModel, x0: torch.Tensor, keys: list[str], spec: CurvatureSpec):
    """The noisy copies the curvature is estimated on: (x_t, t, cond, owner), `spec.samples` per image, each with
    a timestep uniform in [0, T) and a standard normal noise, both a pure function of (seed, key, copy)."""
    z0 = model.encode(x0.to(model.device))
    c = spec.samples
    ts, noise = [], []
    gen = torch.Generator()
    for key in keys:
        for j in range(c):
            seed = noise_seed(spec.seed, f"curvature/{key}", j)
            gen.manual_seed(seed)
            ts.append(int(torch.randint(model.num_timesteps, (1,), generator=gen)))
            noise.append(torch.randn(tuple(z0.shape[1:]), generator=gen))
    t = torch.tensor(ts, dtype=torch.long, device=model.device)
    eps = torch.stack(noise).to(model.device)
    owner = torch.arange(len(keys), device=model.device).repeat_interleave(c)
    x_t = model.schedule.add_noise(z0[owner], eps, t)
    cond = model.condition(keys)
    return x_t, t, model.condition_rows(cond, owner), owner


class _Hooks:
    """Forward hooks that keep each tracked layer's inputs (as (B, positions, in) rows; the bias's ones column is
    added by the consumers, in the small matrices) and tensor hooks that keep its output gradients
    ((B, positions, out))."""

    def __init__(self, layers: list[Layer]):
        self.layers = layers
        self.acts: dict[str, list[torch.Tensor]] = {}
        self.grads: dict[str, list[torch.Tensor]] = {}
        self.handles = []

    def __enter__(self):
        for layer in self.layers:
            self.handles.append(layer.module.register_forward_hook(self._forward(layer)))
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()
        self.handles.clear()

    def clear_grads(self):
        self.grads = {}

    def _forward(self, layer: Layer):
        def hook(module, inputs, output):
            x = inputs[0].detach()
            if isinstance(module, torch.nn.Conv2d):
                a = F.unfold(x, module.kernel_size, module.dilation, module.padding, module.stride).transpose(1, 2)
            else:
                a = x.reshape(x.shape[0], -1, x.shape[-1])
            self.acts.setdefault(layer.name, []).append(a)
            if output.requires_grad:
                output.register_hook(lambda g: self.grads.setdefault(layer.name, []).append(
                    g.detach().flatten(2).transpose(1, 2) if g.dim() == 4 else g.detach().reshape(
                        g.shape[0], -1, g.shape[-1])))
        return hook

    def pairs(self, layer: Layer):
        """(activations, output gradients) of each call of the layer (gradients arrive in reverse call order)."""
        return zip(self.acts.get(layer.name, []), reversed(self.grads.get(layer.name, [])))


def _output_gradients(out: torch.Tensor, spec: CurvatureSpec, keys: list[str]):
    """The output gradients r backpropagated per copy: one N(0, 2/D) draw per copy, a pure function of (seed,
    key, copy) ("mc"), or sqrt(2/D) e_j for every output dimension j ("ggn")."""
    d = out[0].numel()
    scale = (2.0 / d) ** 0.5
    if spec.fisher == "mc":
        gen = torch.Generator()
        rows = []
        for key in keys:
            for j in range(spec.samples):
                gen.manual_seed(noise_seed(spec.seed, f"curvature-r/{key}", j))
                rows.append(torch.randn(tuple(out.shape[1:]), generator=gen))
        yield torch.stack(rows).to(out.device, out.dtype) * scale
        return
    for j in range(d):
        r = torch.zeros(d, device=out.device, dtype=out.dtype)
        r[j] = scale
        yield r.reshape(out[0].shape).expand_as(out)


def _second_moment(a: torch.Tensor, bias: bool) -> np.ndarray:
    """sum over rows of [a, 1] [a, 1]^T for rows a (n, in): (in + bias, in + bias) float64."""
    m = (a.T @ a).double()
    if not bias:
        return m.cpu().numpy()
    col = a.sum(0).double()
    top = torch.cat([m, col[:, None]], 1)
    bottom = torch.cat([col, torch.tensor([float(len(a))], dtype=torch.float64, device=a.device)])[None]
    return torch.cat([top, bottom], 0).cpu().numpy()


def _copy_gradient(a: torch.Tensor, g: torch.Tensor, bias: bool) -> torch.Tensor:
    """Each copy's gradient of the layer's (out, in [+ 1]) matrix from its inputs a (B, P, in) and output gradients
    g (B, P, out): sum over positions of g a^T (and of g for the bias column)."""
    grad = torch.einsum("bpo,bpi->boi", g, a)
    return torch.cat([grad, g.sum(1)[..., None]], 2) if bias else grad


@dataclass
class EKFAC:
    """Fitted EK-FAC factors: per tracked layer Q_A (in, in), Q_S (out, out), Lambda (out, in), all float64."""

    layout: Layout
    QA: list[torch.Tensor]
    QS: list[torch.Tensor]
    eigenvalues: list[torch.Tensor]

    def mean_eigenvalue(self) -> float:
        total = sum(float(lam.sum()) for lam in self.eigenvalues)
        return total / sum(lam.numel() for lam in self.eigenvalues)

    def damping_values(self, damping: float, rule: str = "global") -> list[float]:
        """lambda_l of each tracked layer: damping x the mean eigenvalue over every tracked layer ("global", the
        same for all) or over the layer's own eigenvalues ("module", kronfluence's heuristic)."""
        check_damping(damping, rule)
        if rule == "module":
            lams = [damping * float(lam.mean()) for lam in self.eigenvalues]
            flat = [layer.name for layer, lam in zip(self.layout.layers, lams) if not lam > 0]
            if flat:  # no curvature at all: damping x 0 would divide its gradients by zero
                raise ConfigError(f"EK-FAC layer {flat[0]} has no curvature (all its eigenvalues are 0), so the "
                                  "module damping rule gives it no damping; use --damping-rule global")
            return lams
        return [damping * self.mean_eigenvalue()] * len(self.eigenvalues)

    def whiten(self, g: torch.Tensor, damping: float, rule: str = "global") -> torch.Tensor:
        """D^{-1/2} Q^T g for flat gradients g (B, P) (`per_sample_gradients` order): (B, layout.dim) float32."""
        lams = self.damping_values(damping, rule)
        g = g.double()
        out = []
        for layer, qa, qs, ev, lam in zip(self.layout.layers, self.QA, self.QS, self.eigenvalues, lams):
            s, n = self.layout.offsets[layer.weight]
            mat = g[:, s:s + n].reshape(len(g), layer.out_dim, -1)
            if layer.bias is not None:
                s, n = self.layout.offsets[layer.bias]
                mat = torch.cat([mat, g[:, s:s + n].reshape(len(g), layer.out_dim, 1)], 2)
            qa, qs, ev = qa.to(g.device), qs.to(g.device), ev.to(g.device)
            rot = qs.T @ mat @ qa
            out.append((rot / (ev + lam).sqrt()).reshape(len(g), -1))
        return torch.cat(out, 1).float()

    def arrays(self) -> dict[str, np.ndarray]:
        out = {}
        for i, (qa, qs, ev) in enumerate(zip(self.QA, self.QS, self.eigenvalues)):
            out[f"QA_{i}"], out[f"QS_{i}"], out[f"L_{i}"] = qa.numpy(), qs.numpy(), ev.numpy()
        return out

    @classmethod
    def from_arrays(cls, lay: Layout, arrays: dict[str, np.ndarray]) -> EKFAC:
        n = len(lay.layers)
        return cls(lay, [torch.from_numpy(arrays[f"QA_{i}"]) for i in range(n)],
                   [torch.from_numpy(arrays[f"QS_{i}"]) for i in range(n)],
                   [torch.from_numpy(arrays[f"L_{i}"]) for i in range(n)])


def fit_ekfac(model: DiffusionModel, images: Callable[[np.ndarray], torch.Tensor], keys: list[str],
              spec: CurvatureSpec, batch_size: int = 8, state: dict | None = None,
              save: Callable[[dict], None] | None = None, progress: Callable[[int, int, str], None] | None = None,
              save_every: float = 30.0) -> EKFAC:
    """Fit EK-FAC on the training images (`images(rows)` returns rows of the training set in [-1, 1]; `keys` their
    noise keys), in two passes: the K-FAC covariances, then the eigenvalue correction in their eigenbasis.

    Resumable: `state` is what `save` was last handed (partial sums and the rows done in each pass; `save` is called
    at most every `save_every` seconds and at the end of each pass), so a killed fit continues where it stopped.
    """
    lay = layout(model, spec.params)
    n = len(keys)
    state = dict(state or {})
    stage = state.get("stage", "covariance")
    params = {k: v.detach().clone().requires_grad_(True) for k, v in model.parameters(spec.params).items()}
    weights = [params[layer.weight] for layer in lay.layers]
    last = time.perf_counter()

    def run_pass(name: str, step):
        nonlocal last
        done = int(state.get(f"{name}_rows", 0))
        for s in range(done, n, batch_size):
            rows = np.arange(s, min(n, s + batch_size))
            step(rows)
            state[f"{name}_rows"] = int(rows[-1] + 1)
            if progress:
                progress(int(rows[-1] + 1), n, f"EK-FAC {name}")
            if save and time.perf_counter() - last > save_every:
                save(state)
                last = time.perf_counter()

    def forward_backward(rows, on_batch):
        batch_keys = [keys[i] for i in rows]
        x_t, t, cond, _ = copy_inputs(model, images(rows), batch_keys, spec)
        with _Hooks(lay.layers) as hooks:
            out = model.raw(params, x_t, t, cond)
            first = True
            for r in _output_gradients(out, spec, batch_keys):
                hooks.clear_grads()
                torch.autograd.grad((out * r).sum(), weights, retain_graph=True)
                on_batch(hooks, first)
                first = False

    if stage == "covariance":
        for i, layer in enumerate(lay.layers):
            state.setdefault(f"A_{i}", np.zeros((layer.in_dim, layer.in_dim)))
            state.setdefault(f"S_{i}", np.zeros((layer.out_dim, layer.out_dim)))

        def covariances(hooks, first):
            for i, layer in enumerate(lay.layers):
                for a, g in hooks.pairs(layer):
                    # float32 products (relative error ~1e-6, far below the sampling noise), summed in float64
                    if first:
                        state[f"A_{i}"] += _second_moment(a.reshape(-1, a.shape[-1]), layer.bias is not None)
                    g = g.reshape(-1, g.shape[-1])
                    state[f"S_{i}"] += (g.T @ g).double().cpu().numpy()

        run_pass("covariance", lambda rows: forward_backward(rows, covariances))
        for i in range(len(lay.layers)):
            _, qa = torch.linalg.eigh(torch.from_numpy(state.pop(f"A_{i}")))
            _, qs = torch.linalg.eigh(torch.from_numpy(state.pop(f"S_{i}")))
            state[f"QA_{i}"], state[f"QS_{i}"] = qa.numpy(), qs.numpy()
            state[f"L_{i}"] = np.zeros((lay.layers[i].out_dim, lay.layers[i].in_dim))
        state["stage"] = "eigenvalues"
        if save:
            save(state)
            last = time.perf_counter()
    QA = [torch.from_numpy(state[f"QA_{i}"]) for i in range(len(lay.layers))]
    QS = [torch.from_numpy(state[f"QS_{i}"]) for i in range(len(lay.layers))]

    QA32, QS32 = [q.float() for q in QA], [q.float() for q in QS]

    def eigenvalues(hooks, first):
        for i, layer in enumerate(lay.layers):
            grad = sum(_copy_gradient(a, g, layer.bias is not None) for a, g in hooks.pairs(layer))
            rot = QS32[i].to(grad.device).T @ grad @ QA32[i].to(grad.device)
            state[f"L_{i}"] += (rot.double() ** 2).sum(0).cpu().numpy()

    run_pass("eigenvalues", lambda rows: forward_backward(rows, eigenvalues))
    copies = n * spec.samples
    return EKFAC(lay, QA, QS, [torch.from_numpy(state[f"L_{i}"] / copies) for i in range(len(lay.layers))])


def effective_damping(cfg) -> float:
    """The EK-FAC damping factor a feature configuration uses: its `damping`, else `DEFAULT_DAMPING`."""
    return DEFAULT_DAMPING if cfg.damping is None else float(cfg.damping)


def effective_damping_rule(cfg) -> str:
    """The EK-FAC damping rule a feature configuration uses: its `damping_rule`, else "global"."""
    return cfg.damping_rule or "global"


class WhitenedGradients(GradientFeatures):
    """The feature kind of influence functions: gradient features whitened by the EK-FAC curvature of the training
    loss before the projection (`EKFAC.whiten`), so their dot products are influence scores. The factors are fitted
    once per checkpoint and training set (cached under cache/curvature/ without the damping, resumable), before
    the first training row."""

    kind = "ekfac"
    description = "EK-FAC-whitened gradient features"
    options = ("damping", "damping_rule", "curvature_samples")
    refusal = "applies to the influence-function (EK-FAC) methods only: use --method ekfac or ekfac-elbo"
    option_groups = frozenset({"gradients", "curvature"})

    @classmethod
    def curvature_spec(cls, cfg) -> CurvatureSpec:
        """How the factors are estimated (their copies per image, seed and parameters)."""
        samples = {} if cfg.curvature_samples is None else {"samples": cfg.curvature_samples}
        return CurvatureSpec(seed=cfg.seed, params=cfg.params, **samples)

    @classmethod
    def validate(cls, cfg) -> None:
        check_damping(effective_damping(cfg), effective_damping_rule(cfg))
        cls.curvature_spec(cfg)  # the copies per image

    @classmethod
    def config_dict(cls, cfg) -> dict:
        d = {**super().config_dict(cfg), "curvature": cls.kind, "damping": effective_damping(cfg)}
        if effective_damping_rule(cfg) != "global":  # absent when global: caches made before the option stay valid
            d["damping_rule"] = effective_damping_rule(cfg)
        return d  # the copies per image are in the identity's "curvature" entry (`CurvatureSpec.to_dict`)

    @classmethod
    def slug_infix(cls, cfg) -> str:
        rule = "m" if effective_damping_rule(cfg) == "module" else ""
        samples = cls.curvature_spec(cfg).samples
        copies = "" if samples == DEFAULT_SAMPLES else f"c{samples}"
        return f"-{cls.kind}{effective_damping(cfg):g}{rule}{copies}"

    @classmethod
    def cost_parts(cls, cfg) -> list[str]:
        return [cls.kind]

    def __init__(self, model, train, cfg, cache_dir, batch_size=16):
        self.spec = self.curvature_spec(cfg)
        super().__init__(model, train, cfg, cache_dir, batch_size)
        self._ekfac = None

    def gradient_dim(self) -> int:
        return layout(self.model, self.cfg.params).dim  # the tracked layers' dimension

    def identity(self) -> dict:
        return {**super().identity(), "curvature": self.spec.to_dict()}

    def prepare(self, progress=None) -> None:
        self.ekfac(progress)

    def transform(self, g: torch.Tensor) -> torch.Tensor:
        return self.ekfac().whiten(g, effective_damping(self.cfg), effective_damping_rule(self.cfg))

    def ekfac(self, progress=None) -> EKFAC:
        """The EK-FAC factors of this checkpoint's training loss on the training set (fitted once, cached under
        cache/curvature/, resumable)."""
        if self._ekfac is None:
            lay = layout(self.model, self.cfg.params)
            identity = {"checkpoint": self.model.identity(), "dataset": self.train.spec,
                        "dataset_hash": self.train.content_hash, "split": self.train.split, "n": len(self.train),
                        "curvature": self.spec.to_dict(), "tracked": lay.describe()}
            spec = self.spec
            store = CurvatureStore.open(identity, f"ekfac-{spec.fisher}-c{spec.samples}-s{spec.seed}",
                                        self.cache_dir)
            arrays = store.load_factors()
            if arrays is None:
                with store.exclusive():  # one fit per folder; the others wait and load it
                    arrays = store.load_factors()
                    if arrays is None:
                        keys = self.train_keys(range(len(self.train)))
                        fitted = fit_ekfac(self.model, self.train.tensors, keys, spec, self.batch_size,
                                           store.load_partial(), store.save_partial, progress)
                        arrays = fitted.arrays()
                        store.save_factors(arrays)
            self._ekfac = EKFAC.from_arrays(lay, arrays)
        return self._ekfac
