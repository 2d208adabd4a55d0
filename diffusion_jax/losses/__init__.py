"""Training losses and the variational bound (Ho et al. 2020; Nichol & Dhariwal 2021).

Three modules behind one namespace: :mod:`~diffusion_jax.losses.likelihoods` (KL and the
decoders), :mod:`~diffusion_jax.losses.bound` (L_t, L_T, the whole bound) and
:mod:`~diffusion_jax.losses.training` (the simple, hybrid and vlb objectives).

A model is any function ``model_fn(params, x_t, t, **model_kwargs) -> output``; these functions
pass ``model_kwargs`` (labels ``y=``, dropout ``rngs=``, ...) through unchanged and never import
Flax. Bits per dimension are natural-log quantities divided by ``log(2)`` and averaged over every
non-batch dimension.

Example:
  >>> loss, metrics = training_loss(model_fn, params, schedule, x0, key)
  >>> grads = jax.grad(lambda p: training_loss(model_fn, p, schedule, x0, key)[0])(params)
"""

from diffusion_jax.losses.bound import DECODERS, NLLTerms, nll_bpd, prior_bpd, vb_terms_bpd
from diffusion_jax.losses.likelihoods import (
    discretized_gaussian_log_likelihood,
    gaussian_log_likelihood,
    mean_flat,
    normal_kl,
)
from diffusion_jax.losses.training import HYBRID_LAMBDA, LOSS_TYPES, min_snr_weight, training_loss

__all__ = [
    "DECODERS",
    "HYBRID_LAMBDA",
    "LOSS_TYPES",
    "NLLTerms",
    "discretized_gaussian_log_likelihood",
    "gaussian_log_likelihood",
    "mean_flat",
    "min_snr_weight",
    "nll_bpd",
    "normal_kl",
    "prior_bpd",
    "training_loss",
    "vb_terms_bpd",
]
