"""A diffusers ``UNet2DModel`` state dict as the parameters of our U-Net.

**The weights** (torch conv ``[out, in, kh, kw]`` -> Flax ``[kh, kw, in, out]``; linear and
1x1 conv ``[out, in]`` -> ``[in, out]``; GroupNorm ``weight`` -> ``scale``):
``time_embedding.linear_1/2`` -> ``temb_dense0/1``; ``conv_in``; ``down_blocks.{l}.resnets.{b}``
-> ``down{l}_block{b}`` (``norm1, conv1, time_emb_proj -> temb_proj, norm2, conv2,
conv_shortcut -> skip``); ``down_blocks.{l}.attentions.{b}`` -> ``down{l}_attn{b}``
(``group_norm -> norm, to_q/to_k/to_v -> q/k/v, to_out.0 -> proj_out``; the deprecated names
``query/key/value/proj_attn`` of the first releases are accepted too);
``down_blocks.{l}.downsamplers.0.conv`` -> ``down{l}_downsample``; ``mid_block.resnets.0/1``,
``mid_block.attentions.0`` -> ``mid_block0/1``, ``mid_attn``; ``up_blocks.{i}`` -> level
``L - 1 - i``: ``up{l}_block{b}``, ``up{l}_attn{b}``, ``up_blocks.{i}.upsamplers.0.conv`` ->
``up{l}_upsample``; ``conv_norm_out`` -> ``norm_out``; ``conv_out``; ``class_embedding``
``[N, 4 c0]`` -> ``label_embed/embedding`` (with a zero null row appended when our table has
N + 1 rows). Every key is used exactly
once and every parameter filled, else one line names the unused or missing key.

``.safetensors`` files are read with ``safetensors.numpy`` (no torch); ``.bin`` needs torch.

Example:
  >>> state = load_state_dict("ddpm-cifar10-32/unet")  # doctest: +SKIP
  >>> params = convert_state_dict(state, config, (32, 32, 3))  # doctest: +SKIP
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import Any

import jax
import ml_collections
import numpy as np
from safetensors.numpy import load_file

from diffusion_jax.models import example_inputs
from diffusion_jax.train import config as config_lib

__all__ = ["WEIGHT_NAMES", "convert_state_dict", "load_state_dict"]

WEIGHT_NAMES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")

_GROUP_NORM = {"weight": "scale", "bias": "bias"}
_RESNET = {
    "norm1": "norm1",
    "conv1": "conv1",
    "time_emb_proj": "temb_proj",
    "norm2": "norm2",
    "conv2": "conv2",
    "conv_shortcut": "skip",
}
_ATTENTION = {
    "group_norm": "norm",
    "to_q": "q",
    "to_k": "k",
    "to_v": "v",
    "to_out.0": "proj_out",
    # The first releases' names (diffusers converts them on load as well).
    "query": "q",
    "key": "k",
    "value": "v",
    "proj_attn": "proj_out",
}
_NORMS = {"norm1", "norm2", "norm", "norm_out"}


def _our_path(key: str, num_levels: int) -> tuple[str, str, str] | None:
    """``(module, layer, leaf)`` of our tree for a diffusers key, or None if it has no place."""
    parts = key.rsplit(".", 1)
    if len(parts) != 2 or parts[1] not in ("weight", "bias"):
        return None
    name, leaf = parts
    patterns = [
        (r"time_embedding\.linear_([12])", lambda m: (f"temb_dense{int(m[1]) - 1}", None)),
        (r"conv_in", lambda m: ("conv_in", None)),
        (r"class_embedding", lambda m: ("label_embed", None)),
        (r"conv_norm_out", lambda m: ("norm_out", None)),
        (r"conv_out", lambda m: ("conv_out", None)),
        (r"down_blocks\.(\d+)\.resnets\.(\d+)\.(\w+)", lambda m: (f"down{m[1]}_block{m[2]}", m[3])),
        (
            r"down_blocks\.(\d+)\.attentions\.(\d+)\.(\w+(?:\.0)?)",
            lambda m: (f"down{m[1]}_attn{m[2]}", m[3]),
        ),
        (r"down_blocks\.(\d+)\.downsamplers\.0\.conv", lambda m: (f"down{m[1]}_downsample", None)),
        (r"mid_block\.resnets\.([01])\.(\w+)", lambda m: (f"mid_block{m[1]}", m[2])),
        (r"mid_block\.attentions\.0\.(\w+(?:\.0)?)", lambda m: ("mid_attn", m[1])),
        (
            r"up_blocks\.(\d+)\.resnets\.(\d+)\.(\w+)",
            lambda m: (f"up{num_levels - 1 - int(m[1])}_block{m[2]}", m[3]),
        ),
        (
            r"up_blocks\.(\d+)\.attentions\.(\d+)\.(\w+(?:\.0)?)",
            lambda m: (f"up{num_levels - 1 - int(m[1])}_attn{m[2]}", m[3]),
        ),
        (
            r"up_blocks\.(\d+)\.upsamplers\.0\.conv",
            lambda m: (f"up{num_levels - 1 - int(m[1])}_upsample", None),
        ),
    ]
    for pattern, place in patterns:
        match = re.fullmatch(pattern, name)
        if match is None:
            continue
        module, layer = place(match)
        if layer is None:
            return module, "", leaf
        table = _ATTENTION if "attn" in module else _RESNET
        if layer not in table:
            return None
        return module, table[layer], leaf
    return None


def _to_flax(value: np.ndarray, leaf: str, target: tuple) -> np.ndarray | None:
    """A torch tensor in the layout of our leaf of shape ``target`` (None if it cannot be)."""
    value = np.asarray(value, np.float32)
    if leaf == "embedding":  # [N, E]; our table may hold one more row, the null label (zeros)
        if value.ndim == 2 and value.shape[0] + 1 == target[0]:
            value = np.concatenate([value, np.zeros_like(value[:1])])
        return value
    if leaf == "bias" or leaf == "scale":
        return value if value.shape == target else None
    if len(target) == 4:  # conv [kh, kw, in, out] <- [out, in, kh, kw]
        return value.transpose(2, 3, 1, 0) if value.ndim == 4 else None
    if len(target) == 2:  # dense [in, out] <- linear [out, in] or 1x1 conv [out, in, 1, 1]
        if value.ndim == 4 and value.shape[2:] == (1, 1):
            value = value[:, :, 0, 0]
        return value.T if value.ndim == 2 else None
    return None


def convert_state_dict(
    state: Mapping[str, np.ndarray],
    config: ml_collections.ConfigDict,
    data_shape: tuple,
    *,
    num_classes: int | None = None,
) -> dict[str, Any]:
    """Maps a ``UNet2DModel`` state dict onto the parameter tree of our U-Net.

    Args:
      state: diffusers key -> array (torch layout).
      config: the converted run config (:func:`build_config`).
      data_shape: ``(H, W, C)``.
      num_classes: our classes for a class-conditional config (``label_embed`` gets
        ``num_classes + 1`` rows; a ``class_embedding`` of ``num_classes`` rows gets a zero null
        row appended), None for an unconditional one.

    Returns:
      Our parameters, a nested dict of float32 NumPy arrays.

    Raises:
      ValueError: one line naming the first unused key, mis-shaped key or missing parameter.
    """
    model = config_lib.build_model(config, data_shape, num_classes)
    x, t, kwargs = example_inputs(data_shape, conditional=num_classes is not None)
    shapes = jax.eval_shape(model.init, jax.random.key(0), x, t, **kwargs)["params"]
    num_levels = len(config.model.ch_mult)
    params: dict[str, dict[str, dict[str, np.ndarray]]] = {}
    for key in sorted(state):
        place = _our_path(key, num_levels)
        if place is None:
            raise ValueError(f"state dict key {key} has no place in the U-Net of config.json")
        module, layer, leaf = place
        targets = shapes.get(module, {})
        node = targets.get(layer, {}) if layer else targets
        if layer in _NORMS or module == "norm_out":
            leaf = _GROUP_NORM[leaf]
        elif module == "label_embed":
            leaf = {"weight": "embedding"}.get(leaf, leaf)
        else:
            leaf = {"weight": "kernel", "bias": "bias"}[leaf]
        if leaf not in node:
            raise ValueError(
                f"state dict key {key} has no place in the U-Net of config.json "
                f"(no parameter {module}/{layer + '/' if layer else ''}{leaf})"
            )
        target = tuple(node[leaf].shape)
        value = _to_flax(state[key], leaf, target)
        if value is None or value.shape != target:
            raise ValueError(
                f"state dict key {key} has shape {tuple(np.shape(state[key]))}, which does not "
                f"fit {module}/{layer + '/' if layer else ''}{leaf} {target} of config.json's U-Net"
            )
        slot = params.setdefault(module, {})
        slot = slot.setdefault(layer, {}) if layer else slot
        if leaf in slot:
            raise ValueError(f"state dict key {key} fills {module}/{layer}/{leaf} a second time")
        slot[leaf] = value
    for path, _ in jax.tree_util.tree_flatten_with_path(shapes)[0]:
        names = [p.key for p in path]
        node = params
        for name in names:
            if not isinstance(node, dict) or name not in node:
                raise ValueError(
                    f"the state dict has no key for parameter {'/'.join(names)} of config.json's "
                    "U-Net"
                )
            node = node[name]
    return params


def load_state_dict(unet_dir: str) -> dict[str, np.ndarray]:
    """The U-Net's weights: ``diffusion_pytorch_model.safetensors`` (NumPy, no torch) or
    ``.bin`` (needs torch).

    Raises:
      ValueError: no weights file, or torch missing for a ``.bin``.
    """
    safetensors_path, bin_path = (os.path.join(unet_dir, n) for n in WEIGHT_NAMES)
    if os.path.isfile(safetensors_path):
        return dict(load_file(safetensors_path))
    if os.path.isfile(bin_path):
        try:
            import torch  # only .bin files need torch
        except ImportError:
            raise ValueError(
                f"{bin_path} is a torch file: pip install torch (or convert it to safetensors)"
            ) from None
        state = torch.load(bin_path, map_location="cpu", weights_only=True)
        return {k: v.detach().float().numpy() for k, v in state.items()}
    raise ValueError(f"no weights in {unet_dir}: expected one of {', '.join(WEIGHT_NAMES)}")
