"""Building blocks shared by the denoisers: timestep embedding, resampling, GroupNorm.

Each is written in the formulation XLA:CPU runs fastest, without changing the math: nearest
upsampling as broadcast+reshape (``jax.image.resize``'s backward pass is far slower), and a
:class:`GroupNorm` that reduces over the pixels first (in place of ``flax.linen.GroupNorm``).
The figures: ``benchmarks/README.md``, "U-Net formulations".
"""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

# The initialiser of the DDPM reference code (``default_init`` in Ho et al.'s diffusion_tf):
# variance scaling, fan-average, uniform. Layers it marks ``init_scale=0`` start at zero here.
default_kernel_init = nn.initializers.variance_scaling(1.0, "fan_avg", "uniform")
zero_init = nn.initializers.zeros


def require_dropout_key(module: nn.Module, train: bool, rate: float) -> None:
    """Raises a ValueError saying how to pass the key when ``module`` would drop out (``train``
    and ``rate > 0``) but was applied without ``rngs={"dropout": key}``."""
    if train and rate > 0 and not module.has_rng("dropout"):
        raise ValueError(
            f"train=True with dropout={rate} needs a dropout key: "
            "apply(..., train=True, rngs={'dropout': key})"
        )


def timestep_embedding(
    t: jax.Array,
    dim: int,
    max_period: float = 10000.0,
    *,
    flip_sin_to_cos: bool = False,
    freq_shift: float = 1.0,
) -> jax.Array:
    """Sinusoidal embedding of (possibly fractional) timesteps, as in DDPM and the Transformer.

    Frequencies are ``exp(-log(max_period) * i / (dim // 2 - freq_shift))`` for
    ``i = 0 .. dim // 2 - 1``; the first half of the output holds the sines and the second the
    cosines, or the other way round with ``flip_sin_to_cos`` (an odd ``dim`` gets one trailing
    zero). DDPM uses ``freq_shift=1`` and sines first (the defaults); improved-diffusion
    ``freq_shift=0`` and cosines first; diffusers names the two ``freq_shift`` and
    ``flip_sin_to_cos``. Always computed in float32.

    Args:
      t: timesteps, shape ``[B]``, integer or float.
      dim: embedding width, at least 2.
      max_period: longest period of the sinusoids.
      flip_sin_to_cos: put the cosines first.
      freq_shift: subtracted from ``dim // 2`` in the frequencies' denominator (a
        denominator that would not be positive is taken as 1).

    Returns:
      float32 array of shape ``[B, dim]``.

    Example:
      >>> timestep_embedding(jnp.array([0, 999]), 128).shape
      (2, 128)
      >>> timestep_embedding(jnp.array([0]), 4, flip_sin_to_cos=True, freq_shift=0.0)[0, 0]
      Array(1., dtype=float32)
    """
    if dim < 2:
        raise ValueError(f"timestep embedding needs dim >= 2; got {dim=}")
    if t.ndim != 1:
        raise ValueError(f"timesteps must have shape [B]; got shape {t.shape}")
    half = dim // 2
    # A non-positive denominator (dim in {2, 3} with the default shift) means one frequency, 1.
    denominator = half - freq_shift if half - freq_shift > 0 else 1.0
    # The order of operations of diffusers' and improved-diffusion's float32 code, so that a
    # converted network sees the same rounded frequencies.
    freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / denominator)
    args = t.astype(jnp.float32)[:, None] * freqs[None, :]
    waves = (jnp.cos(args), jnp.sin(args)) if flip_sin_to_cos else (jnp.sin(args), jnp.cos(args))
    embedding = jnp.concatenate(waves, axis=-1)
    if dim % 2:
        embedding = jnp.pad(embedding, ((0, 0), (0, 1)))
    return embedding


def upsample_nearest_2x(x: jax.Array) -> jax.Array:
    """Nearest-neighbour upsampling by 2 in height and width.

    Same result as ``jax.image.resize(x, (B, 2H, 2W, C), "nearest")`` or ``jnp.repeat`` twice,
    written as broadcast+reshape so that its backward pass is a cheap reduction on XLA:CPU.

    Args:
      x: ``[B, H, W, C]``.

    Returns:
      ``[B, 2H, 2W, C]``, same dtype.
    """
    batch, height, width, channels = x.shape
    x = jnp.broadcast_to(x[:, :, None, :, None, :], (batch, height, 2, width, 2, channels))
    return x.reshape(batch, 2 * height, 2 * width, channels)


def avg_pool_2x(x: jax.Array) -> jax.Array:
    """2x2 average pooling with stride 2 (the DDPM downsampling without convolution).

    Args:
      x: ``[B, H, W, C]`` with even ``H`` and ``W``.

    Returns:
      ``[B, H // 2, W // 2, C]``, same dtype.
    """
    batch, height, width, channels = x.shape
    x = x.reshape(batch, height // 2, 2, width // 2, 2, channels)
    return x.mean(axis=(2, 4)).astype(x.dtype)


class GroupNorm(nn.Module):
    """Group normalisation (Wu & He 2018) over NHWC (or any ``[B, ..., C]``) inputs, in float32.

    The same function and parameters (``scale`` and ``bias``, shape ``[C]``) as
    ``flax.linen.GroupNorm(num_groups, epsilon=epsilon, dtype=jnp.float32)`` with its default
    one-pass variance ``E[x^2] - E[x]^2``; the statistics are reduced per channel over the
    pixels first, then per group, which XLA:CPU runs and compiles faster (module docstring).

    Attributes:
      num_groups: number of groups; must divide the channel count.
      epsilon: added to the variance.
    """

    num_groups: int = 32
    epsilon: float = 1e-6

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """Normalises ``x``.

        Args:
          x: ``[B, ..., C]``, any float dtype.

        Returns:
          float32 array of ``x``'s shape.
        """
        channels = x.shape[-1]
        if channels % self.num_groups:
            raise ValueError(
                f"GroupNorm(num_groups={self.num_groups}) got {channels} channels, which is not "
                "divisible by it; choose num_groups dividing every channel count"
            )
        scale = self.param("scale", nn.initializers.ones, (channels,), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (channels,), jnp.float32)
        batch, group_size = x.shape[0], channels // self.num_groups
        x = x.astype(jnp.float32)
        pixels = x.reshape(batch, -1, channels)
        mean = jnp.mean(pixels, axis=1).reshape(batch, self.num_groups, group_size).mean(-1)
        mean_sq = jnp.mean(jnp.square(pixels), axis=1)
        mean_sq = mean_sq.reshape(batch, self.num_groups, group_size).mean(-1)
        # max(., 0): rounding can make the one-pass variance slightly negative.
        inv_std = lax.rsqrt(jnp.maximum(mean_sq - jnp.square(mean), 0.0) + self.epsilon)
        channel_scale = jnp.repeat(inv_std, group_size, axis=1) * scale  # [B, C]
        channel_shift = bias - jnp.repeat(mean, group_size, axis=1) * channel_scale
        broadcast = (batch,) + (1,) * (x.ndim - 2) + (channels,)
        return x * channel_scale.reshape(broadcast) + channel_shift.reshape(broadcast)
