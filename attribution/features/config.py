"""The feature configuration: everything that defines a feature set (and so its cache identity).

What a configuration's identity, folder name and cost key are is decided by its kind of features (`kind`, a
`featurizer.Featurizer` in `FEATURIZERS`); this module imports the built-in kinds so they are registered.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import ConfigError
from .curvature import WhitenedGradients  # noqa: F401 (registers the kind)
from .embeddings import ClipFeatures, PixelFeatures  # noqa: F401 (registers the kinds)
from .featurizer import FEATURIZERS, featurizer_class
from .gradients import GradientFeatures, GradientSpec
from .outputs import OUTPUT_FUNCTIONS
from .projectors import PROJECTORS, check_fast_jl_dim
from .residuals import ResidualShape, ResidualSize  # noqa: F401 (registers the kinds)
from .timesteps import STRATEGIES, select_timesteps

DEFAULT_TIMESTEPS = 10  # K: the D-TRAK paper's default and every page's, command's and study's (declared once here)
DEFAULT_PROJ_DIM = 4096  # k: likewise


@dataclass(frozen=True)
class FeatureConfig:
    """How per-sample features phi(x) are computed.

    Attributes:
        kind: the kind of features (`FEATURIZERS`): "gradients" (projected gradients of `fn`), "ekfac" (the same
            gradients whitened by the EK-FAC curvature first: influence functions), "das-residual" and
            "das-residual-size" (gradient features with DAS's per-row residual statistic beside them), "pixels" or
            "clip" (model-free embeddings of the similarity baselines: then only `clip_model` and, for "clip", the
            local `clip_weights` file matter).
        fn: output function whose gradient is taken (see `outputs.OUTPUT_FUNCTIONS`).
        eta: interpolation weight, used by fn="interp" only.
        timesteps: K, the number of timesteps averaged over.
        strategy: "uniform" (evenly spaced from 0), "cumulative" (the first K) or "training" (training images at
            their training timestep, targets at the uniform K; see `timesteps.py`).
        noises: noise draws per timestep.
        proj_dim: k, the projection dimension (ignored by the identity projector).
        projector: "sjlt", "gaussian", "trak-cuda", "identity" or "grass" (`projectors.py`).
        seed: seed of the noise and of the projection.
        proj_seed: another seed for the projection only (None: `seed`); TracInCP/GAS with uniform checkpoint
            weights draw one projection per checkpoint (D-TRAK appendix A.3).
        params: comma-separated parameter-name prefixes to take gradients over (None: all parameters).
        normalize: unit-normalise each per-timestep gradient before averaging, and so every training gradient of
            the "training" strategy (Diffusion-ReTrac).
        damping, damping_rule, curvature_samples: the EK-FAC options (kind "ekfac" only; see
            `curvature.WhitenedGradients`): the damping as a multiple of the mean EK-FAC eigenvalue (default 0.1),
            whose mean eigenvalue it multiplies ("global", the default, or "module"), and the noisy copies per
            training image the factors are estimated on.
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
    kind: str = GradientFeatures.kind
    clip_model: str = "ViT-B-32"
    clip_weights: str | None = None  # a local file; the identity records its content digest, not its path
    damping: float | None = None
    damping_rule: str | None = None
    curvature_samples: int | None = None

    @property
    def projection_seed(self) -> int:
        return self.seed if self.proj_seed is None else self.proj_seed

    @property
    def featurizer(self):
        """The class of this configuration's kind of features."""
        return featurizer_class(self.kind)

    def __post_init__(self):
        own = self.featurizer
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
        for other in FEATURIZERS.values():  # an option of another kind of features, set
            for name in other.options:
                if getattr(self, name) is not None and name not in own.options:
                    raise ConfigError(f"{name.replace('_', ' ')} {other.refusal}")
        own.validate(self)
        if self.fn != "interp" and self.eta != 1.0:
            raise ConfigError("eta applies only to the Simple/Square interpolation: use --fn interp with --eta")

    def gradient_spec(self, num_timesteps: int) -> GradientSpec:
        ts = select_timesteps(self.strategy, self.timesteps, num_timesteps)
        return GradientSpec(self.fn, tuple(ts.tolist()), self.noises, self.seed, self.eta, self.params,
                            self.normalize)

    def cost_kind(self) -> str:
        """What the time to featurize one (image, timestep) depends on beside the checkpoint and the device
        (`Featurizer.cost_kind`)."""
        return self.featurizer.cost_kind(self)

    def to_dict(self) -> dict:
        """The identity of these features (`Featurizer.config_dict`)."""
        return self.featurizer.config_dict(self)

    def slug(self) -> str:
        """A readable cache folder name (`Featurizer.slug`)."""
        return self.featurizer.slug(self)
