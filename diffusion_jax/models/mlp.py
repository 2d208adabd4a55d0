"""A residual MLP denoiser for low-dimensional data (the 2-D toy sets), in Flax Linen.

Same call convention as the U-Net: ``model.apply(variables, x, t, y=None, train=False)``, so
``make_model_fn`` plugs it into the diffusion core unchanged.
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from diffusion_jax.models.layers import (
    default_kernel_init,
    require_dropout_key,
    timestep_embedding,
    zero_init,
)

Dtype = Any


class MLP(nn.Module):
    """Residual MLP that predicts eps (or x0, v, ...) for points ``x`` of shape ``[B, D]``.

    ``x`` goes through an input projection to ``features``, then ``num_layers`` residual
    blocks ``h += Dense(dropout(silu(Dense(silu(LayerNorm(h))) + Dense(silu(emb)))))``, and a
    final LayerNorm -> SiLU -> Dense to ``out_dim``. ``emb`` is the sinusoidal timestep
    embedding through a 2-layer MLP, plus a learned class embedding when ``num_classes`` is
    set. The last layer starts at zero, as in the U-Net.

    Attributes:
      features: hidden width.
      num_layers: number of residual blocks (depth).
      out_dim: output width; ``None`` means the input width ``D`` (use ``2 * D`` for a
        learned variance).
      num_classes: classes for conditioning, or ``None``. Labels are ``0 .. num_classes - 1``
        and the null label ``num_classes`` (classifier-free guidance); out-of-range labels
        yield NaN under ``jit``, so validate them on the host.
      time_embed_dim: width of the sinusoidal embedding; ``None`` means ``features``.
      dropout: dropout rate inside the blocks.
      dtype: compute dtype; parameters and LayerNorm statistics are float32.

    Example:
      >>> model = MLP(features=64, num_layers=2)
      >>> x, t = jnp.zeros((5, 2)), jnp.arange(5)
      >>> variables = model.init(jax.random.key(0), x, t)
      >>> model.apply(variables, x, t).shape
      (5, 2)
    """

    features: int = 128
    num_layers: int = 3
    out_dim: int | None = None
    num_classes: int | None = None
    time_embed_dim: int | None = None
    dropout: float = 0.0
    dtype: Dtype = jnp.float32

    def _dense(self, features: int, name: str, zero: bool = False) -> nn.Dense:
        return nn.Dense(
            features,
            dtype=self.dtype,
            param_dtype=jnp.float32,
            kernel_init=zero_init if zero else default_kernel_init,
            name=name,
        )

    def _check_inputs(self, x: jax.Array, t: jax.Array, y: jax.Array | None, train: bool) -> None:
        if x.ndim != 2:
            raise ValueError(f"MLP expects x of shape [B, D]; got shape {x.shape}")
        if t.shape != (x.shape[0],):
            raise ValueError(f"t must have shape [B] = ({x.shape[0]},); got shape {t.shape}")
        if self.num_classes is None and y is not None:
            raise ValueError("labels y were given to an unconditional MLP (num_classes=None)")
        if self.num_classes is not None and (y is None or y.shape != (x.shape[0],)):
            raise ValueError(
                f"this MLP is class-conditional (num_classes={self.num_classes}): pass integer "
                f"labels y of shape ({x.shape[0]},); y={self.num_classes} is the null label"
            )
        require_dropout_key(self, train, self.dropout)

    @nn.compact
    def __call__(
        self, x: jax.Array, t: jax.Array, y: jax.Array | None = None, train: bool = False
    ) -> jax.Array:
        """Predicts the network output for noisy points ``x`` at timesteps ``t``.

        Args:
          x: ``[B, D]`` float points.
          t: ``[B]`` timesteps (int32, or float for continuous time).
          y: ``[B]`` int labels in ``0 .. num_classes``; required iff ``num_classes`` is set.
          train: enables dropout; then ``apply`` needs ``rngs={"dropout": key}``.

        Returns:
          ``[B, out_dim]`` float32 (``out_dim`` defaults to ``D``).
        """
        self._check_inputs(x, t, y, train)
        emb = timestep_embedding(t, self.time_embed_dim or self.features)
        emb = self._dense(self.features, "temb_dense0")(emb)
        emb = self._dense(self.features, "temb_dense1")(nn.silu(emb))
        if self.num_classes is not None:
            emb = emb + nn.Embed(
                self.num_classes + 1, self.features, dtype=self.dtype, name="label_embed"
            )(y)

        h = self._dense(self.features, "dense_in")(x)
        for layer in range(self.num_layers):
            residual = nn.LayerNorm(dtype=jnp.float32, name=f"block{layer}_norm")(h)
            residual = self._dense(self.features, f"block{layer}_dense0")(nn.silu(residual))
            residual = residual + self._dense(self.features, f"block{layer}_temb")(nn.silu(emb))
            residual = nn.Dropout(self.dropout, deterministic=not train)(nn.silu(residual))
            h = h + self._dense(self.features, f"block{layer}_dense1")(residual)
        h = nn.silu(nn.LayerNorm(dtype=jnp.float32, name="norm_out")(h))
        out = self._dense(self.out_dim or x.shape[-1], "dense_out", zero=True)(h)
        return out.astype(jnp.float32)
