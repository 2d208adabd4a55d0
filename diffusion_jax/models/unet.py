"""The DDPM U-Net (Ho et al. 2020) in Flax Linen, with the ADM options (Dhariwal & Nichol 2021).

The default configuration is the network of the DDPM reference code (``diffusion_tf``): a
sinusoidal timestep embedding through a 2-layer MLP; ResNet blocks (GroupNorm -> SiLU -> 3x3
conv, time embedding projected and added, GroupNorm -> SiLU -> dropout -> 3x3 conv, 1x1 skip
when the channel count changes); single-head self-attention at the configured resolutions;
strided-conv downsampling and nearest+conv upsampling; skip connections between the paths.
With ``ch=128, ch_mult=(1, 2, 2, 2), num_res_blocks=2, attn_resolutions=(16,)`` on 32x32x3 it
has the published 35.7M parameters (35,746,307).

Options from ADM: several attention heads, scale-shift (FiLM) time conditioning
(``use_scale_shift_norm``), BigGAN-style residual up/downsampling (``resblock_updown``), and
class conditioning with a null label for classifier-free guidance.

Options for published networks (``diffusion_jax.convert``), none changing the parameter tree:
GroupNorm epsilon (``norm_eps``), symmetric padding of the strided convolutions
(``downsample_padding``), the timestep embedding's layout (``flip_sin_to_cos``,
``freq_shift``) and input scale (``timestep_scale``), and heads of a fixed width (``head_dim``).

Mixed precision: ``dtype`` is the compute dtype (e.g. ``jnp.bfloat16``); parameters stay
float32; GroupNorm statistics, the attention logits and softmax run in float32, and the output
is returned in float32.

Details of the reference kept here by default: GroupNorm epsilon 1e-6; stride-2 convolutions pad
"SAME" (one extra row/column at the bottom/right, as TensorFlow); sines before cosines in the
timestep embedding; variance-scaling (fan-average,
uniform) initialisation, with the layers the reference scales by 0 (second conv of each
ResNet block, attention output projection, output conv) starting at zero.

On XLA:CPU the formulations were chosen by measurement (``benchmarks/unet_formulations.py``):
nearest upsampling as broadcast+reshape, GroupNorm reducing over the pixels first, NHWC
convolutions with XLA's own weight gradients, attention as two einsums with q pre-scaled.
"""

from collections.abc import Sequence
from typing import Any, Literal

import flax.linen as nn
import jax
import jax.numpy as jnp

from diffusion_jax.models.layers import (
    GroupNorm,
    avg_pool_2x,
    default_kernel_init,
    require_dropout_key,
    timestep_embedding,
    upsample_nearest_2x,
    zero_init,
)

Dtype = Any


def _dense(features: int, dtype: Dtype, name: str, zero: bool = False) -> nn.Dense:
    return nn.Dense(
        features,
        dtype=dtype,
        param_dtype=jnp.float32,
        kernel_init=zero_init if zero else default_kernel_init,
        name=name,
    )


def _conv(
    features: int,
    dtype: Dtype,
    name: str,
    zero: bool = False,
    strides: int = 1,
    padding: str | tuple = "SAME",
) -> nn.Conv:
    return nn.Conv(
        features,
        (3, 3),
        strides=(strides, strides),
        padding=padding,
        dtype=dtype,
        param_dtype=jnp.float32,
        kernel_init=zero_init if zero else default_kernel_init,
        name=name,
    )


def _group_norm(num_groups: int, name: str, epsilon: float = 1e-6) -> GroupNorm:
    # Statistics and output in float32 whatever the compute dtype; the next conv casts back.
    return GroupNorm(num_groups=num_groups, epsilon=epsilon, name=name)


class ResBlock(nn.Module):
    """DDPM ResNet block, optionally with FiLM conditioning and resampling (ADM).

    Attributes:
      out_ch: output channels.
      dropout: dropout rate before the second convolution.
      num_groups: GroupNorm groups.
      use_scale_shift_norm: condition by ``norm(h) * (1 + scale) + shift`` (ADM) instead of
        adding the projected embedding before the second norm (DDPM).
      resample: ``None``, ``"up"`` or ``"down"``: resample inside the block (BigGAN/ADM style,
        nearest upsampling or average pooling, applied to both paths).
      dtype: compute dtype.
      norm_eps: GroupNorm epsilon.
    """

    out_ch: int
    dropout: float = 0.0
    num_groups: int = 32
    use_scale_shift_norm: bool = False
    resample: str | None = None
    dtype: Dtype = jnp.float32
    norm_eps: float = 1e-6

    @nn.compact
    def __call__(self, x: jax.Array, temb: jax.Array, train: bool) -> jax.Array:
        """Applies the block.

        Args:
          x: ``[B, H, W, C_in]``.
          temb: ``[B, E]`` conditioning embedding (time, plus class if any).
          train: enables dropout (needs the ``"dropout"`` rng).

        Returns:
          ``[B, H', W', out_ch]`` with ``H' = 2H``, ``H/2`` or ``H`` for up, down or no
          resampling.
        """
        h = nn.silu(_group_norm(self.num_groups, "norm1", self.norm_eps)(x))
        if self.resample is not None:
            resample = upsample_nearest_2x if self.resample == "up" else avg_pool_2x
            h, x = resample(h), resample(x)
        h = _conv(self.out_ch, self.dtype, "conv1")(h)
        emb_ch = 2 * self.out_ch if self.use_scale_shift_norm else self.out_ch
        emb = _dense(emb_ch, self.dtype, "temb_proj")(nn.silu(temb))[:, None, None, :]
        if self.use_scale_shift_norm:
            scale, shift = jnp.split(emb.astype(jnp.float32), 2, axis=-1)
            h = _group_norm(self.num_groups, "norm2", self.norm_eps)(h) * (1 + scale) + shift
        else:
            h = _group_norm(self.num_groups, "norm2", self.norm_eps)(h + emb)
        h = nn.silu(h)
        h = nn.Dropout(self.dropout, deterministic=not train)(h)
        h = _conv(self.out_ch, self.dtype, "conv2", zero=True)(h)
        if x.shape[-1] != self.out_ch:
            x = _dense(self.out_ch, self.dtype, "skip")(x)
        return x.astype(self.dtype) + h


class AttnBlock(nn.Module):
    """Multi-head self-attention over the pixels of a feature map, with a residual connection.

    With one head this is the DDPM attention block. The logits are accumulated and
    soft-maxed in float32. Head ``n`` sees channels ``n * head_dim .. (n + 1) * head_dim - 1``
    of q, k and v (diffusers' and improved-diffusion's split).

    Attributes:
      num_heads: attention heads; must divide the channel count.
      num_groups: GroupNorm groups.
      dtype: compute dtype.
      head_dim: channels per head; when set, ``channels // head_dim`` heads (``num_heads`` is
        ignored) and it must divide the channel count.
      norm_eps: GroupNorm epsilon.
    """

    num_heads: int = 1
    num_groups: int = 32
    dtype: Dtype = jnp.float32
    head_dim: int | None = None
    norm_eps: float = 1e-6

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """Applies the block.

        Args:
          x: ``[B, H, W, C]``.

        Returns:
          ``[B, H, W, C]``.
        """
        batch, height, width, channels = x.shape
        if self.head_dim is not None:
            if channels % self.head_dim:
                raise ValueError(
                    f"head_dim={self.head_dim} must divide the channel count of every attention "
                    f"block; {channels} is not divisible by it"
                )
            num_heads, head_dim = channels // self.head_dim, self.head_dim
        else:
            num_heads, head_dim = self.num_heads, channels // self.num_heads
        h = _group_norm(self.num_groups, "norm", self.norm_eps)(x)
        h = h.reshape(batch, height * width, channels)
        q, k, v = (
            _dense(channels, self.dtype, name)(h).reshape(batch, -1, num_heads, head_dim)
            for name in ("q", "k", "v")
        )
        # Scaling q before the product is cheaper than scaling the [B, heads, HW, HW] logits.
        q = q * jnp.asarray(head_dim**-0.5, q.dtype)
        logits = jnp.einsum("bqnd,bknd->bnqk", q, k, preferred_element_type=jnp.float32)
        weights = jax.nn.softmax(logits, axis=-1).astype(self.dtype)
        h = jnp.einsum("bnqk,bknd->bqnd", weights, v).reshape(batch, height, width, channels)
        h = _dense(channels, self.dtype, "proj_out", zero=True)(h)
        return x.astype(self.dtype) + h


class UNet(nn.Module):
    """The DDPM/ADM U-Net noise-prediction network.

    Attributes:
      ch: base channel count.
      ch_mult: channel multiplier per resolution level; ``len(ch_mult)`` levels, with
        ``len(ch_mult) - 1`` downsamplings.
      num_res_blocks: ResNet blocks per level on the way down (one more on the way up).
      attn_resolutions: feature-map heights, in pixels, that get self-attention (e.g.
        ``(16,)`` for attention at 16x16 in a 32x32 model); each must be one of the heights
        ``H // 2**level`` of the input, else ``ValueError``. Which levels attend depends on
        the input size, so the parameter tree is tied to the resolution used at ``init``.
      dropout: dropout rate inside the ResNet blocks.
      out_channels: output channels: C to predict eps, x0 or v; 2C for a learned variance.
      num_classes: number of classes for class conditioning, or ``None`` (unconditional).
        Labels are ``0 .. num_classes - 1`` and the null label ``num_classes`` (the
        unconditional pass of classifier-free guidance). Labels are traced, so an
        out-of-range label cannot raise under ``jit``: it yields NaN outputs. Validate labels
        on the host.
      dtype: compute dtype (float32 or bfloat16); parameters are always float32.
      num_groups: GroupNorm groups; every channel count ``ch * m`` must be divisible by it.
      num_heads: attention heads.
      conv_resample: resample with convolutions (DDPM); else average pooling and plain
        nearest upsampling.
      resblock_updown: resample inside ResNet blocks (BigGAN/ADM) instead of separate layers.
      use_scale_shift_norm: FiLM time conditioning (ADM) instead of additive (DDPM).
      remat: rematerialise the ResNet blocks in the backward pass (saves memory, costs one
        more forward of each block).
      norm_eps: the epsilon of every GroupNorm (DDPM 1e-6; improved-diffusion 1e-5; diffusers
        ``norm_eps``).
      downsample_padding: padding of the stride-2 downsampling convolutions: ``"same"``
        (TensorFlow's: 0 rows/columns before, 1 after; DDPM, diffusers
        ``downsample_padding=0``) or ``"symmetric"`` (1 on every side; improved-diffusion,
        diffusers ``downsample_padding=1``).
      flip_sin_to_cos: timestep embedding ``[cos, sin]`` instead of ``[sin, cos]``
        (improved-diffusion: True; see :func:`~diffusion_jax.models.layers.timestep_embedding`).
      freq_shift: the embedding's frequency shift (DDPM 1; improved-diffusion 0).
      head_dim: channels per attention head; when set, every attention block has
        ``channels // head_dim`` heads and ``num_heads`` is ignored (diffusers
        ``attention_head_dim``).
      timestep_scale: the embedding sees ``t * timestep_scale`` (improved-diffusion's
        ``rescale_timesteps`` feeds ``t * 1000 / T``).

    The last six default to the DDPM network; none of them changes the parameter tree.

    Example:
      >>> model = UNet(ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(8,),
      ...              dropout=0.1, out_channels=3, num_groups=8)
      >>> x, t = jnp.zeros((2, 16, 16, 3)), jnp.array([0, 999])
      >>> variables = model.init(jax.random.key(0), x, t)
      >>> model.apply(variables, x, t).shape
      (2, 16, 16, 3)
    """

    ch: int
    ch_mult: Sequence[int]
    num_res_blocks: int
    attn_resolutions: Sequence[int]
    dropout: float
    out_channels: int
    num_classes: int | None = None
    dtype: Dtype = jnp.float32
    num_groups: int = 32
    num_heads: int = 1
    conv_resample: bool = True
    resblock_updown: bool = False
    use_scale_shift_norm: bool = False
    remat: bool = False
    norm_eps: float = 1e-6
    downsample_padding: Literal["same", "symmetric"] = "same"
    flip_sin_to_cos: bool = False
    freq_shift: float = 1.0
    head_dim: int | None = None
    timestep_scale: float = 1.0

    def _check_config(self) -> None:
        channel_counts = sorted({self.ch} | {self.ch * m for m in self.ch_mult})
        bad = [c for c in channel_counts if c % self.num_groups]
        if bad:
            raise ValueError(
                f"GroupNorm with num_groups={self.num_groups} needs every channel count to be "
                f"divisible by it; channel counts {bad} (from ch={self.ch}, "
                f"ch_mult={tuple(self.ch_mult)}) are not. Choose num_groups dividing {self.ch}."
            )
        bad = [self.ch * m for m in self.ch_mult if (self.ch * m) % self.num_heads]
        if bad and self.head_dim is None:
            raise ValueError(
                f"num_heads={self.num_heads} must divide the channel counts; {bad} are not "
                "divisible."
            )
        if self.head_dim is not None and self.head_dim < 1:
            raise ValueError(f"head_dim must be a positive integer or None; got {self.head_dim=}")
        if self.downsample_padding not in ("same", "symmetric"):
            raise ValueError(
                f"downsample_padding must be 'same' or 'symmetric'; got {self.downsample_padding=}"
            )
        if self.num_classes is not None and self.num_classes < 1:
            raise ValueError(f"num_classes must be positive or None; got {self.num_classes=}")

    def _check_inputs(self, x: jax.Array, t: jax.Array, y: jax.Array | None, train: bool) -> None:
        if x.ndim != 4:
            raise ValueError(f"UNet expects x of shape [B, H, W, C]; got shape {x.shape}")
        if not jnp.issubdtype(x.dtype, jnp.floating):
            raise ValueError(f"UNet expects floating-point x; got dtype {x.dtype}")
        batch, height, width, _ = x.shape
        factor = 2 ** (len(self.ch_mult) - 1)
        if height % factor or width % factor:
            raise ValueError(
                f"UNet input height and width must be divisible by 2**(len(ch_mult) - 1) = "
                f"{factor} (ch_mult={tuple(self.ch_mult)}); got {height}x{width}"
            )
        heights = [height // 2**level for level in range(len(self.ch_mult))]
        unused = [r for r in self.attn_resolutions if r not in heights]
        if unused:
            raise ValueError(
                f"attn_resolutions {tuple(self.attn_resolutions)} contains {unused}, which are "
                f"not feature-map heights of a {height}x{width} input (heights {heights}): "
                "give attention resolutions in pixels of the feature maps"
            )
        if t.shape != (batch,):
            raise ValueError(f"t must have shape [B] = ({batch},); got shape {t.shape}")
        if self.num_classes is None and y is not None:
            raise ValueError("labels y were given to an unconditional UNet (num_classes=None)")
        if self.num_classes is not None:
            if y is None:
                raise ValueError(
                    f"this UNet is class-conditional (num_classes={self.num_classes}): pass "
                    f"labels y of shape [B]; y={self.num_classes} is the null label for an "
                    "unconditional pass"
                )
            if y.shape != (batch,) or not jnp.issubdtype(y.dtype, jnp.integer):
                raise ValueError(f"y must be integer labels of shape ({batch},); got {y.shape=}")
        require_dropout_key(self, train, self.dropout)

    @nn.compact
    def __call__(
        self, x: jax.Array, t: jax.Array, y: jax.Array | None = None, train: bool = False
    ) -> jax.Array:
        """Predicts the network output for noisy images ``x`` at timesteps ``t``.

        Args:
          x: ``[B, H, W, C]`` float images; ``H`` and ``W`` divisible by
            ``2 ** (len(ch_mult) - 1)``.
          t: ``[B]`` timesteps (int32; floats are accepted for continuous-time samplers).
          y: ``[B]`` int labels in ``0 .. num_classes`` (``num_classes`` is the null label);
            required if and only if ``num_classes`` is set.
          train: enables dropout; then ``apply`` needs ``rngs={"dropout": key}``.

        Returns:
          ``[B, H, W, out_channels]`` float32.
        """
        self._check_config()
        self._check_inputs(x, t, y, train)
        num_levels = len(self.ch_mult)
        block_cls = nn.remat(ResBlock, static_argnums=(3,)) if self.remat else ResBlock

        def res_block(h, out_ch, name, resample=None):
            block = block_cls(
                out_ch,
                dropout=self.dropout,
                num_groups=self.num_groups,
                use_scale_shift_norm=self.use_scale_shift_norm,
                resample=resample,
                dtype=self.dtype,
                norm_eps=self.norm_eps,
                name=name,
            )
            return block(h, temb, train)

        def attn_block(h, name):
            return AttnBlock(
                self.num_heads,
                self.num_groups,
                self.dtype,
                head_dim=self.head_dim,
                norm_eps=self.norm_eps,
                name=name,
            )(h)

        temb_dim = 4 * self.ch
        if self.timestep_scale != 1.0:
            t = t.astype(jnp.float32) * self.timestep_scale
        temb = timestep_embedding(
            t, self.ch, flip_sin_to_cos=self.flip_sin_to_cos, freq_shift=self.freq_shift
        )
        temb = _dense(temb_dim, self.dtype, "temb_dense0")(temb)
        temb = _dense(temb_dim, self.dtype, "temb_dense1")(nn.silu(temb))
        if self.num_classes is not None:
            label_embed = nn.Embed(
                self.num_classes + 1, temb_dim, dtype=self.dtype, name="label_embed"
            )
            temb = temb + label_embed(y)

        # Downsampling path; `skips` holds every feature map the up path will concatenate.
        h = _conv(self.ch, self.dtype, "conv_in")(x)
        skips = [h]
        for level, mult in enumerate(self.ch_mult):
            for block in range(self.num_res_blocks):
                h = res_block(h, self.ch * mult, f"down{level}_block{block}")
                if h.shape[1] in self.attn_resolutions:
                    h = attn_block(h, f"down{level}_attn{block}")
                skips.append(h)
            if level != num_levels - 1:
                name = f"down{level}_downsample"
                if self.resblock_updown:
                    h = res_block(h, h.shape[-1], name, resample="down")
                elif self.conv_resample:
                    padding = "SAME" if self.downsample_padding == "same" else ((1, 1), (1, 1))
                    h = _conv(h.shape[-1], self.dtype, name, strides=2, padding=padding)(h)
                else:
                    h = avg_pool_2x(h)
                skips.append(h)

        h = res_block(h, h.shape[-1], "mid_block0")
        h = attn_block(h, "mid_attn")
        h = res_block(h, h.shape[-1], "mid_block1")

        # Upsampling path: num_res_blocks + 1 blocks per level, each eating one skip.
        for level, mult in reversed(list(enumerate(self.ch_mult))):
            for block in range(self.num_res_blocks + 1):
                h = jnp.concatenate([h, skips.pop().astype(h.dtype)], axis=-1)
                h = res_block(h, self.ch * mult, f"up{level}_block{block}")
                if h.shape[1] in self.attn_resolutions:
                    h = attn_block(h, f"up{level}_attn{block}")
            if level != 0:
                name = f"up{level}_upsample"
                if self.resblock_updown:
                    h = res_block(h, h.shape[-1], name, resample="up")
                else:
                    h = upsample_nearest_2x(h)
                    if self.conv_resample:
                        h = _conv(h.shape[-1], self.dtype, name)(h)
        assert not skips, "every skip connection must be consumed"

        h = nn.silu(_group_norm(self.num_groups, "norm_out", self.norm_eps)(h))
        h = _conv(self.out_channels, self.dtype, "conv_out", zero=True)(h)
        return h.astype(jnp.float32)
