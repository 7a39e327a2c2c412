"""EK-FAC influence functions for diffusion models (Mlodozeniec et al., ICLR 2025, "Influence functions for
scalable data attribution in diffusion models"; code `BrunoKM/diffusion-influence`):

    tau_n = grad m(target)^T (H + lambda I)^{-1} grad L(x_n),

L the training loss (Simple, at the features' K timesteps and noise), m the measurement (`ekfac`: the same loss of
the target; `ekfac-elbo`: the ELBO-weighted loss over the K timesteps), H the EK-FAC approximation of the training
loss's Gauss-Newton matrix over the UNet's Linear and Conv2d layers, estimated on every training image's noisy
copies (uniform timesteps and noise, as DInf draws them; `--curvature-samples`, default 2 per image), and the
damping lambda = `--damping` (default 0.1) x a mean EK-FAC eigenvalue: by default (`--damping-rule global`) the
mean over every tracked layer, one lambda for all; with `--damping-rule module`, each layer's own mean, per layer
(kronfluence's heuristic). The scores are dot products of EK-FAC-whitened gradients (`features.curvature`),
projected and cached like every feature set; another damping or rule re-whitens the training gradients (a new
feature set) but reuses the fitted factors, which are cached without it.

Measured (BENCHMARKS.md, "EK-FAC's damping and copies"; digits bank, LDS validation / generated): at the shared
default K = 10 timesteps x 1 noise draw per gradient it scores like TRAK (+0.117 / +0.054), flat over damping
1e-4..1, both damping rules and 2 or 8 copies, far below D-TRAK Avg (+0.333 / +0.235): a Simple-loss gradient of
few draws is dominated by their residual noise, which no curvature removes. With more samples per gradient it
rises steeply: at K = 40, +0.270 / +0.169 against TRAK's +0.177 / +0.141 (a real difference on validation only) and
within noise of D-TRAK Avg's +0.322 / +0.230. Give this method `--timesteps 40` or more (DInf uses 250 samples
per gradient).

Own implementation rather than kronfluence: kronfluence's per-sample gradients are one per row of the batch the
loss sees, but a diffusion example's loss is a mean over many (timestep, noise) copies of one image (DInf asserts
batch size 1 for this); it writes its factors to its own folders (the cache here belongs to store.py); and it
wraps the model's modules in place, which the app's shared models cannot allow. Normalisation layers (GroupNorm)
are not tracked; their parameters are left out of the scores (`features.curvature.Layout.skipped`).
"""

from ..features.curvature import WhitenedGradients
from .base import Method, dot_scores


class EKFACInfluence(Method):
    name = "ekfac"
    title = "EK-FAC influence"
    summary = ("influence function: the change in the target's loss if the training image were removed, from "
               "loss gradients through the inverse EK-FAC curvature (Gauss-Newton) of the training loss over the "
               "UNet's linear and convolution layers; damping 0.1 x the mean eigenvalue (--damping, "
               "--damping-rule); no lambda")
    default_fn = "simple"
    uses_lambda = False
    features = WhitenedGradients
    measurement = None  # the target's output function (None: the training loss itself)

    def target_features(self, member, targets, progress=None, cache=None, sampler_model=None):
        self.check_targets(targets)
        return member.features_of(targets.images, targets.keys, fn=self.measurement)

    def score(self, train, G, lam):
        return dot_scores(train, G)

    def self_influence(self, train, lam):
        return train.norms**2


class EKFACInfluenceELBO(EKFACInfluence):
    name = "ekfac-elbo"
    title = "EK-FAC influence (ELBO)"
    summary = ("EK-FAC influence on the target's ELBO (its loss weighted per timestep as in the likelihood bound) "
               "instead of its plain loss; training side and curvature as in ekfac")
    measurement = "elbo"
