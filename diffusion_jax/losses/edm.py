"""EDM's training loss (Karras et al. 2022, Section 5 and Table 1): log-normal noise levels and
the weighted denoising loss.

Per example, ``ln(sigma) ~ N(P_mean, P_std^2)``, ``n ~ N(0, sigma^2 I)`` and the loss is
``lambda(sigma) mean((D(x0 + n; sigma) - x0)^2)`` with EDM's weight ``lambda`` (see
:mod:`diffusion_jax.diffusion.edm`); the batch loss is its mean over examples. The denoiser is
any ``denoise_fn(params, x, sigma, **model_kwargs) -> D`` (e.g. a network preconditioned with
:func:`diffusion_jax.diffusion.edm.preconditioning`).

Example:
  >>> loss, metrics = edm_loss(denoise_fn, params, x0, key, sigma_data=0.5)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import chex
import jax
import jax.numpy as jnp

from diffusion_jax.diffusion import edm
from diffusion_jax.losses.likelihoods import mean_flat

__all__ = ["edm_loss", "sample_sigma"]

DenoiseFn = Callable[..., jax.Array]


def sample_sigma(
    key: jax.Array,
    batch_size: int,
    P_mean: float = edm.EDM_P_MEAN,
    P_std: float = edm.EDM_P_STD,
) -> jax.Array:
    """EDM's training noise levels: ``sigma = exp(P_mean + P_std z)``, ``z ~ N(0, 1)``.

    Args:
      key: a PRNG key.
      batch_size: how many (one per example).
      P_mean, P_std: mean and standard deviation of ln(sigma).

    Returns:
      ``[batch_size]`` float32 sigmas.
    """
    return jnp.exp(P_mean + P_std * jax.random.normal(key, (batch_size,), jnp.float32))


def edm_loss(
    denoise_fn: DenoiseFn,
    params: Any,
    x0: jax.Array,
    key: jax.Array | None,
    *,
    sigma_data: float = edm.EDM_SIGMA_DATA,
    P_mean: float = edm.EDM_P_MEAN,
    P_std: float = edm.EDM_P_STD,
    model_kwargs: dict[str, Any] | None = None,
    sigma: jax.Array | None = None,
    noise: jax.Array | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """EDM's weighted denoising loss for a batch; runs the denoiser once.

    ``sigma_key, noise_key = split(key)``; sigma is :func:`sample_sigma` of ``sigma_key`` and
    the unit noise ``normal(noise_key, x0.shape)``, scaled by sigma. Either may be given
    instead (then it is not drawn, and the other is drawn exactly as without it).

    Args:
      denoise_fn: ``denoise_fn(params, x, sigma, **model_kwargs) -> D``, D of x's shape.
      params: passed to ``denoise_fn`` as they are.
      x0: ``[B, ...]`` clean data (images scaled to [-1, 1]).
      key: a PRNG key; may be None when ``sigma`` and ``noise`` are both given.
      sigma_data, P_mean, P_std: EDM's settings (Table 1).
      model_kwargs: extra arguments of ``denoise_fn`` (labels ``y=``, dropout ``rngs=``).
      sigma: ``[B]`` noise levels > 0, in place of the draw.
      noise: unit Gaussian noise of x0's shape, in place of the draw.

    Returns:
      ``(loss, metrics)``: the scalar loss, and ``loss``, ``mse`` (the unweighted mean squared
      error of D), ``per_example_loss`` ``[B]``, ``per_example_mse`` ``[B]`` and ``sigma``
      ``[B]``.

    Raises:
      ValueError: invalid settings, or no key for a draw that is not given.
    """
    edm.check_settings(sigma_data, P_mean, P_std)
    batch = x0.shape[0]
    if key is None and (sigma is None or noise is None):
        raise ValueError("edm_loss needs a key unless both sigma and noise are given.")
    sigma_key, noise_key = jax.random.split(key) if key is not None else (None, None)
    if sigma is None:
        sigma = sample_sigma(sigma_key, batch, P_mean, P_std)
    if noise is None:
        noise = jax.random.normal(noise_key, x0.shape, jnp.float32)
    chex.assert_shape(sigma, (batch,))
    chex.assert_equal_shape([x0, noise])
    noisy = x0 + edm.expand(sigma, x0.ndim) * noise
    denoised = denoise_fn(params, noisy, sigma, **(model_kwargs or {}))
    chex.assert_equal_shape([x0, denoised])
    per_example_mse = mean_flat((denoised.astype(jnp.float32) - x0) ** 2)
    per_example_loss = edm.loss_weight(sigma, sigma_data) * per_example_mse
    loss = jnp.mean(per_example_loss)
    metrics = {
        "loss": loss,
        "mse": jnp.mean(per_example_mse),
        "per_example_loss": per_example_loss,
        "per_example_mse": per_example_mse,
        "sigma": sigma,
    }
    return loss, metrics
