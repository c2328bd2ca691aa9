"""Analytic priors whose noise prediction and linear-Gaussian posterior are exact.

They are the ground truth for testing a DPS sampler: ``prior.eps_model(schedule)`` stands in for a
trained network (``eps(x_t [B, 1, d], t [B]) -> [B, 1, d]``), and ``prior.posterior(A, y, sigma_n)``
is what the sampler should approximate.
"""

from .gaussian import GaussianPrior
from .mixture import GaussianMixturePrior, MixtureEps, Posterior

__all__ = ["GaussianPrior", "GaussianMixturePrior", "MixtureEps", "Posterior"]
