"""EK-FAC on conv -> tanh -> linear, against quantities built here by brute force (issue 23).

A one-linear-layer model cannot tell a right output-side eigenbasis from a wrong one: its output gradients are the
sampled directions themselves, so S is a multiple of the identity (exactly, in "ggn" mode) and every basis is an
eigenbasis. Here a convolution (stride 1 and 2, zero padding) feeds a tanh and a linear output layer, so the
convolution's S has distinct eigenvalues and its eigenbasis matters. Built independently of the hooks, unfolding
and reshapes of `features.curvature`, in float64:

- the network's Jacobians by autograd of a functional re-implementation of the net (F.conv2d, tanh, F.linear);
- the output directions r of every copy: every output dimension e_j x sqrt(2/D) ("ggn"), or the copy's N(0, 2/D)
  draw from its (seed, key, copy) generator ("mc");
- the exact (or MC) GGN H = mean over copies of sum_r (J^T r)(J^T r)^T, from the Jacobians;
- A (inputs' second moment; the convolution's patches gathered by explicit loops over output positions, zero
  padding, the bias's 1) and S (output gradients' second moment, from the Jacobian of the output in the layer's
  pre-activation), their eigenbases Q_A, Q_S;
- EK-FAC's eigenvalues Lambda[a, b] = (q_S,a (x) q_A,b)^T H_ll (q_S,a (x) q_A,b): the diagonal of each layer's
  exact GGN block in its Kronecker eigenbasis; the preconditioner sum_l (Q_S (x) Q_A) diag(Lambda_l + lambda_l)
  (Q_S (x) Q_A)^T assembled as a dense matrix and solved against.

The influences q^T (H_EKFAC + lambda)^{-1} g from `EKFAC.whiten` must equal that solve, for both damping rules.
With the output-side eigenbasis transposed in `whiten` this is off by tens of percent (the test also checks that
its own tolerance would catch that).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from module_model import ModuleModel

from attribution.errors import ConfigError
from attribution.features.curvature import CurvatureSpec, copy_inputs, fit_ekfac
from attribution.features.gradients import GradientSpec, per_sample_gradients
from attribution.features.timesteps import noise_seed

SIDE, OUT_CH, KERNEL = 4, 3, 3
D = SIDE * SIDE  # one channel in and out


class _ConvNet(torch.nn.Module):
    def __init__(self, stride):
        super().__init__()
        self.conv = torch.nn.Conv2d(1, OUT_CH, KERNEL, stride=stride, padding=1)
        self.lin = torch.nn.Linear(OUT_CH * (SIDE // stride) ** 2, D)

    def forward(self, x, t, return_dict=False):
        return (self.lin(torch.tanh(self.conv(x)).flatten(1)).view_as(x),)


def _conv_model(stride):
    """A 'diffusion model' whose noise predictor is conv -> tanh -> linear on 4x4 one-channel images."""
    torch.manual_seed(stride)
    net = _ConvNet(stride)
    with torch.no_grad():  # large enough weights that tanh bends: the convolution's S is far from isotropic
        net.conv.weight.mul_(3.0)
    return ModuleModel(net, SIDE)


def _net(p, x, stride):
    """The same network, written out (float64)."""
    h = torch.tanh(F.conv2d(x, p["conv.weight"], p["conv.bias"], stride=stride, padding=1))
    return F.linear(h.flatten(1), p["lin.weight"], p["lin.bias"])


def _patches(x, stride):
    """Rows [patch, 1] of every output position of the convolution, by explicit loops: (copies x positions, 10)."""
    pad = torch.zeros(x.shape[0], 1, SIDE + 2, SIDE + 2, dtype=x.dtype)
    pad[:, :, 1:-1, 1:-1] = x
    rows = []
    for c in range(x.shape[0]):
        for i in range(0, SIDE, stride):
            for j in range(0, SIDE, stride):
                patch = pad[c, 0, i:i + KERNEL, j:j + KERNEL].reshape(-1)
                rows.append(torch.cat([patch, torch.ones(1, dtype=x.dtype)]))
    return torch.stack(rows)


def _directions(spec, keys, n_copies):
    """The output directions of each copy (copies, R, D): every sqrt(2/D) e_j, or the copy's own N(0, 2/D) draw."""
    scale = (2.0 / D) ** 0.5
    if spec.fisher == "ggn":
        return (torch.eye(D, dtype=torch.float64) * scale).expand(n_copies, D, D)
    rows = []
    gen = torch.Generator()
    for key in keys:
        for j in range(spec.samples):
            gen.manual_seed(noise_seed(spec.seed, f"curvature-r/{key}", j))
            rows.append(torch.randn((1, SIDE, SIDE), generator=gen).reshape(1, D).double() * scale)
    return torch.stack(rows)


def _brute_force_ekfac(model, stride, x0, keys, spec, transpose_conv_qs=False):
    """Per tracked layer: (parameter indices (out, in + 1) in the flat gradient, Kronecker eigenbasis U, Lambda).
    `transpose_conv_qs`: the convolution's output-side basis transposed (the error the test must catch)."""
    x_t = copy_inputs(model, x0, keys, spec)[0]  # the copies' noisy inputs (the network ignores t)
    x = x_t.double()
    p = {k: v.double() for k, v in model.parameters().items()}
    names, sizes = list(p), [v.numel() for v in p.values()]
    starts = dict(zip(names, np.cumsum([0] + sizes[:-1])))
    n_copies = len(x)
    R = _directions(spec, keys, n_copies)  # (copies, R, D)

    # the exact Jacobian of every output in every parameter (copies, D, P), and H = mean_c sum_r (J^T r)(J^T r)^T
    jac = torch.autograd.functional.jacobian(lambda *flat: _net(dict(zip(names, flat)), x, stride),
                                             tuple(p.values()))
    J = torch.cat([j.reshape(n_copies, D, -1) for j in jac], 2)
    V = torch.einsum("crd,cdp->crp", R, J).reshape(-1, J.shape[2])  # pseudo-gradients J^T r
    H = V.T @ V / n_copies

    # A and S of the convolution: explicit patches; output gradients through d out / d (pre-activation)
    s = F.conv2d(x, p["conv.weight"], p["conv.bias"], stride=stride, padding=1)  # (copies, OUT_CH, h, w)
    Js = torch.autograd.functional.jacobian(  # (copies, D, copies, OUT_CH, h, w)
        lambda s_: F.linear(torch.tanh(s_).flatten(1), p["lin.weight"], p["lin.bias"]), s)
    Js = torch.stack([Js[c, :, c] for c in range(n_copies)]).flatten(3)  # (copies, D, OUT_CH, positions)
    g_conv = torch.einsum("crd,cdop->crpo", R, Js).reshape(-1, OUT_CH)
    a_conv = _patches(x, stride)
    # the linear layer: its inputs are tanh(s) flattened (and 1); its output gradients are the directions themselves
    a_lin = torch.cat([torch.tanh(s).flatten(1), torch.ones(n_copies, 1, dtype=x.dtype)], 1)
    g_lin = R.reshape(-1, D)

    layers = []
    for prefix, a, g in (("conv", a_conv, g_conv), ("lin", a_lin, g_lin)):
        w = p[f"{prefix}.weight"]
        out_dim, in_dim = w.shape[0], w[0].numel()
        idx = np.empty((out_dim, in_dim + 1), dtype=np.int64)
        idx[:, :in_dim] = starts[f"{prefix}.weight"] + np.arange(out_dim * in_dim).reshape(out_dim, in_dim)
        idx[:, in_dim] = starts[f"{prefix}.bias"] + np.arange(out_dim)
        qa = torch.linalg.eigh(a.T @ a)[1]
        qs = torch.linalg.eigh(g.T @ g)[1]
        if transpose_conv_qs and prefix == "conv":
            qs = qs.T
        U = torch.kron(qs.contiguous(), qa.contiguous())  # column a*(in+1)+b: vec of q_S,a q_A,b^T, row-major like idx
        flat = torch.from_numpy(idx.reshape(-1))
        lam = torch.einsum("pk,pq,qk->k", U, H[flat][:, flat], U)  # the exact block's diagonal in the eigenbasis
        layers.append((flat, U, lam))
    return layers


def _expected_influence(layers, q, g, damping, rule):
    """q^T (H_EKFAC + lambda)^{-1} g per tracked layer (EK-FAC is block-diagonal: the influence is their sum), each
    layer's block U diag(Lambda + lambda_l) U^T assembled densely and solved against."""
    mean_all = torch.cat([lam for _, _, lam in layers]).mean()
    out = []
    for flat, U, lam in layers:
        damp = damping * (lam.mean() if rule == "module" else mean_all)
        block = U @ torch.diag(lam + damp) @ U.T
        out.append((q[:, flat] @ torch.linalg.solve(block, g[:, flat].T)).numpy())
    return out


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("fisher", ["ggn", "mc"])
def test_ekfac_matches_brute_force_on_conv_tanh_linear(stride, fisher):
    model = _conv_model(stride)
    rng = np.random.default_rng(stride)
    n = 8  # 64 copies: more than the linear layer's 49 inputs, so A has no null space to rotate freely
    x0 = torch.from_numpy(rng.uniform(-1, 1, (n, 1, SIDE, SIDE)).astype(np.float32))
    keys = [f"train/{i}" for i in range(n)]
    spec = CurvatureSpec(samples=8, fisher=fisher)
    ekfac = fit_ekfac(model, lambda rows: x0[rows], keys, spec, batch_size=4)
    layers = _brute_force_ekfac(model, stride, x0, keys, spec)

    # the fitted eigenvalues are the brute-force ones (their bases agree up to sign where eigenvalues are distinct)
    # (ggn: the linear layer's S is (2/D) I, so any output basis is an eigenbasis, and Lambda does not depend on it)
    for (_, _, lam), fitted in zip(layers, ekfac.eigenvalues):
        np.testing.assert_allclose(fitted.reshape(-1).numpy(), lam.numpy(), rtol=1e-3, atol=1e-6 * float(lam.max()))

    gspec = GradientSpec("simple", (0, 10, 25, 49))
    g = per_sample_gradients(model, x0, keys, gspec).double()
    q = per_sample_gradients(model, -x0.flip(0), [f"val/{i}" for i in range(n)], gspec).double()
    wrong_basis = _brute_force_ekfac(model, stride, x0, keys, spec, transpose_conv_qs=True)
    sizes = [len(flat) for flat, _, _ in layers]
    for rule in ("global", "module"):
        for damping in (0.01, 0.1, 1.0):
            expected = _expected_influence(layers, q, g, damping, rule)
            wq, wg = ekfac.whiten(q, damping, rule).double(), ekfac.whiten(g, damping, rule).double()
            got = [(a @ b.T).numpy() for a, b in zip(wq.split(sizes, 1), wg.split(sizes, 1))]  # per layer
            # float32 statistics and whitened features (relative ~1e-6) through a condition number ~1/damping:
            # |got - expected| <= 1e-3 |expected| + 1e-4 max|expected|, per layer and in total
            for got_l, expected_l in zip(got, expected):
                np.testing.assert_allclose(got_l, expected_l, rtol=1e-3, atol=1e-4 * np.abs(expected_l).max())
            np.testing.assert_allclose(sum(got), sum(expected), rtol=1e-3, atol=1e-4 * np.abs(sum(expected)).max())
            # with its output basis transposed the convolution's part would be off by >= 10x that tolerance
            wrong = _expected_influence(wrong_basis, q, g, damping, rule)[0]
            assert np.abs(wrong - expected[0]).max() > 10 * 1.1e-3 * np.abs(expected[0]).max()
    # a layer without curvature cannot be damped by its own mean eigenvalue: one line, not NaN features
    ekfac.eigenvalues[0] = torch.zeros_like(ekfac.eigenvalues[0])
    with pytest.raises(ConfigError, match="conv has no curvature") as exc:
        ekfac.whiten(g, 0.1, "module")
    assert "\n" not in str(exc.value)
