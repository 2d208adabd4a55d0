"""The FID Inception network (InceptionV3 as the standard FID and IS implementations use it).

A Flax Linen port of pytorch-fid's ``fid_inception_v3``: TensorFlow's 2015-12-05 Inception
graph as FID (Heusel et al., 2017) and the Inception Score (Salimans et al., 2016) were defined
on, which differs from torchvision's InceptionV3 in three places that change the features:

* ``FIDInceptionA`` / ``FIDInceptionC`` and the first ``FIDInceptionE`` (``Mixed_7b``) average
  their pooling branch over the valid pixels only (``count_include_pad=False``);
* the second ``FIDInceptionE`` (``Mixed_7c``) max-pools its pooling branch instead;
* the classifier has 1008 outputs (TF's graph), not 1000.

Input handling is pytorch-fid's: images in [0, 1] are resized to 299x299 bilinearly
(half-pixel centres, no anti-aliasing: ``F.interpolate(..., align_corners=False)``) and mapped
to [-1, 1]. Every convolution is followed by BatchNorm (eps 1e-3, running statistics) and ReLU.

Parameter names follow the PyTorch module names (``Mixed_5b/branch1x1/conv/kernel``), so
:func:`convert_torch_weights` maps pytorch-fid's ``pt_inception-2015-12-05-6726825d.pth`` one
to one. The weights themselves are never downloaded here: see :mod:`diffusion_jax.evaluation.fid`.

The module is one file (about 425 lines, over the house's ~400) because it mirrors the
reference network block by block, in the reference's order: splitting it would separate blocks
that are only read side by side with pytorch-fid's.

Example:
  >>> model = InceptionV3()
  >>> images = jnp.zeros((2, 32, 32, 3))  # [0, 1]
  >>> variables = model.init(jax.random.key(0), images)  # or fid.load_inception_variables
  >>> out = model.apply(variables, images)
  >>> out["pool"].shape, out["logits"].shape
  ((2, 2048), (2, 1008))
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

__all__ = [
    "FEATURE_DIM",
    "INPUT_SIZE",
    "NUM_LOGITS",
    "FIDInceptionA",
    "FIDInceptionC",
    "FIDInceptionE",
    "InceptionB",
    "InceptionD",
    "InceptionV3",
    "convert_torch_weights",
    "resize_bilinear",
    "variable_shapes",
]

INPUT_SIZE = 299
"""Height and width the network sees."""

FEATURE_DIM = 2048
"""Width of the pool features FID is computed on."""

NUM_LOGITS = 1008
"""Outputs of the classifier (TF's graph: 1000 ImageNet classes and 8 unused)."""

BATCHNORM_EPS = 1e-3  # TF's Inception; torchvision's BasicConv2d uses the same.

Precision = Any


def resize_bilinear(images: jax.Array, size: int) -> jax.Array:
    """Bilinear resize as PyTorch's ``F.interpolate(mode="bilinear", align_corners=False)``.

    Half-pixel centres and no anti-aliasing filter (JAX's default anti-aliases when shrinking,
    PyTorch's does not), so downsampled images match pytorch-fid too.

    Args:
      images: float ``[B, H, W, C]``.
      size: output height and width.

    Returns:
      ``[B, size, size, C]``.
    """
    batch, _, _, channels = images.shape
    return jax.image.resize(
        images, (batch, size, size, channels), method="bilinear", antialias=False
    )


class BasicConv(nn.Module):
    """Conv (no bias) -> BatchNorm (running statistics, eps 1e-3) -> ReLU.

    Attributes:
      features: output channels.
      kernel_size: ``(kh, kw)``.
      strides: ``(sh, sw)``.
      padding: ``(ph, pw)``, symmetric zero padding as PyTorch's ``padding=``.
      precision: precision of the convolution.
    """

    features: int
    kernel_size: tuple[int, int]
    strides: tuple[int, int] = (1, 1)
    padding: tuple[int, int] = (0, 0)
    precision: Precision = jax.lax.Precision.HIGHEST

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = nn.Conv(
            self.features,
            self.kernel_size,
            strides=self.strides,
            padding=[(p, p) for p in self.padding],
            use_bias=False,
            precision=self.precision,
            name="conv",
        )(x)
        x = nn.BatchNorm(use_running_average=True, epsilon=BATCHNORM_EPS, name="bn")(x)
        return nn.relu(x)


def _avg_pool_3x3(x: jax.Array) -> jax.Array:
    # FID's blocks divide by the number of valid pixels at the borders (count_include_pad=False).
    return nn.avg_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)), count_include_pad=False)


def _max_pool_3x3(x: jax.Array, stride: int) -> jax.Array:
    padding = ((1, 1), (1, 1)) if stride == 1 else "VALID"
    return nn.max_pool(x, (3, 3), strides=(stride, stride), padding=padding)


class FIDInceptionA(nn.Module):
    """35x35 block (``Mixed_5b..5d``): 1x1, 5x5, double 3x3 and average-pool branches.

    Attributes:
      pool_features: output channels of the pooling branch.
      precision: convolution precision.
    """

    pool_features: int
    precision: Precision = jax.lax.Precision.HIGHEST

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        conv = lambda *a, **k: BasicConv(*a, precision=self.precision, **k)
        branch1x1 = conv(64, (1, 1), name="branch1x1")(x)
        branch5x5 = conv(48, (1, 1), name="branch5x5_1")(x)
        branch5x5 = conv(64, (5, 5), padding=(2, 2), name="branch5x5_2")(branch5x5)
        branch3x3dbl = conv(64, (1, 1), name="branch3x3dbl_1")(x)
        branch3x3dbl = conv(96, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(branch3x3dbl)
        branch3x3dbl = conv(96, (3, 3), padding=(1, 1), name="branch3x3dbl_3")(branch3x3dbl)
        branch_pool = conv(self.pool_features, (1, 1), name="branch_pool")(_avg_pool_3x3(x))
        return jnp.concatenate([branch1x1, branch5x5, branch3x3dbl, branch_pool], axis=-1)


class InceptionB(nn.Module):
    """35x35 -> 17x17 reduction (``Mixed_6a``); the same in FID's network as in torchvision's.

    Attributes:
      precision: convolution precision.
    """

    precision: Precision = jax.lax.Precision.HIGHEST

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        conv = lambda *a, **k: BasicConv(*a, precision=self.precision, **k)
        branch3x3 = conv(384, (3, 3), strides=(2, 2), name="branch3x3")(x)
        branch3x3dbl = conv(64, (1, 1), name="branch3x3dbl_1")(x)
        branch3x3dbl = conv(96, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(branch3x3dbl)
        branch3x3dbl = conv(96, (3, 3), strides=(2, 2), name="branch3x3dbl_3")(branch3x3dbl)
        branch_pool = _max_pool_3x3(x, stride=2)
        return jnp.concatenate([branch3x3, branch3x3dbl, branch_pool], axis=-1)


class FIDInceptionC(nn.Module):
    """17x17 block (``Mixed_6b..6e``) with factorised 7x7 convolutions.

    Attributes:
      channels_7x7: width inside the 7x7 branches.
      precision: convolution precision.
    """

    channels_7x7: int
    precision: Precision = jax.lax.Precision.HIGHEST

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        conv = lambda *a, **k: BasicConv(*a, precision=self.precision, **k)
        c7 = self.channels_7x7
        branch1x1 = conv(192, (1, 1), name="branch1x1")(x)
        branch7x7 = conv(c7, (1, 1), name="branch7x7_1")(x)
        branch7x7 = conv(c7, (1, 7), padding=(0, 3), name="branch7x7_2")(branch7x7)
        branch7x7 = conv(192, (7, 1), padding=(3, 0), name="branch7x7_3")(branch7x7)
        dbl = conv(c7, (1, 1), name="branch7x7dbl_1")(x)
        dbl = conv(c7, (7, 1), padding=(3, 0), name="branch7x7dbl_2")(dbl)
        dbl = conv(c7, (1, 7), padding=(0, 3), name="branch7x7dbl_3")(dbl)
        dbl = conv(c7, (7, 1), padding=(3, 0), name="branch7x7dbl_4")(dbl)
        dbl = conv(192, (1, 7), padding=(0, 3), name="branch7x7dbl_5")(dbl)
        branch_pool = conv(192, (1, 1), name="branch_pool")(_avg_pool_3x3(x))
        return jnp.concatenate([branch1x1, branch7x7, dbl, branch_pool], axis=-1)


class InceptionD(nn.Module):
    """17x17 -> 8x8 reduction (``Mixed_7a``); the same in FID's network as in torchvision's.

    Attributes:
      precision: convolution precision.
    """

    precision: Precision = jax.lax.Precision.HIGHEST

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        conv = lambda *a, **k: BasicConv(*a, precision=self.precision, **k)
        branch3x3 = conv(192, (1, 1), name="branch3x3_1")(x)
        branch3x3 = conv(320, (3, 3), strides=(2, 2), name="branch3x3_2")(branch3x3)
        branch7x7x3 = conv(192, (1, 1), name="branch7x7x3_1")(x)
        branch7x7x3 = conv(192, (1, 7), padding=(0, 3), name="branch7x7x3_2")(branch7x7x3)
        branch7x7x3 = conv(192, (7, 1), padding=(3, 0), name="branch7x7x3_3")(branch7x7x3)
        branch7x7x3 = conv(192, (3, 3), strides=(2, 2), name="branch7x7x3_4")(branch7x7x3)
        branch_pool = _max_pool_3x3(x, stride=2)
        return jnp.concatenate([branch3x3, branch7x7x3, branch_pool], axis=-1)


class FIDInceptionE(nn.Module):
    """8x8 block (``Mixed_7b``, ``Mixed_7c``) with split 1x3 / 3x1 branches.

    Attributes:
      pooling: ``"avg"`` (``Mixed_7b``, valid pixels only) or ``"max"`` (``Mixed_7c``): the
        difference between pytorch-fid's ``FIDInceptionE_1`` and ``FIDInceptionE_2``.
      precision: convolution precision.
    """

    pooling: str
    precision: Precision = jax.lax.Precision.HIGHEST

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        if self.pooling not in ("avg", "max"):
            raise ValueError(f"pooling must be 'avg' or 'max', got {self.pooling=}.")
        conv = lambda *a, **k: BasicConv(*a, precision=self.precision, **k)
        branch1x1 = conv(320, (1, 1), name="branch1x1")(x)
        branch3x3 = conv(384, (1, 1), name="branch3x3_1")(x)
        branch3x3 = jnp.concatenate(
            [
                conv(384, (1, 3), padding=(0, 1), name="branch3x3_2a")(branch3x3),
                conv(384, (3, 1), padding=(1, 0), name="branch3x3_2b")(branch3x3),
            ],
            axis=-1,
        )
        dbl = conv(448, (1, 1), name="branch3x3dbl_1")(x)
        dbl = conv(384, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(dbl)
        dbl = jnp.concatenate(
            [
                conv(384, (1, 3), padding=(0, 1), name="branch3x3dbl_3a")(dbl),
                conv(384, (3, 1), padding=(1, 0), name="branch3x3dbl_3b")(dbl),
            ],
            axis=-1,
        )
        pooled = _avg_pool_3x3(x) if self.pooling == "avg" else _max_pool_3x3(x, stride=1)
        branch_pool = conv(192, (1, 1), name="branch_pool")(pooled)
        return jnp.concatenate([branch1x1, branch3x3, dbl, branch_pool], axis=-1)


class _Classifier(nn.Module):
    """The 2048 -> 1008 linear head; returns the logits with and without the bias."""

    precision: Precision = jax.lax.Precision.HIGHEST

    @nn.compact
    def __call__(self, pool: jax.Array) -> tuple[jax.Array, jax.Array]:
        kernel = self.param("kernel", nn.initializers.lecun_normal(), (pool.shape[-1], NUM_LOGITS))
        bias = self.param("bias", nn.initializers.zeros, (NUM_LOGITS,))
        unbiased = jnp.dot(pool, kernel, precision=self.precision)
        return unbiased + bias, unbiased


class InceptionV3(nn.Module):
    """pytorch-fid's FID InceptionV3: pool features (FID) and the 1008 logits (IS).

    Variables: ``{"params", "batch_stats"}`` (inference only: BatchNorm always uses its running
    statistics, and there is no dropout).

    Attributes:
      resize_input: resize inputs to 299x299 (bilinear, as pytorch-fid); without it the input
        must already be 299x299.
      normalize_input: map inputs from [0, 1] to [-1, 1]; without it inputs must be in [-1, 1].
      precision: precision of the convolutions and the classifier. ``HIGHEST`` by default so
        that accelerators do not silently use TF32 / bfloat16 passes for the features.
    """

    resize_input: bool = True
    normalize_input: bool = True
    precision: Precision = jax.lax.Precision.HIGHEST

    @nn.compact
    def __call__(self, images: jax.Array) -> dict[str, jax.Array]:
        """Features of a batch of images.

        Args:
          images: float ``[B, H, W, 3]`` RGB in [0, 1] (see the attributes).

        Returns:
          ``{"pool": [B, 2048], "logits": [B, 1008], "logits_unbiased": [B, 1008]}``, float32:
          the final average-pool features (FID's), the classifier's logits, and the logits
          without the classifier's bias (what the original Inception Score code used).
        """
        if images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"images must be [B, H, W, 3], got {images.shape=}.")
        x = images.astype(jnp.float32)
        if self.resize_input:
            x = resize_bilinear(x, INPUT_SIZE)
        elif x.shape[1:3] != (INPUT_SIZE, INPUT_SIZE):
            raise ValueError(f"Without resize_input, images must be 299x299, got {x.shape=}.")
        if self.normalize_input:
            x = 2.0 * x - 1.0
        p = {"precision": self.precision}
        x = BasicConv(32, (3, 3), strides=(2, 2), name="Conv2d_1a_3x3", **p)(x)  # 149
        x = BasicConv(32, (3, 3), name="Conv2d_2a_3x3", **p)(x)  # 147
        x = BasicConv(64, (3, 3), padding=(1, 1), name="Conv2d_2b_3x3", **p)(x)
        x = _max_pool_3x3(x, stride=2)  # 73
        x = BasicConv(80, (1, 1), name="Conv2d_3b_1x1", **p)(x)
        x = BasicConv(192, (3, 3), name="Conv2d_4a_3x3", **p)(x)  # 71
        x = _max_pool_3x3(x, stride=2)  # 35
        x = FIDInceptionA(32, name="Mixed_5b", **p)(x)
        x = FIDInceptionA(64, name="Mixed_5c", **p)(x)
        x = FIDInceptionA(64, name="Mixed_5d", **p)(x)
        x = InceptionB(name="Mixed_6a", **p)(x)  # 17
        x = FIDInceptionC(128, name="Mixed_6b", **p)(x)
        x = FIDInceptionC(160, name="Mixed_6c", **p)(x)
        x = FIDInceptionC(160, name="Mixed_6d", **p)(x)
        x = FIDInceptionC(192, name="Mixed_6e", **p)(x)
        x = InceptionD(name="Mixed_7a", **p)(x)  # 8
        x = FIDInceptionE("avg", name="Mixed_7b", **p)(x)
        x = FIDInceptionE("max", name="Mixed_7c", **p)(x)
        pool = jnp.mean(x, axis=(1, 2))
        logits, unbiased = _Classifier(name="fc", **p)(pool)
        return {"pool": pool, "logits": logits, "logits_unbiased": unbiased}


# PyTorch parameter name -> (collection, Flax name, layout change).
_TORCH_LEAVES = {
    "conv.weight": ("params", "conv/kernel", lambda w: w.transpose(2, 3, 1, 0)),  # OIHW->HWIO
    "bn.weight": ("params", "bn/scale", None),
    "bn.bias": ("params", "bn/bias", None),
    "bn.running_mean": ("batch_stats", "bn/mean", None),
    "bn.running_var": ("batch_stats", "bn/var", None),
}
# Buffers and heads pytorch-fid's network does not use.
_TORCH_IGNORED_SUFFIXES = ("num_batches_tracked",)
_TORCH_IGNORED_PREFIXES = ("AuxLogits.",)


def convert_torch_weights(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """Converts pytorch-fid's FID Inception ``state_dict`` to this module's variables.

    The input is what ``torch.load("pt_inception-2015-12-05-6726825d.pth")`` returns (or the
    ``state_dict()`` of pytorch-fid's ``fid_inception_v3()``): tensors or arrays keyed by
    torchvision's ``Inception3`` names. Convolution kernels go from OIHW to HWIO, the linear
    layer from ``[out, in]`` to ``[in, out]``; BatchNorm running statistics become
    ``batch_stats``.

    Args:
      state_dict: name -> tensor (``torch.Tensor`` or anything ``np.asarray`` accepts).

    Returns:
      ``{"params": ..., "batch_stats": ...}`` as nested dicts of float32 NumPy arrays, ready
      for ``InceptionV3().apply``.

    Raises:
      ValueError: keys or shapes that do not match :class:`InceptionV3` (up to ten of each
        kind listed).
    """
    flat: dict[tuple[str, ...], np.ndarray] = {}
    unexpected = []
    for key, value in state_dict.items():
        if key.endswith(_TORCH_IGNORED_SUFFIXES) or key.startswith(_TORCH_IGNORED_PREFIXES):
            continue
        if hasattr(value, "detach"):  # a torch.Tensor; no torch import needed here
            value = value.detach().cpu().numpy()
        value = np.asarray(value, dtype=np.float32)
        if key == "fc.weight":
            flat[("params", "fc", "kernel")] = np.ascontiguousarray(value.T)
            continue
        if key == "fc.bias":
            flat[("params", "fc", "bias")] = value
            continue
        for suffix, (collection, name, change) in _TORCH_LEAVES.items():
            if key.endswith("." + suffix):
                module = key[: -len(suffix) - 1].split(".")
                value = change(value) if change else value
                flat[(collection, *module, *name.split("/"))] = np.ascontiguousarray(value)
                break
        else:
            unexpected.append(key)

    expected = variable_shapes()
    missing = sorted("/".join(k) for k in expected.keys() - flat.keys())
    unexpected += sorted("/".join(k) for k in flat.keys() - expected.keys())
    wrong = [
        f"{'/'.join(k)}: {flat[k].shape} != {expected[k]}"
        for k in sorted(expected.keys() & flat.keys())
        if flat[k].shape != expected[k]
    ]
    if missing or unexpected or wrong:
        raise ValueError(
            "state_dict is not pytorch-fid's FID Inception: "
            f"missing={missing[:10]}{'...' if len(missing) > 10 else ''} "
            f"unexpected={unexpected[:10]}{'...' if len(unexpected) > 10 else ''} "
            f"wrong shapes={wrong[:10]}"
        )
    return traverse_util.unflatten_dict(flat)


@functools.lru_cache(maxsize=1)
def variable_shapes() -> dict[tuple[str, ...], tuple[int, ...]]:
    """The shapes of :class:`InceptionV3`'s variables, flattened.

    Returns:
      ``{("params", "Mixed_5b", "branch1x1", "conv", "kernel"): (1, 1, 192, 64), ...}``.
    """
    shapes = jax.eval_shape(
        lambda: InceptionV3().init(jax.random.key(0), jnp.zeros((1, INPUT_SIZE, INPUT_SIZE, 3)))
    )
    return {k: tuple(v.shape) for k, v in traverse_util.flatten_dict(shapes).items()}
