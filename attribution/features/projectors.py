"""Random projections of per-sample gradients, from P dimensions down to k.

Scaling convention (stored with every feature set): features are scaled so that inner products are preserved in
expectation, E <Pg, Pg'> = <g, g'>. A Gaussian JL matrix with N(0, 1) entries is therefore divided by sqrt(k)
(D-TRAK and traker's fast_jl apply no such factor: multiply our lambda by k to compare with theirs). The identity
"projection" keeps gradients exact, so projected and exact scores live on one lambda scale.

| name | what | where it fits |
|---|---|---|
| `identity` | no projection (k = P) | small models, exactness checks |
| `sjlt` | ours: sparse JL (count-sketch, s non-zeros +-1/sqrt(s) per coordinate) | any device; the CPU default |
| `grass` | random mask of m = 8k coordinates, scaled by sqrt(P/m), then `sjlt` (GraSS, 2025) | large P |
| `gaussian` | traker's `BasicProjector` (dense N(0,1) blocks regenerated per call), on the CPU | the paper's; slow |
| `trak-cuda` | traker's `CudaProjector` (fast_jl kernel) | GPUs with fast_jl installed; the GPU default then |

`sjlt` costs O(P s) per sample and O(P s) memory for its hash (block construction); `grass` O(m s) after a gather
of m coordinates, with O(m s) memory; `gaussian` costs O(P k). Both `sjlt` and `grass` keep inner products unbiased
(the mask's scaling makes E<Mg, Mg'> = <g, g'> over the random mask); `grass` adds the mask's variance, which grows
with how unevenly a gradient's energy is spread over its coordinates. On the 0.65M-parameter digits model that
variance dominates: at k = 2048 `grass` keeps 63% of an image's exact top-5 gradient neighbours, `sjlt` 86%
(BENCHMARKS.md, "What the mask costs in fidelity"), so `grass` is for models whose sketch cost dominates.

What the matrix depends on (`matrix_identity`, part of a feature store's identity): `sjlt` and `gaussian` draw it
from a CPU generator, so it depends on (projector, k, seed) only, whatever device the model is on. fast_jl's matrix
also depends on the GPU (its kernel's layout follows the number of SMs), so `trak-cuda` stores record the device
kind and SM count, and a store made on another GPU is refused rather than mixed with targets projected here.
fast_jl needs k to be a multiple of 512, projects at most `FAST_JL_MAX_CHUNK` coordinates per call (larger
gradients go through traker's `ChunkedCudaProjector`) and works in fp16 (gradients are scaled by a power of two
per row before projecting, and the scale undone after, so unit-normalised gradients do not underflow).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod

import torch

from ..errors import ConfigError

PROJECTORS = ("sjlt", "gaussian", "trak-cuda", "identity", "grass")
GRASS_MASK_FACTOR = 8  # m = 8k kept coordinates (at most P): GraSS's sparsification before the sketch
SCALING = "inner products preserved in expectation: E<Pg,Pg'> = <g,g'> (Gaussian JL divided by sqrt(k))"


class Projector(ABC):
    name: str

    def __init__(self, grad_dim: int, proj_dim: int, seed: int, device: torch.device):
        self.grad_dim, self.proj_dim, self.seed, self.device = grad_dim, proj_dim, seed, device

    @abstractmethod
    def project(self, grads: torch.Tensor) -> torch.Tensor:
        """(B, P) -> (B, k) float32."""

    def describe(self) -> dict:
        return {"projector": self.name, "proj_dim": self.proj_dim, "seed": self.seed, "scaling": SCALING}


class IdentityProjector(Projector):
    name = "identity"

    def __init__(self, grad_dim: int, proj_dim: int, seed: int, device: torch.device):
        super().__init__(grad_dim, grad_dim, seed, device)

    def project(self, grads):
        return grads.float()


class SparseJLProjector(Projector):
    """Sparse JL (Kane & Nelson's block construction): each input coordinate is hashed to one bucket in each of
    s blocks of k/s buckets, with a random sign, scaled by 1/sqrt(s). s = 1 is the count-sketch.

    Exact-zero bucket collisions between blocks are impossible, and <Pg, Pg'> is an unbiased estimate of <g, g'>.
    Hashes are generated once from `seed` with a CPU generator (device independent) and applied chunk by chunk,
    so peak extra memory is bounded by `chunk` coordinates.
    """

    name = "sjlt"

    def __init__(self, grad_dim: int, proj_dim: int, seed: int, device: torch.device, sparsity: int = 4,
                 chunk: int = 1 << 20):
        super().__init__(grad_dim, proj_dim, seed, device)
        s = sparsity
        while proj_dim % s:
            s -= 1
        self.sparsity, self.chunk = s, chunk
        gen = torch.Generator().manual_seed(seed)
        block = proj_dim // s
        offsets = torch.arange(s, dtype=torch.int32) * block
        self.buckets = (torch.randint(0, block, (grad_dim, s), generator=gen, dtype=torch.int32) + offsets)
        self.signs = (torch.randint(0, 2, (grad_dim, s), generator=gen, dtype=torch.int8) * 2 - 1)

    def project(self, grads):
        b = grads.shape[0]
        out = torch.zeros(b, self.proj_dim, device=grads.device, dtype=torch.float32)
        scale = 1.0 / math.sqrt(self.sparsity)
        for lo in range(0, self.grad_dim, self.chunk):
            hi = min(lo + self.chunk, self.grad_dim)
            idx = self.buckets[lo:hi].to(grads.device, torch.long).reshape(-1)
            sgn = self.signs[lo:hi].to(grads.device, torch.float32)
            vals = (grads[:, lo:hi].float().unsqueeze(-1) * sgn).reshape(b, -1)
            out.index_add_(1, idx, vals)
        return out * scale

    def describe(self):
        return {**super().describe(), "sparsity": self.sparsity}


class MaskedSJLTProjector(Projector):
    """GraSS's compressor (Hu et al., 2025, "GraSS: scalable data attribution with gradient sparsification and
    sparse projection"): keep a random set of m = `GRASS_MASK_FACTOR` x k input coordinates (drawn once from the
    seed, on the CPU), scale them by sqrt(P / m) so that inner products stay unbiased over the mask, then project
    the m-vector with `sjlt`. The sketch touches m coordinates instead of P, so its cost and its hash memory stop
    growing with the model."""

    name = "grass"

    def __init__(self, grad_dim: int, proj_dim: int, seed: int, device: torch.device, mask_dim: int | None = None):
        super().__init__(grad_dim, proj_dim, seed, device)
        # m: GRASS_MASK_FACTOR x k by default (what features are keyed by); another m only for measuring the mask's
        # cost and fidelity (bench/compressor_fidelity.py)
        self.mask_dim = min(grad_dim, mask_dim or GRASS_MASK_FACTOR * proj_dim)
        gen = torch.Generator().manual_seed(seed + 1_000_003)  # another stream than the sketch's
        self.keep = torch.randperm(grad_dim, generator=gen)[:self.mask_dim].sort().values
        self.scale = math.sqrt(grad_dim / self.mask_dim)
        self.sketch = SparseJLProjector(self.mask_dim, proj_dim, seed, device)

    def project(self, grads):
        kept = grads.index_select(1, self.keep.to(grads.device)).float() * self.scale
        return self.sketch.project(kept)

    def describe(self):
        return {**super().describe(), "mask_dim": self.mask_dim, "sparsity": self.sketch.sparsity}


class TrakGaussianProjector(Projector):
    """traker's `BasicProjector` matrix with N(0, 1) entries, divided by sqrt(k), drawn on the CPU.

    traker draws each block with a generator on the model's device, so CUDA and CPU give different matrices for
    one seed. Here block b (columns b*B .. b*B+B-1, B = `block_size`) is drawn exactly as traker's CPU
    `BasicProjector` draws it (a CPU generator seeded with seed + 1000 b, `normal_` over a (P, B) float32 block),
    then moved to the device: the matrix is the same on every device and equals traker's on the CPU.
    """

    name = "gaussian"

    def __init__(self, grad_dim: int, proj_dim: int, seed: int, device: torch.device):
        super().__init__(grad_dim, proj_dim, seed, device)
        # block_size < proj_dim avoids traker's single-block bug (ENVIRONMENT.md section 5).
        self.block_size = min(100, max(1, proj_dim - 1))
        self.num_blocks = math.ceil(proj_dim / self.block_size)

    def block(self, b: int, device: torch.device | None = None) -> torch.Tensor:
        """Columns of block b of the N(0, 1) matrix, (P, width), generated on the CPU, then moved to `device`."""
        gen = torch.Generator(device="cpu").manual_seed(self.seed + 1000 * b)
        m = torch.empty(self.grad_dim, self.block_size, dtype=torch.float32).normal_(generator=gen)
        width = min(self.block_size, self.proj_dim - b * self.block_size)
        return m[:, :width].to(device or self.device)

    def project(self, grads):
        g = grads.float()
        out = torch.empty(g.shape[0], self.proj_dim, dtype=torch.float32, device=g.device)
        for b in range(self.num_blocks):
            lo = b * self.block_size
            m = self.block(b, g.device)
            out[:, lo:lo + m.shape[1]] = g @ m
        return out / math.sqrt(self.proj_dim)


FAST_JL_BATCH = 32
# traker's single-kernel limit: batch x coordinates must fit in uint32 (`trak.utils.get_parameter_chunk_sizes`).
FAST_JL_MAX_CHUNK = (2**32 - 1) // FAST_JL_BATCH
FAST_JL_MULTIPLE = 512


def check_fast_jl_dim(proj_dim: int) -> None:
    """fast_jl projects to multiples of 512 only: refuse another k, naming the nearest valid one."""
    if proj_dim % FAST_JL_MULTIPLE:
        near = max(FAST_JL_MULTIPLE, round(proj_dim / FAST_JL_MULTIPLE) * FAST_JL_MULTIPLE)
        raise ConfigError(f"projector 'trak-cuda' (fast_jl) needs k to be a multiple of {FAST_JL_MULTIPLE}, got "
                          f"{proj_dim}; use --proj-dim {near}, or --projector sjlt for any k")


def fast_jl_chunks(grad_dim: int, max_chunk: int = FAST_JL_MAX_CHUNK) -> list[int]:
    """Sizes of the consecutive coordinate chunks fast_jl projects separately (one chunk up to its limit)."""
    return [min(max_chunk, grad_dim - lo) for lo in range(0, grad_dim, max_chunk)]


def pow2_row_scale(grads: torch.Tensor) -> torch.Tensor:
    """Per-row powers of two (B, 1) that bring each row's largest |entry| into [0.5, 1): float32 -> fp16 then
    keeps ~11 significant bits for every entry within 2^-14 of the largest (instead of flushing small gradients,
    e.g. unit-normalised ones over millions of coordinates, to zero). Exact to undo: scaling by 2^e is lossless."""
    peak = grads.detach().abs().amax(1, keepdim=True).float().clamp_min(1e-30)
    return torch.exp2(-torch.floor(torch.log2(peak)) - 1)


def cuda_matrix_identity(device: torch.device) -> dict:
    """What fast_jl's matrix depends on besides (k, seed): the GPU kind and its number of SMs."""
    props = torch.cuda.get_device_properties(device)
    return {"device": props.name, "sms": int(props.multi_processor_count)}


class TrakCudaProjector(Projector):
    """traker's `CudaProjector` (the fast_jl kernel), divided by sqrt(k). Needs CUDA and fast_jl.

    k must be a multiple of 512; gradients over more than `FAST_JL_MAX_CHUNK` coordinates go through traker's
    `ChunkedCudaProjector` (chunk c projected with seed + c, the projections summed); rows are scaled by a power
    of two before fast_jl's fp16 cast and unscaled after (`pow2_row_scale`)."""

    name = "trak-cuda"

    def __init__(self, grad_dim: int, proj_dim: int, seed: int, device: torch.device):
        super().__init__(grad_dim, proj_dim, seed, device)
        check_fast_jl_dim(proj_dim)
        if device.type != "cuda" or not fast_jl_available():
            raise ConfigError("projector 'trak-cuda' needs a CUDA device and the fast_jl package; use sjlt")
        # optional: traker's CUDA projector (GPU only)
        from trak.projectors import ChunkedCudaProjector, CudaProjector, ProjectionType

        self.chunks = fast_jl_chunks(grad_dim)
        parts = [CudaProjector(grad_dim=size, proj_dim=proj_dim, seed=seed + c, proj_type=ProjectionType.normal,
                               device=device, max_batch_size=FAST_JL_BATCH) for c, size in enumerate(self.chunks)]
        self.inner = parts[0] if len(parts) == 1 else ChunkedCudaProjector(
            parts, max(self.chunks), self.chunks, FAST_JL_BATCH, device, torch.float32)
        self.matrix = cuda_matrix_identity(device)

    def _project(self, g: torch.Tensor) -> torch.Tensor:
        if len(self.chunks) == 1:
            return self.inner.project(g.contiguous(), model_id=0)
        offsets = [0]
        for size in self.chunks:
            offsets.append(offsets[-1] + size)
        named = {f"chunk{c}": g[:, offsets[c]:offsets[c + 1]] for c in range(len(self.chunks))}
        return self.inner.project(named, model_id=0)

    def project(self, grads):
        out = []
        for s in range(0, grads.shape[0], FAST_JL_BATCH):
            g = grads[s:s + FAST_JL_BATCH].float()
            scale = pow2_row_scale(g)
            out.append(self._project(g * scale).float() / scale)
        return torch.cat(out) / math.sqrt(self.proj_dim)

    def describe(self):
        return {**super().describe(), **self.matrix, "chunks": len(self.chunks)}


def matrix_identity(name: str, device: torch.device) -> dict | None:
    """What the projection matrix depends on beyond (projector, k, seed), for a store's identity: None for the
    CPU-generated matrices (`sjlt`, `gaussian`: the same on every device), the GPU for `trak-cuda`."""
    if name == "grass":  # the mask's size is part of the matrix
        return {"mask_factor": GRASS_MASK_FACTOR}
    if name != "trak-cuda":
        return None
    if device.type != "cuda":
        raise ConfigError("projector 'trak-cuda' needs a CUDA device and the fast_jl package; use sjlt")
    return cuda_matrix_identity(device)


def fast_jl_available() -> bool:
    try:
        import fast_jl  # noqa: F401 (optional: is fast_jl installed?)
    except Exception:
        return False
    return True


def usable_projectors() -> tuple[str, ...]:
    """The projectors this machine can run (`trak-cuda` needs a CUDA GPU and fast_jl): what the app offers."""
    gpu = torch.cuda.is_available() and fast_jl_available()
    return tuple(p for p in PROJECTORS if p != "trak-cuda" or gpu)


def default_projector(device: torch.device) -> str:
    return "trak-cuda" if device.type == "cuda" and fast_jl_available() else "sjlt"


def make_projector(name: str, grad_dim: int, proj_dim: int, seed: int, device: torch.device) -> Projector:
    classes = {"identity": IdentityProjector, "sjlt": SparseJLProjector, "gaussian": TrakGaussianProjector,
               "trak-cuda": TrakCudaProjector, "grass": MaskedSJLTProjector}
    if name not in classes:
        raise ConfigError(f"unknown projector {name!r}; use one of: {', '.join(PROJECTORS)}")
    if name != "identity" and proj_dim < 1:
        raise ConfigError(f"the projection dimension k must be positive, got {proj_dim}")
    return classes[name](grad_dim, proj_dim, seed, device)
