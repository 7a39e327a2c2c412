"""Journey TRAK (Georgiev et al. 2023) as the D-TRAK paper adapts it (appendix A.3): the TRAK scores of every
sampling step of a generated image, averaged over the steps into one attribution of the final image.

The step-t feature is the gradient of the training loss (Simple) at the step's x̂0 re-noised to t; scores are
linear in the feature, so the mean of the per-step scores is the score of the mean per-step feature, which
`journey.trajectory_features` computes. Only generated targets (gen:SEED) have a trajectory.
"""

from ..errors import ConfigError
from ..journey import require_trajectories, trajectory_features
from .base import KernelMethod


class JourneyTRAK(KernelMethod):
    name = "journey-trak"
    title = "Journey TRAK"
    summary = "TRAK scores of each sampling step (x̂0 re-noised to t), averaged over the steps; generated targets only"
    default_fn = "simple"
    has_self_influence = False
    generated_only = True

    def check_targets(self, targets) -> None:
        require_trajectories(targets, self.title)

    def target_features(self, member, targets, progress=None, cache=None, sampler_model=None):
        """The mean per-step feature of each generated target's trajectory, sampled by `sampler_model` (the
        target checkpoint; default the member's own model) and differentiated with the member's gradients."""
        self.check_targets(targets)
        return trajectory_features(member, targets, progress, cache, sampler_model)

    def self_influence(self, train, lam):
        raise ConfigError("Journey TRAK attributes generated images along their sampling trajectory; training "
                          "images have none: use --method trak for self-influence")
