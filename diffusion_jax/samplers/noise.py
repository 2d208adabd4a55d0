"""The noise every sampler draws: a function of (key, run-wide example index, step) only."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from diffusion_jax import _runtime

__all__ = ["initial_noise", "step_noise"]


def step_noise(
    key: jax.Array, step: int | jax.Array, shape: tuple[int, ...], first_index: int | jax.Array = 0
) -> jax.Array:
    """The standard normal noise every sampler draws at one step.

    Example ``i`` gets ``normal(fold_in(fold_in(key, first_index + i), step), shape[1:])``, so
    the noise of an example depends on its index in the whole run, never on the batch it is in.

    Args:
      key: a PRNG key (``jax.random.key`` or a raw ``PRNGKey``).
      step: 0 for x_T; ``k + 1`` for the ``k``-th update.
      shape: ``[B, ...]``, the batch's shape.
      first_index: the run-wide index of the batch's first example.

    Returns:
      float32 noise of ``shape``.

    Example:
      >>> x_T = step_noise(jax.random.key(0), 0, (16, 32, 32, 3), first_index=16)
    """
    indices = first_index + jnp.arange(shape[0], dtype=jnp.int32)

    def one(index: jax.Array) -> jax.Array:
        example_key = jax.random.fold_in(jax.random.fold_in(key, index), step)
        return jax.random.normal(example_key, shape[1:], jnp.float32)

    return jax.vmap(one)(indices)


# x_T is drawn by its own small program, compiled once per shape: deterministic loops then
# hold no PRNG code, which XLA:CPU takes about a second to compile.
@_runtime.jit(static_argnums=2)
def initial_noise(key: jax.Array, first_index: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """x_T, ``step_noise(key, 0, shape, first_index)``, as its own compiled program."""
    return step_noise(key, 0, shape, first_index)
