"""The model call inside the sampling loop, with classifier-free guidance when asked.

Guidance is one model call on the doubled batch ``[cond; uncond]`` (twice the batch, half the
dispatches of two calls), mixed as ``uncond + w (cond - uncond)``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from diffusion_jax import diffusion, options

__all__ = ["check_kwargs", "model_output"]


def model_output(
    model_fn: Callable[..., jax.Array],
    params: Any,
    x: jax.Array,
    t: jax.Array,
    model_kwargs: dict[str, Any],
    uncond_kwargs: dict[str, Any] | None,
    guidance_scale: jax.Array,
    variance: options.Variance,
) -> jax.Array:
    """The (guided) model output at ``(x, t)``, in ``x``'s dtype.

    eps, x0 and v are affine in one another at fixed ``(x, t)`` and the weights ``(1 - w, w)``
    sum to 1, so mixing any of them is the same as mixing eps. A learned variance half keeps
    the conditional pass's.

    Args:
      model_fn: ``model_fn(params, x_t, t, **kwargs) -> output``.
      params: the model's parameters.
      x: ``[B, ...]`` x_t.
      t: ``[B]`` int32 timesteps.
      model_kwargs: the conditional keyword arrays.
      uncond_kwargs: the unconditional ones (leading axis B each), or None: no guidance.
      guidance_scale: float32 scalar w (unused without guidance).
      variance: the model's variance option (``learned_range`` outputs have 2C channels).

    Returns:
      ``[B, ...]`` (``[B, ..., 2C]`` for ``learned_range``) the output.

    Example:
      >>> out = model_output(model_fn, params, x, t, {"y": y}, {"y": null}, 3.0, "fixed_small")
    """
    if uncond_kwargs is None:
        return model_fn(params, x, t, **model_kwargs).astype(x.dtype)
    both = lambda cond, uncond: jnp.concatenate([cond, uncond], axis=0)
    kwargs = jax.tree.map(both, model_kwargs, uncond_kwargs)
    out = model_fn(params, both(x, x), both(t, t), **kwargs).astype(x.dtype)
    cond, uncond = jnp.split(out, 2, axis=0)
    mean_cond, var_cond = diffusion.split_model_output(cond, x, variance)
    mean_uncond, _ = diffusion.split_model_output(uncond, x, variance)
    mixed = mean_uncond + guidance_scale * (mean_cond - mean_uncond)
    return mixed if var_cond is None else jnp.concatenate([mixed, var_cond], axis=-1)


def check_kwargs(
    model_kwargs: dict[str, Any] | None,
    uncond_kwargs: dict[str, Any] | None,
    guidance_scale: float | jax.Array | None,
    batch: int,
) -> None:
    """Checks the guidance options: both or neither of ``guidance_scale`` and
    ``uncond_kwargs``, and with guidance, matching kwargs with a leading batch axis each.

    Raises:
      ValueError: naming the argument at fault and what it needs.
    """
    if (guidance_scale is None) != (uncond_kwargs is None):
        raise ValueError(
            "Classifier-free guidance needs both guidance_scale and uncond_kwargs (e.g. "
            f"{{'y': null_labels}}); got {guidance_scale=} and uncond_kwargs="
            f"{'None' if uncond_kwargs is None else 'given'}."
        )
    if uncond_kwargs is None:
        return
    model_kwargs = {} if model_kwargs is None else dict(model_kwargs)
    uncond_kwargs = dict(uncond_kwargs)
    if jax.tree.structure(model_kwargs) != jax.tree.structure(uncond_kwargs):
        raise ValueError(
            "uncond_kwargs must have the structure of model_kwargs: "
            f"{jax.tree.structure(uncond_kwargs)} vs {jax.tree.structure(model_kwargs)}."
        )
    for name, kwargs in (("model_kwargs", model_kwargs), ("uncond_kwargs", uncond_kwargs)):
        for path, leaf in jax.tree_util.tree_leaves_with_path(kwargs):
            if jnp.ndim(leaf) < 1 or jnp.shape(leaf)[0] != batch:
                raise ValueError(
                    f"With guidance every array of {name} needs a leading batch axis of size "
                    f"{batch}; {name}{jax.tree_util.keystr(path)} has shape {jnp.shape(leaf)}."
                )
