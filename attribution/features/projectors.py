"""Random projections of per-sample gradients, from P dimensions down to k.

Scaling convention (stored with every feature set): features are scaled so that inner products are preserved in
expectation, E <Pg, Pg'> = <g, g'>. A Gaussian JL matrix with N(0, 1) entries is therefore divided by sqrt(k)
(D-TRAK and traker's fast_jl apply no such factor: multiply our lambda by k to compare with theirs). The identity
"projection" keeps gradients exact, so projected and exact scores live on one lambda scale.

| name | what | where it fits |
|---|---|---|
| `identity` | no projection (k = P) | small models, exactness checks |
| `sjlt` | ours: sparse JL / count-sketch with s non-zeros per coordinate (block construction, +-1/sqrt(s)) | any device; O(P s) per sample, memory O(P s) for the hash; the CPU default |
| `gaussian` | traker's `BasicProjector` (dense N(0,1) blocks regenerated per call) | the paper's estimator on CPU; slow for large P k |
| `trak-cuda` | traker's `CudaProjector` (fast_jl kernel) | GPUs with fast_jl installed; the GPU default then |
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod

import torch

from ..errors import ConfigError

PROJECTORS = ("sjlt", "gaussian", "trak-cuda", "identity")
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


class TrakGaussianProjector(Projector):
    """traker's `BasicProjector` with N(0, 1) entries, divided by sqrt(k)."""

    name = "gaussian"

    def __init__(self, grad_dim: int, proj_dim: int, seed: int, device: torch.device):
        super().__init__(grad_dim, proj_dim, seed, device)
        from trak.projectors import BasicProjector, ProjectionType

        # block_size < proj_dim avoids traker's single-block bug (ENVIRONMENT.md section 5).
        self.inner = BasicProjector(grad_dim=grad_dim, proj_dim=proj_dim, seed=seed, proj_type=ProjectionType.normal,
                                    device=str(device), dtype=torch.float32, block_size=min(100, max(1, proj_dim - 1)))

    def project(self, grads):
        return self.inner.project(grads.float(), model_id=0) / math.sqrt(self.proj_dim)


class TrakCudaProjector(Projector):
    """traker's `CudaProjector` (the fast_jl kernel), divided by sqrt(k). Needs CUDA and fast_jl."""

    name = "trak-cuda"

    def __init__(self, grad_dim: int, proj_dim: int, seed: int, device: torch.device):
        super().__init__(grad_dim, proj_dim, seed, device)
        if device.type != "cuda" or not fast_jl_available():
            raise ConfigError("projector 'trak-cuda' needs a CUDA device and the fast_jl package; use sjlt")
        from trak.projectors import CudaProjector, ProjectionType

        self.inner = CudaProjector(grad_dim=grad_dim, proj_dim=proj_dim, seed=seed, proj_type=ProjectionType.normal,
                                   device=device, max_batch_size=32)

    def project(self, grads):
        out = []
        for s in range(0, grads.shape[0], 32):
            out.append(self.inner.project(grads[s:s + 32].float().contiguous(), model_id=0))
        return torch.cat(out).float() / math.sqrt(self.proj_dim)


def fast_jl_available() -> bool:
    try:
        import fast_jl  # noqa: F401
    except Exception:
        return False
    return True


def default_projector(device: torch.device) -> str:
    return "trak-cuda" if device.type == "cuda" and fast_jl_available() else "sjlt"


def make_projector(name: str, grad_dim: int, proj_dim: int, seed: int, device: torch.device) -> Projector:
    classes = {"identity": IdentityProjector, "sjlt": SparseJLProjector, "gaussian": TrakGaussianProjector,
               "trak-cuda": TrakCudaProjector}
    if name not in classes:
        raise ConfigError(f"unknown projector {name!r}; use one of: {', '.join(PROJECTORS)}")
    if name != "identity" and proj_dim < 1:
        raise ConfigError(f"the projection dimension k must be positive, got {proj_dim}")
    return classes[name](grad_dim, proj_dim, seed, device)
