"""EDM's preconditioning around any denoiser network (Karras et al. 2022, Table 1), as a Linen
module with two faces.

- ``denoise(x, sigma, y, train)`` is EDM's denoiser ``D(x; sigma) = c_skip x + c_out F(c_in x;
  c_noise)`` of ``x = x0 + n``, ``n ~ N(0, sigma^2 I)``: what EDM's loss trains
  (:func:`diffusion_jax.losses.edm.edm_loss`, through :func:`make_denoise_fn`).
- ``__call__(x_t, t, y, train)`` is the same denoiser seen as a discrete VP model that predicts
  x0: at timestep ``t`` of the schedule whose ``alphas_cumprod`` it holds, ``x0_pred =
  D(x_t / sqrt(abar_t); sigma_t)`` with ``sigma_t = sqrt((1 - abar_t) / abar_t)``. This is the
  library's call convention, so :func:`diffusion_jax.models.make_model_fn`, every sampler
  (``method="heun"`` included), the trainer's sample grids, ``sample.py`` and the bound use an
  EDM-trained network as they use an x0-predicting DDPM (``parameterization="x0"``).

The wrapped network ``F`` is called as ``net(x, c_noise, y=y, train=train)`` with the float
conditioning ``c_noise = ln(sigma) / 4`` in place of an integer timestep; the U-Net and the MLP
embed it with the same sinusoids.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from diffusion_jax.diffusion import edm

__all__ = ["Preconditioned", "make_denoise_fn"]


class Preconditioned(nn.Module):
    """A network ``F`` preconditioned into EDM's denoiser, callable as a VP x0 model.

    Attributes:
      net: the network ``F`` (``UNet``, ``MLP`` or your own with the call convention
        ``net(x, noise_level, y=None, train=False)``); its output has the data's shape.
      alphas_cumprod: the VP schedule's abar_t, t = 0 .. T-1, all in (0, 1] (a tuple, so the
        module stays hashable); used by ``__call__`` only.
      sigma_data: the data's standard deviation per dimension (0.5 for images in [-1, 1]).

    Example:
      >>> model = Preconditioned(MLP(features=32, num_layers=1), tuple(schedule.alphas_cumprod))
      >>> params = model.init(key, x_t, t)["params"]                 # doctest: +SKIP
      >>> x0_pred = model.apply({"params": params}, x_t, t)            # doctest: +SKIP
      >>> d = model.apply({"params": params}, x, sigma, method="denoise")  # doctest: +SKIP
    """

    net: nn.Module
    alphas_cumprod: tuple[float, ...]
    sigma_data: float = edm.EDM_SIGMA_DATA

    def _apply(self, x, coefficients: edm.Preconditioning, y, train) -> jax.Array:
        ndim = x.ndim
        output = self.net(
            edm.expand(coefficients.c_in, ndim) * x, coefficients.c_noise, y=y, train=train
        )
        if output.shape != x.shape:
            raise ValueError(
                f"Preconditioned needs a network whose output has the data's shape {x.shape} "
                f"(a fixed variance), got {output.shape}."
            )
        skip = edm.expand(coefficients.c_skip, ndim) * x
        return skip + edm.expand(coefficients.c_out, ndim) * output.astype(jnp.float32)

    def denoise(
        self, x: jax.Array, sigma: jax.Array, y: jax.Array | None = None, train: bool = False
    ) -> jax.Array:
        """EDM's denoiser D(x; sigma).

        Args:
          x: ``[B, ...]`` noisy data ``x0 + n`` in EDM's scale.
          sigma: ``[B]`` noise levels > 0.
          y: optional ``[B]`` labels, passed to the network.
          train: passed to the network (dropout).

        Returns:
          ``[B, ...]`` float32, the denoised estimate of x0.
        """
        return self._apply(x, edm.preconditioning(sigma, self.sigma_data), y, train)

    def __call__(
        self, x_t: jax.Array, t: jax.Array, y: jax.Array | None = None, train: bool = False
    ) -> jax.Array:
        """The predicted x0 at VP timesteps ``t``: ``D(x_t / sqrt(abar_t); sigma_t)``.

        Args:
          x_t: ``[B, ...]`` VP noisy data.
          t: ``[B]`` int timesteps in ``0 .. T-1``.
          y: optional ``[B]`` labels.
          train: passed to the network.

        Returns:
          ``[B, ...]`` float32 predicted x0.
        """
        alpha_bar = jnp.take(jnp.asarray(self.alphas_cumprod, jnp.float32), t)
        return self._apply(x_t, edm.vp_preconditioning(alpha_bar, self.sigma_data), y, train)


def make_denoise_fn(module: Preconditioned, *, train: bool) -> Callable[..., jax.Array]:
    """``denoise_fn(params, x, sigma, y=None, rngs=None) -> D`` of a :class:`Preconditioned`
    module, the function :func:`diffusion_jax.losses.edm.edm_loss` calls.

    Args:
      module: the preconditioned network.
      train: passed as ``train`` (dropout on; then each call needs ``rngs={"dropout": key}``).

    Returns:
      The denoiser as a function of ``params`` (``variables["params"]``).
    """

    def denoise_fn(
        params: Any,
        x: jax.Array,
        sigma: jax.Array,
        y: jax.Array | None = None,
        rngs: dict[str, jax.Array] | None = None,
    ) -> jax.Array:
        return module.apply(
            {"params": params}, x, sigma, y=y, train=train, rngs=rngs, method="denoise"
        )

    return denoise_fn
