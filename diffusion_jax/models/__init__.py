"""Flax denoisers and the glue that turns one into the core's ``model_fn``.

The diffusion core never imports Flax: it calls ``model_fn(params, x_t, t, **model_kwargs)``.
``make_model_fn`` builds that function from any Linen module with the call convention
``module.apply(variables, x, t, y=None, train=False, rngs=...)`` — :class:`UNet`,
:class:`MLP`, or a researcher's own network.

Example:
  >>> model = get_model("mlp", features=64, num_layers=2)
  >>> x, t = jnp.zeros((4, 2)), jnp.zeros((4,), jnp.int32)
  >>> params = model.init(jax.random.key(0), x, t)["params"]
  >>> model_fn = make_model_fn(model, train=False)
  >>> model_fn(params, x, t).shape
  (4, 2)
"""

import functools
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from diffusion_jax.models.layers import timestep_embedding
from diffusion_jax.models.mlp import MLP
from diffusion_jax.models.preconditioned import Preconditioned, make_denoise_fn
from diffusion_jax.models.unet import UNet

__all__ = [
    "MLP",
    "Preconditioned",
    "UNet",
    "example_inputs",
    "get_model",
    "make_denoise_fn",
    "make_model_fn",
    "timestep_embedding",
]

_MODELS: dict[str, type[nn.Module]] = {"unet": UNet, "mlp": MLP}


def make_model_fn(module: nn.Module, *, train: bool) -> Callable[..., jax.Array]:
    """Wraps a Linen denoiser as the core's ``model_fn(params, x_t, t, **model_kwargs)``.

    An equal (hashable) module gives the same function object each time, so the samplers'
    compiled loops, which are keyed on ``model_fn``, compile once per model.

    Args:
      module: a Linen module called as ``apply(variables, x, t, y=None, train=False)``
        (``UNet``, ``MLP`` or your own; only ``"params"`` variables, no mutable state).
      train: passed to the module as ``train``: ``True`` enables dropout, and then each call
        needs ``rngs={"dropout": key}``.

    Returns:
      ``model_fn(params, x_t, t, y=None, rngs=None) -> output`` where ``params`` is
      ``variables["params"]``, ``x_t`` is ``[B, ...]``, ``t`` is ``[B]``, ``y`` the optional
      ``[B]`` labels and ``rngs`` the dict of keys for ``apply`` (e.g. ``{"dropout": key}``).
      ``y`` is forwarded only when given, so modules without labels need not accept it.

    Example:
      >>> model_fn = make_model_fn(unet, train=True)  # doctest: +SKIP
      >>> eps = model_fn(params, x_t, t, y=labels, rngs={"dropout": key})  # doctest: +SKIP
    """
    try:
        return _cached_model_fn(module, train)
    except TypeError:  # an unhashable module (e.g. list attributes): a fresh function
        return _model_fn(module, train)


@functools.lru_cache(maxsize=64)
def _cached_model_fn(module: nn.Module, train: bool) -> Callable[..., jax.Array]:
    return _model_fn(module, train)


def _model_fn(module: nn.Module, train: bool) -> Callable[..., jax.Array]:
    def model_fn(
        params: Any,
        x_t: jax.Array,
        t: jax.Array,
        y: jax.Array | None = None,
        rngs: dict[str, jax.Array] | None = None,
    ) -> jax.Array:
        kwargs = {} if y is None else {"y": y}
        return module.apply({"params": params}, x_t, t, train=train, rngs=rngs, **kwargs)

    return model_fn


def example_inputs(
    data_shape: tuple[int, ...], *, conditional: bool, batch: int = 1
) -> tuple[jax.Array, jax.Array, dict[str, jax.Array]]:
    """Zero inputs ``(x, t, kwargs)`` of the call convention, to initialise a module with
    ``module.init(key, x, t, **kwargs)`` (or to get its parameter shapes under ``eval_shape``).

    Args:
      data_shape: ``(H, W, C)`` or ``(D,)``, one example's shape.
      conditional: add ``kwargs["y"]``, int32 labels ``[batch]``.
      batch: the leading batch size.

    Example:
      >>> x, t, kwargs = example_inputs((8, 8, 1), conditional=True)
      >>> x.shape, t.shape, kwargs["y"].shape
      ((1, 8, 8, 1), (1,), (1,))
    """
    x = jnp.zeros((batch, *data_shape), jnp.float32)
    t = jnp.zeros((batch,), jnp.int32)
    kwargs = {"y": jnp.zeros((batch,), jnp.int32)} if conditional else {}
    return x, t, kwargs


def get_model(name: str, **kwargs: Any) -> nn.Module:
    """Builds a denoiser by name, e.g. from a config's ``model`` section.

    Lists are turned into tuples (config files often hold lists; module attributes should be
    hashable) and a ``dtype`` given as a string (``"bfloat16"``) into a NumPy dtype.

    Args:
      name: ``"unet"`` or ``"mlp"``.
      **kwargs: the module's attributes (see :class:`UNet`, :class:`MLP`).

    Returns:
      The (unbound) Linen module.

    Raises:
      ValueError: for an unknown name.

    Example:
      >>> get_model("unet", ch=32, ch_mult=[1, 2], num_res_blocks=1, attn_resolutions=[8],
      ...           dropout=0.0, out_channels=3, num_groups=8).ch_mult
      (1, 2)
    """
    if name not in _MODELS:
        raise ValueError(f"unknown model {name=}; choose one of {sorted(_MODELS)}")
    kwargs = {
        key: tuple(value) if isinstance(value, list) else value for key, value in kwargs.items()
    }
    if isinstance(kwargs.get("dtype"), str):
        kwargs["dtype"] = jnp.dtype(kwargs["dtype"])
    return _MODELS[name](**kwargs)
