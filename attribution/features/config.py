"""The feature configuration: everything that defines a feature set (and so its cache identity)."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from ..errors import ConfigError
from .curvature import DEFAULT_DAMPING, DEFAULT_SAMPLES, CurvatureSpec, check_damping
from .gradients import GradientSpec
from .outputs import OUTPUT_FUNCTIONS
from .projectors import PROJECTORS, check_fast_jl_dim
from .timesteps import STRATEGIES, select_timesteps

EMBEDDINGS = (None, "pixels", "clip")


DEFAULT_TIMESTEPS = 10  # K: the D-TRAK paper's default and every page's, command's and study's (declared once here)
DEFAULT_PROJ_DIM = 4096  # k: likewise


@dataclass(frozen=True)
class FeatureConfig:
    """How per-sample features phi(x) are computed.

    Attributes:
        fn: output function whose gradient is taken (see `outputs.OUTPUT_FUNCTIONS`).
        eta: interpolation weight, used by fn="interp" only.
        timesteps: K, the number of timesteps averaged over.
        strategy: "uniform" (evenly spaced from 0), "cumulative" (the first K) or "training" (training images at
            their training timestep, targets at the uniform K; see `timesteps.py`).
        noises: noise draws per timestep.
        proj_dim: k, the projection dimension (ignored by the identity projector).
        projector: "sjlt", "gaussian", "trak-cuda" or "identity".
        seed: seed of the noise and of the projection.
        proj_seed: another seed for the projection only (None: `seed`); TracInCP/GAS with uniform checkpoint
            weights draw one projection per checkpoint (D-TRAK appendix A.3).
        params: comma-separated parameter-name prefixes to take gradients over (None: all parameters).
        normalize: unit-normalise each per-timestep gradient before averaging, and so every training gradient of
            the "training" strategy (Diffusion-ReTrac).
        embedding: None for gradient features; "pixels" or "clip" for the model-free similarity baselines (then
            only `clip_model` and, for "clip", the local `clip_weights` file matter; see `embeddings.py`).
        curvature: None, or "ekfac": gradients whitened by the EK-FAC curvature of the training loss before the
            projection (influence functions; see `curvature.py`).
        damping: EK-FAC damping as a multiple of the mean EK-FAC eigenvalue (with curvature only; default 0.1).
        damping_rule: whose mean eigenvalue the damping multiplies (with curvature only): "global" (all tracked
            layers', one lambda; the default) or "module" (each layer's own: kronfluence's heuristic); see
            `curvature.DAMPING_RULES`.
        curvature_samples: noisy copies per training image the EK-FAC factors are estimated on (with curvature
            only; default `curvature.DEFAULT_SAMPLES`). Part of the curvature's identity, not of the features'
            dict (the Attributor records the whole `CurvatureSpec`).
    """

    fn: str = "square"
    eta: float = 1.0
    timesteps: int = DEFAULT_TIMESTEPS
    strategy: str = "uniform"
    noises: int = 1
    proj_dim: int = DEFAULT_PROJ_DIM
    projector: str = "sjlt"
    seed: int = 0
    params: str | None = None
    normalize: bool = False
    proj_seed: int | None = None
    embedding: str | None = None
    clip_model: str = "ViT-B-32"
    clip_weights: str | None = None  # a local file; the identity records its content digest, not its path
    curvature: str | None = None
    damping: float | None = None
    damping_rule: str | None = None
    curvature_samples: int | None = None

    @property
    def projection_seed(self) -> int:
        return self.seed if self.proj_seed is None else self.proj_seed

    def __post_init__(self):
        if self.embedding not in EMBEDDINGS:
            raise ConfigError(f"unknown embedding {self.embedding!r}; use pixels or clip")
        if self.fn not in OUTPUT_FUNCTIONS:
            raise ConfigError(f"unknown output function {self.fn!r}; use one of: {', '.join(OUTPUT_FUNCTIONS)}")
        if self.strategy not in STRATEGIES:
            raise ConfigError(f"unknown timestep strategy {self.strategy!r}; use one of: {', '.join(STRATEGIES)}")
        if self.projector not in PROJECTORS:
            raise ConfigError(f"unknown projector {self.projector!r}; use one of: {', '.join(PROJECTORS)}")
        if self.timesteps < 1:
            raise ConfigError(f"the number of timesteps K must be positive, got {self.timesteps}")
        if self.noises < 1:
            raise ConfigError(f"noises per timestep must be positive, got {self.noises}")
        if self.projector != "identity" and self.proj_dim < 1:
            raise ConfigError(f"the projection dimension k must be positive, got {self.proj_dim}")
        if self.projector == "trak-cuda":
            check_fast_jl_dim(self.proj_dim)
        if not 0.0 <= self.eta <= 1.0:
            raise ConfigError(f"eta must be within [0, 1], got {self.eta}")
        if self.curvature not in (None, "ekfac"):
            raise ConfigError(f"unknown curvature {self.curvature!r}; use ekfac")
        if self.curvature is None:
            for name in ("damping", "damping_rule", "curvature_samples"):
                if getattr(self, name) is not None:
                    raise ConfigError(f"{name.replace('_', ' ')} applies to the influence-function (EK-FAC) methods "
                                      "only: use --method ekfac or ekfac-elbo")
        else:
            check_damping(self.effective_damping, self.effective_damping_rule)
            self.curvature_spec()  # the copies per image
        if self.fn != "interp" and self.eta != 1.0:
            raise ConfigError("eta applies only to the Simple/Square interpolation: use --fn interp with --eta")

    def gradient_spec(self, num_timesteps: int) -> GradientSpec:
        ts = select_timesteps(self.strategy, self.timesteps, num_timesteps)
        return GradientSpec(self.fn, tuple(ts.tolist()), self.noises, self.seed, self.eta, self.params,
                            self.normalize)

    def cost_kind(self) -> str:
        """What the time to featurize one (image, timestep) depends on beside the checkpoint and the device: the
        output function, the projection (its kind and k), the curvature whitening, the embedding, per-timestep
        normalisation. Timesteps, noises and seeds only scale or reorder the work, so they are not part of it."""
        if self.embedding:
            return self.embedding + (f"-{self.clip_model}" if self.embedding == "clip" else "")
        proj = self.projector if self.projector == "identity" else f"{self.projector}{self.proj_dim}"
        return "-".join([self.fn, proj, *([self.curvature] if self.curvature else []),
                         *(["normalize"] if self.normalize else [])])

    def to_dict(self) -> dict:
        if self.embedding == "pixels":
            return {"embedding": "pixels"}
        if self.embedding == "clip":
            return {"embedding": "clip", "clip_model": self.clip_model}
        d = asdict(self)
        for key in ("embedding", "clip_model", "clip_weights"):  # gradient features: identities as before
            d.pop(key)
        if self.projector == "identity":
            d["proj_dim"] = None
        if self.fn != "interp":
            d.pop("eta")
        if not self.normalize:  # absent from configs made before the option existed: their caches stay valid
            d.pop("normalize")
        if self.proj_seed is None:  # absent unless set: caches made before the option stay valid
            d.pop("proj_seed")
        if self.strategy == "training":  # K applies to targets only: training rows use their own timestep
            d.pop("timesteps")
        d.pop("curvature_samples")  # in the identity's "curvature" entry (`CurvatureSpec.to_dict`)
        if self.curvature is None:  # absent unless set: caches made before the option stay valid
            d.pop("curvature")
            d.pop("damping")
            d.pop("damping_rule")
        else:
            d["damping"] = self.effective_damping
            if self.effective_damping_rule == "global":  # absent: caches made before the option stay valid
                d.pop("damping_rule")
            else:
                d["damping_rule"] = self.effective_damping_rule
        return d

    @property
    def effective_damping(self) -> float:
        """The EK-FAC damping factor used: `damping`, else 0.1 (x the mean eigenvalue)."""
        return DEFAULT_DAMPING if self.damping is None else float(self.damping)

    @property
    def effective_damping_rule(self) -> str:
        """The EK-FAC damping rule used: `damping_rule`, else "global"."""
        return self.damping_rule or "global"

    def curvature_spec(self) -> CurvatureSpec:
        """How the EK-FAC factors of these features are estimated (their copies per image, seed and parameters)."""
        samples = {} if self.curvature_samples is None else {"samples": self.curvature_samples}
        return CurvatureSpec(seed=self.seed, params=self.params, **samples)

    def slug(self) -> str:
        if self.embedding:
            return "pixels" if self.embedding == "pixels" else f"clip-{self.clip_model}"
        k = "exact" if self.projector == "identity" else f"k{self.proj_dim}"
        fn = f"interp{self.eta:g}" if self.fn == "interp" else self.fn
        unit = "-unit" if self.normalize else ""
        ts = "Ttrain" if self.strategy == "training" else f"K{self.timesteps}{self.strategy[0]}"
        ps = "" if self.proj_seed is None else f"-p{self.proj_seed}"
        cv = ""
        if self.curvature is not None:
            rule = "m" if self.effective_damping_rule == "module" else ""
            samples = self.curvature_spec().samples
            copies = "" if samples == DEFAULT_SAMPLES else f"c{samples}"
            cv = f"-{self.curvature}{self.effective_damping:g}{rule}{copies}"
        return f"{fn}-{ts}-n{self.noises}{unit}{cv}-{self.projector}-{k}-s{self.seed}{ps}"
