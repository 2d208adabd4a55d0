"""Import a diffusers ``UNet2DModel`` and its ``DDPMScheduler`` (e.g. Ho et al.'s DDPM releases).

``python -m diffusion_jax.convert diffusers --src DIR --out WORKDIR`` reads

- the hub layout: ``DIR/unet/config.json`` with ``DIR/unet/diffusion_pytorch_model.safetensors``
  (or ``.bin``) and ``DIR/scheduler/scheduler_config.json``;
- or a flat folder holding ``config.json``, the weights and ``scheduler_config.json``;
- or the two folders given separately with ``--unet`` and ``--scheduler``;

and writes a workdir like a trained run (:func:`diffusion_jax.convert.workdir.write_workdir`).
It handles ``google/ddpm-cifar10-32``, ``google/ddpm-celebahq-256`` and
``google/ddpm-ema-{church,bedroom,cat}-256``. ``.safetensors`` are read with
``safetensors.numpy`` (no torch); ``.bin`` needs torch.

**The network** (a field missing from ``config.json`` takes ``UNet2DModel``'s default, as
diffusers does when it loads the folder):

- ``block_out_channels`` ``(c0, c1, ...)`` -> ``model.ch = c0``, ``model.ch_mult = (ci / c0)``
  (each must be a whole multiple); ``layers_per_block`` -> ``num_res_blocks``;
  ``norm_num_groups`` -> ``num_groups``; ``norm_eps``; ``downsample_padding`` 0 / 1 ->
  ``"same"`` / ``"symmetric"``; ``flip_sin_to_cos``; ``freq_shift``; ``attention_head_dim``
  -> ``head_dim`` (None: one head per block, ``num_heads = 1``); ``resnet_time_scale_shift``
  ``"default"`` / ``"scale_shift"`` -> ``use_scale_shift_norm``; ``dropout``;
  ``sample_size`` -> ``data.image_size``; ``in_channels`` (the data's channels) and
  ``out_channels`` (the same, or twice with a learned variance).
- ``down_block_types`` / ``up_block_types``: ``DownBlock2D`` / ``UpBlock2D`` and
  ``AttnDownBlock2D`` / ``AttnUpBlock2D``; a level with attention on the way down must have it
  on the way up; it becomes ``attn_resolutions`` (the level's height ``sample_size / 2**l``).
- Refused, each with one line naming the field and its value: other block types,
  ``mid_block_type`` other than ``UNetMidBlock2D``, ``add_attention = False``,
  ``time_embedding_type`` other than ``positional``, a ``time_embedding_dim`` other than
  ``4 * c0``, ``center_input_sample``, ``class_embed_type`` / ``num_class_embeds``,
  ``act_fn`` other than silu, ``mid_block_scale_factor != 1``, ``downsample_type`` /
  ``upsample_type`` other than conv, ``attn_norm_num_groups`` other than ``norm_num_groups``
  (or, with ``scale_shift``, unset: the middle attention would have no GroupNorm), a
  non-square ``sample_size``, and any field this module does not know.

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
``up{l}_upsample``; ``conv_norm_out`` -> ``norm_out``; ``conv_out``. Every key is used exactly
once and every parameter filled, else one line names the unused or missing key.

**The scheduler** (``DDPMScheduler``; missing fields take its defaults):
``num_train_timesteps`` -> ``diffusion.num_timesteps``; ``beta_schedule`` ``linear`` /
``scaled_linear`` / ``squaredcos_cap_v2`` / ``sigmoid`` with ``beta_start``/``beta_end`` (or
``trained_betas``), and ``rescale_betas_zero_snr``: when our named schedule (``linear``,
``quadratic``, ``cosine``, ``sigmoid``, literal range, optionally zero terminal SNR) gives the
same float64 betas to 1e-6 relative it is used by name, else the betas are stored in
``diffusion.betas``; ``variance_type`` ``fixed_small(_log)`` / ``fixed_large(_log)`` /
``learned_range`` -> ``diffusion.variance`` (``learned`` is refused); ``prediction_type``
``epsilon`` / ``sample`` / ``v_prediction`` -> ``parameterization`` ``eps`` / ``x0`` / ``v``;
``clip_sample`` (range 1) -> ``diffusion.clip_x0``; ``thresholding`` is refused.
``timestep_spacing`` and ``steps_offset`` choose diffusers' inference timesteps; ours are
chosen by ``sample.py`` and are not converted. Two differences that never change a sample:
diffusers' ``fixed_large`` variance at t = 0 is beta_0 (ours posterior_variance[1], as
improved-diffusion's; no noise is added at t = 0), and diffusers accumulates alpha_bar in
float32 where we use float64 (the tables agree to about T * 2**-24 relative).

Example:
  >>> unet, scheduler = read_configs("ddpm-cifar10-32")  # doctest: +SKIP
  >>> config = build_config(unet, scheduler)  # doctest: +SKIP
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
from collections.abc import Mapping
from typing import Any

import jax
import ml_collections
import numpy as np
from safetensors.numpy import load_file

from diffusion_jax import schedules
from diffusion_jax.convert import workdir
from diffusion_jax.models import example_inputs
from diffusion_jax.train import config as config_lib

__all__ = [
    "SCHEDULER_DEFAULTS",
    "UNET_DEFAULTS",
    "add_arguments",
    "build_config",
    "convert_state_dict",
    "diffusers_betas",
    "load_state_dict",
    "read_configs",
    "run",
    "scheduler_fields",
    "unet_fields",
]

# UNet2DModel's defaults (diffusers 0.42): what a field missing from config.json means.
UNET_DEFAULTS: dict[str, Any] = {
    "sample_size": None,
    "in_channels": 3,
    "out_channels": 3,
    "center_input_sample": False,
    "time_embedding_type": "positional",
    "time_embedding_dim": None,
    "freq_shift": 0,
    "flip_sin_to_cos": True,
    "down_block_types": ("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
    "mid_block_type": "UNetMidBlock2D",
    "up_block_types": ("AttnUpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    "block_out_channels": (224, 448, 672, 896),
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "downsample_padding": 1,
    "downsample_type": "conv",
    "upsample_type": "conv",
    "dropout": 0.0,
    "act_fn": "silu",
    "attention_head_dim": 8,
    "norm_num_groups": 32,
    "attn_norm_num_groups": None,
    "norm_eps": 1e-5,
    "resnet_time_scale_shift": "default",
    "add_attention": True,
    "class_embed_type": None,
    "num_class_embeds": None,
    "num_train_timesteps": None,
}

# DDPMScheduler's defaults (diffusers 0.42).
SCHEDULER_DEFAULTS: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "trained_betas": None,
    "variance_type": "fixed_small",
    "clip_sample": True,
    "prediction_type": "epsilon",
    "thresholding": False,
    "dynamic_thresholding_ratio": 0.995,
    "clip_sample_range": 1.0,
    "sample_max_value": 1.0,
    "timestep_spacing": "leading",
    "steps_offset": 0,
    "rescale_betas_zero_snr": False,
}
# Fields of the first releases' scheduler configs that current diffusers ignores.
_LEGACY_SCHEDULER_FIELDS = {"tensor_format", "timestep_values", "predict_epsilon"}

_DOWN = {"DownBlock2D": False, "AttnDownBlock2D": True}
_UP = {"UpBlock2D": False, "AttnUpBlock2D": True}
_PREDICTION = {"epsilon": "eps", "sample": "x0", "v_prediction": "v"}
_VARIANCE = {
    "fixed_small": "fixed_small",
    "fixed_small_log": "fixed_small",
    "fixed_large": "fixed_large",
    "fixed_large_log": "fixed_large",
    "learned_range": "learned_range",
}
WEIGHT_NAMES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")


def _refuse(field: str, value: Any, why: str) -> ValueError:
    return ValueError(f"config field {field} = {value!r}: {why}")


def _with_defaults(config: Mapping[str, Any], defaults: Mapping[str, Any], what: str) -> dict:
    unknown = sorted(
        k for k in config if not k.startswith("_") and k not in defaults and k != "trained_betas"
    )
    if what == "scheduler":
        unknown = [k for k in unknown if k not in _LEGACY_SCHEDULER_FIELDS]
    if unknown:
        raise _refuse(
            unknown[0], config[unknown[0]], f"unknown {what} field; it cannot be converted safely"
        )
    return {**defaults, **{k: v for k, v in config.items() if not k.startswith("_")}}


# --- The network ------------------------------------------------------------------------------


def unet_fields(config: Mapping[str, Any]) -> dict[str, Any]:
    """Our U-Net's fields for a ``UNet2DModel`` config.json.

    Args:
      config: the parsed ``config.json``.

    Returns:
      ``{"model": {...config.model fields}, "image_size": int, "channels": int,
      "out_channels": int}``.

    Raises:
      ValueError: one line naming the first field the U-Net cannot represent exactly.

    Example:
      >>> unet_fields({"block_out_channels": [32, 64], "down_block_types": ["DownBlock2D",
      ...     "AttnDownBlock2D"], "up_block_types": ["AttnUpBlock2D", "UpBlock2D"],
      ...     "sample_size": 16, "norm_num_groups": 8})["model"]["attn_resolutions"]
      (8,)
    """
    name = config.get("_class_name", "UNet2DModel")
    if name != "UNet2DModel":
        raise _refuse("_class_name", name, "only UNet2DModel converts")
    c = _with_defaults(config, UNET_DEFAULTS, "UNet2DModel")
    fixed = {
        "center_input_sample": (False, "the U-Net takes data in [-1, 1] as it is"),
        "time_embedding_type": ("positional", "only the sinusoidal embedding is built in"),
        "mid_block_type": ("UNetMidBlock2D", "the middle is ResNet, attention, ResNet"),
        "add_attention": (True, "the middle block always attends"),
        "class_embed_type": (None, "class embeddings are not converted"),
        "num_class_embeds": (None, "class embeddings are not converted"),
        "mid_block_scale_factor": (1, "the residual branches are not rescaled"),
        "downsample_type": ("conv", "downsampling is a strided convolution"),
        "upsample_type": ("conv", "upsampling is nearest + convolution"),
    }
    for field, (allowed, why) in fixed.items():
        if c[field] != allowed:
            raise _refuse(field, c[field], f"must be {allowed!r} ({why})")
    if c["act_fn"] not in ("silu", "swish"):
        raise _refuse("act_fn", c["act_fn"], "the U-Net uses SiLU")
    channels_out = list(c["block_out_channels"])
    if not channels_out or not all(isinstance(n, int) and n > 0 for n in channels_out):
        raise _refuse("block_out_channels", c["block_out_channels"], "need positive integers")
    ch = channels_out[0]
    if any(n % ch for n in channels_out):
        raise _refuse(
            "block_out_channels", channels_out, f"each must be a whole multiple of the first, {ch}"
        )
    levels = len(channels_out)
    down, up = list(c["down_block_types"]), list(c["up_block_types"])
    for field, types, known in (("down_block_types", down, _DOWN), ("up_block_types", up, _UP)):
        if len(types) != levels:
            raise _refuse(field, types, f"needs one type per block_out_channels ({levels})")
        bad = [t for t in types if t not in known]
        if bad:
            raise _refuse(field, types, f"{bad[0]} is not one of {sorted(known)}")
    for level in range(levels):
        if _DOWN[down[level]] != _UP[up[levels - 1 - level]]:
            raise _refuse(
                "up_block_types",
                up,
                f"level {level} attends on one path only ({down[level]} with "
                f"{up[levels - 1 - level]}); the U-Net attends at a resolution on both",
            )
    size = c["sample_size"]
    if isinstance(size, list | tuple):
        if len(size) != 2 or size[0] != size[1]:
            raise _refuse("sample_size", size, "only square images convert")
        size = size[0]
    if not isinstance(size, int) or size < 1 or size % 2 ** (levels - 1):
        raise _refuse("sample_size", size, f"needs a positive size divisible by 2**{levels - 1}")
    if c["time_embedding_dim"] not in (None, 4 * ch):
        raise _refuse("time_embedding_dim", c["time_embedding_dim"], f"must be 4 * {ch}")
    groups = c["norm_num_groups"]
    if not isinstance(groups, int) or groups < 1:
        raise _refuse("norm_num_groups", groups, "needs a number of groups")
    attn_groups = c["attn_norm_num_groups"]
    if attn_groups is None and c["resnet_time_scale_shift"] == "scale_shift":
        raise _refuse(
            "resnet_time_scale_shift",
            "scale_shift",
            "with attn_norm_num_groups unset the middle attention has no GroupNorm",
        )
    if attn_groups not in (None, groups):
        raise _refuse("attn_norm_num_groups", attn_groups, f"must equal norm_num_groups {groups}")
    shift = {"default": False, "scale_shift": True}
    if c["resnet_time_scale_shift"] not in shift:
        raise _refuse("resnet_time_scale_shift", c["resnet_time_scale_shift"], f"not in {shift}")
    padding = {0: "same", 1: "symmetric"}
    if c["downsample_padding"] not in padding:
        raise _refuse("downsample_padding", c["downsample_padding"], "must be 0 or 1")
    attended = [size // 2**level for level in range(levels) if _DOWN[down[level]]]
    head_dim = c["attention_head_dim"]
    if head_dim is not None:
        widths = [channels_out[level] for level in range(levels) if _DOWN[down[level]]]
        bad = [w for w in widths + [channels_out[-1]] if w % head_dim]
        if not isinstance(head_dim, int) or head_dim < 1 or bad:
            raise _refuse(
                "attention_head_dim", head_dim, f"must divide every attention width ({bad})"
            )
    dropout = c["dropout"]
    if not isinstance(dropout, int | float) or not 0 <= dropout < 1:
        raise _refuse("dropout", dropout, "must lie in [0, 1)")
    for field in ("norm_eps", "freq_shift"):
        if isinstance(c[field], bool) or not isinstance(c[field], int | float):
            raise _refuse(field, c[field], "must be a number")
    model = {
        "name": "unet",
        "ch": ch,
        "ch_mult": tuple(n // ch for n in channels_out),
        "num_res_blocks": int(c["layers_per_block"]),
        "attn_resolutions": tuple(attended),
        "dropout": float(dropout),
        "num_groups": groups,
        "num_heads": 1,
        "conv_resample": True,
        "resblock_updown": False,
        "use_scale_shift_norm": shift[c["resnet_time_scale_shift"]],
        "norm_eps": float(c["norm_eps"]),
        "downsample_padding": padding[c["downsample_padding"]],
        "flip_sin_to_cos": bool(c["flip_sin_to_cos"]),
        "freq_shift": float(c["freq_shift"]),
        "head_dim": head_dim,
        "timestep_scale": 1.0,
        "class_conditional": False,
    }
    return {
        "model": model,
        "image_size": size,
        "channels": int(c["in_channels"]),
        "out_channels": int(c["out_channels"]),
    }


# --- The scheduler ----------------------------------------------------------------------------


def diffusers_betas(c: Mapping[str, Any]) -> np.ndarray:
    """The betas a ``DDPMScheduler`` config defines, computed in float64 from its formulas.

    Args:
      c: the scheduler config with defaults filled in.

    Returns:
      float64 ``[num_train_timesteps]``.

    Raises:
      ValueError: an unknown ``beta_schedule``.

    Example:
      >>> diffusers_betas({**SCHEDULER_DEFAULTS, "num_train_timesteps": 3})
      array([1.000e-04, 1.005e-02, 2.000e-02])
    """
    num = int(c["num_train_timesteps"])
    start, end = float(c["beta_start"]), float(c["beta_end"])
    if c.get("trained_betas") is not None:
        betas = np.asarray(c["trained_betas"], np.float64)
    elif c["beta_schedule"] == "linear":
        betas = np.linspace(start, end, num, dtype=np.float64)
    elif c["beta_schedule"] == "scaled_linear":
        betas = np.linspace(start**0.5, end**0.5, num, dtype=np.float64) ** 2
    elif c["beta_schedule"] == "squaredcos_cap_v2":
        steps = np.arange(num + 1, dtype=np.float64) / num
        alpha_bar = np.cos((steps + 0.008) / 1.008 * math.pi / 2) ** 2
        betas = np.minimum(1 - alpha_bar[1:] / alpha_bar[:-1], 0.999)
    elif c["beta_schedule"] == "sigmoid":
        ramp = 1 / (1 + np.exp(-np.linspace(-6, 6, num, dtype=np.float64)))
        betas = ramp * (end - start) + start
    else:
        raise _refuse(
            "beta_schedule",
            c["beta_schedule"],
            "must be linear, scaled_linear, squaredcos_cap_v2 or sigmoid (or give trained_betas)",
        )
    if c["rescale_betas_zero_snr"]:
        betas = schedules.rescale_zero_terminal_snr(betas)
    return betas


_NAMED = {"linear": "linear", "scaled_linear": "quadratic", "squaredcos_cap_v2": "cosine"}
_NAMED["sigmoid"] = "sigmoid"


def scheduler_fields(config: Mapping[str, Any]) -> dict[str, Any]:
    """Our ``config.diffusion`` fields for a ``DDPMScheduler`` scheduler_config.json.

    Args:
      config: the parsed ``scheduler_config.json``.

    Returns:
      ``config.diffusion`` fields: ``num_timesteps``, ``schedule``, ``scale_to_num_timesteps``,
      ``zero_terminal_snr``, ``betas`` (None when the named schedule matches),
      ``parameterization``, ``variance``, ``clip_x0``.

    Raises:
      ValueError: one line naming the first field that cannot be represented.

    Example:
      >>> scheduler_fields({"beta_schedule": "linear"})["schedule"]
      'linear'
    """
    name = config.get("_class_name", "DDPMScheduler")
    if name != "DDPMScheduler":
        raise _refuse("_class_name", name, "only DDPMScheduler configs convert")
    c = _with_defaults(config, SCHEDULER_DEFAULTS, "DDPMScheduler")
    if c.get("timestep_values") is not None:
        raise _refuse("timestep_values", c["timestep_values"], "custom timesteps do not convert")
    prediction = c["prediction_type"]
    if "predict_epsilon" in config and "prediction_type" not in config:
        prediction = "epsilon" if config["predict_epsilon"] else "sample"
    if prediction not in _PREDICTION:
        raise _refuse("prediction_type", prediction, f"must be one of {sorted(_PREDICTION)}")
    if c["variance_type"] not in _VARIANCE:
        raise _refuse("variance_type", c["variance_type"], f"must be one of {sorted(_VARIANCE)}")
    if c["thresholding"]:
        raise _refuse("thresholding", True, "dynamic thresholding is not converted")
    if c["clip_sample"] and float(c["clip_sample_range"]) != 1.0:
        raise _refuse("clip_sample_range", c["clip_sample_range"], "x0 is clipped to [-1, 1]")
    num = c["num_train_timesteps"]
    if isinstance(num, bool) or not isinstance(num, int) or num < 1:
        raise _refuse("num_train_timesteps", num, "must be a positive integer")
    betas = diffusers_betas(c)
    if betas.shape != (num,):
        raise _refuse("trained_betas", f"{betas.shape[0]} values", f"need {num}")
    zero_snr = bool(c["rescale_betas_zero_snr"])
    schedule = _NAMED.get(c["beta_schedule"], "linear")
    explicit = [float(b) for b in betas]
    if c.get("trained_betas") is None:
        kwargs = {} if schedule == "cosine" else {"beta_start": c["beta_start"]}
        if schedule != "cosine":
            kwargs["beta_end"] = c["beta_end"]
        try:
            ours = schedules.beta_table(schedule, num, scale_to_num_timesteps=False, **kwargs)
            if zero_snr:
                ours = schedules.rescale_zero_terminal_snr(ours)
        except ValueError:
            ours = None
        defaults = {"beta_start": 1e-4, "beta_end": 0.02}
        by_name = schedule == "cosine" or all(float(c[k]) == v for k, v in defaults.items())
        if by_name and ours is not None and np.allclose(ours, betas, rtol=1e-6, atol=0):
            explicit = None  # our named schedule computes the same betas
    return {
        "num_timesteps": num,
        "schedule": schedule,
        "scale_to_num_timesteps": False,
        "zero_terminal_snr": zero_snr if explicit is None else False,
        "betas": explicit,
        "parameterization": _PREDICTION[prediction],
        "variance": _VARIANCE[c["variance_type"]],
        "clip_x0": bool(c["clip_sample"]),
    }


def build_config(
    unet_config: Mapping[str, Any],
    scheduler_config: Mapping[str, Any] | None,
    *,
    dataset: str = "converted",
) -> ml_collections.ConfigDict:
    """The full run config of a converted ``UNet2DModel`` + ``DDPMScheduler``.

    Args:
      unet_config: the parsed ``config.json``.
      scheduler_config: the parsed ``scheduler_config.json``, or None for the scheduler's
        defaults (DDPM's linear schedule, T = 1000).
      dataset: ``config.data.name`` (the data the bound and FID evaluate on).

    Returns:
      A validated ``ml_collections.ConfigDict``.

    Raises:
      ValueError: one line naming the field that cannot be converted.
    """
    net = unet_fields(unet_config)
    diffusion = scheduler_fields(scheduler_config or {})
    expected = net["channels"] * (2 if diffusion["variance"] == "learned_range" else 1)
    if net["out_channels"] != expected:
        raise _refuse(
            "out_channels",
            net["out_channels"],
            f"with in_channels {net['channels']} and variance_type "
            f"{diffusion['variance']!r} the U-Net outputs {expected}",
        )
    config = config_lib.default_config()
    for key, value in net["model"].items():
        config.model[key] = value
    for key, value in diffusion.items():
        config.diffusion[key] = value
    config.diffusion.loss_type = "hybrid" if diffusion["variance"] == "learned_range" else "simple"
    config.diffusion.allow_prior_mismatch = True  # the published schedule is what it is
    config.data.name = dataset
    config.data.image_size = net["image_size"]
    config.data.random_flip = False
    config.train.sample_steps = min(config.train.sample_steps, diffusion["num_timesteps"])
    config_lib.validate_config(config)
    return config


# --- The weights ------------------------------------------------------------------------------

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
    state: Mapping[str, np.ndarray], config: ml_collections.ConfigDict, data_shape: tuple
) -> dict[str, Any]:
    """Maps a ``UNet2DModel`` state dict onto the parameter tree of our U-Net.

    Args:
      state: diffusers key -> array (torch layout).
      config: the converted run config (:func:`build_config`).
      data_shape: ``(H, W, C)``.

    Returns:
      Our parameters, a nested dict of float32 NumPy arrays.

    Raises:
      ValueError: one line naming the first unused key, mis-shaped key or missing parameter.
    """
    model = config_lib.build_model(config, data_shape, None)
    x, t, _ = example_inputs(data_shape, conditional=False)
    shapes = jax.eval_shape(model.init, jax.random.key(0), x, t)["params"]
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


# --- Files ------------------------------------------------------------------------------------


def _read_json(path: str, what: str) -> dict:
    try:
        with open(path) as f:
            value = json.load(f)
    except FileNotFoundError:
        raise ValueError(f"{what}: no file {path}") from None
    except json.JSONDecodeError as error:
        raise ValueError(f"{what}: {path} is not JSON ({error})") from None
    if not isinstance(value, dict):
        raise ValueError(f"{what}: {path} does not hold a JSON object")
    return value


def read_configs(
    src: str | None, *, unet: str | None = None, scheduler: str | None = None
) -> tuple[str, dict, dict | None, str | None]:
    """Finds and reads the U-Net folder, its config and the scheduler config.

    Args:
      src: a hub-layout folder (``unet/`` and ``scheduler/``) or a flat folder, or None.
      unet: the U-Net folder (overrides ``src``'s).
      scheduler: the scheduler folder or its ``scheduler_config.json`` (overrides ``src``'s).

    Returns:
      ``(unet_dir, unet_config, scheduler_config or None, scheduler_path or None)``.

    Raises:
      ValueError: no U-Net folder or config found, naming the paths tried.
    """
    if unet is None:
        if src is None:
            raise ValueError("give --src DIR (or --unet DIR)")
        hub = os.path.join(src, "unet")
        unet = hub if os.path.isfile(os.path.join(hub, "config.json")) else src
    unet_config = _read_json(os.path.join(unet, "config.json"), "--unet/--src")
    if scheduler is None and src is not None:
        for candidate in (os.path.join(src, "scheduler"), src):
            if os.path.isfile(os.path.join(candidate, "scheduler_config.json")):
                scheduler = candidate
                break
    scheduler_config, scheduler_path = None, None
    if scheduler is not None:
        scheduler_path = (
            scheduler
            if scheduler.endswith(".json")
            else os.path.join(scheduler, "scheduler_config.json")
        )
        scheduler_config = _read_json(scheduler_path, "--scheduler")
    return unet, unet_config, scheduler_config, scheduler_path


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


# --- The command line -------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Adds ``--src``, ``--unet``, ``--scheduler``, ``--dataset`` and ``--out``."""
    parser.add_argument("--src", help="hub-layout folder (unet/, scheduler/) or a flat folder")
    parser.add_argument("--unet", help="the U-Net folder (config.json + weights)")
    parser.add_argument("--scheduler", help="the scheduler folder or scheduler_config.json")
    parser.add_argument(
        "--dataset",
        default=None,
        help="config.data.name of the workdir (default: cifar10 for a cifar10 model, else "
        "'converted'); the bound and FID evaluate on it",
    )
    parser.add_argument("--out", required=True, help="workdir to write")


def run(args: argparse.Namespace) -> str:
    """Converts the diffusers folder(s) of ``args`` into the workdir ``args.out``.

    Returns:
      The workdir written.

    Raises:
      ValueError: missing files, a config field that cannot be represented, or a state dict
        that does not fit it (one line naming the field or key).
    """
    unet_dir, unet_config, scheduler_config, scheduler_path = read_configs(
        args.src, unet=args.unet, scheduler=args.scheduler
    )
    dataset = args.dataset
    if dataset is None:
        where = os.path.abspath(args.src or unet_dir).lower()
        dataset = "cifar10" if "cifar10" in where else "converted"
    config = build_config(unet_config, scheduler_config, dataset=dataset)
    size, channels = config.data.image_size, unet_fields(unet_config)["channels"]
    params = convert_state_dict(load_state_dict(unet_dir), config, (size, size, channels))
    source = {
        "format": "diffusers",
        "unet": os.path.abspath(unet_dir),
        "scheduler": scheduler_path and os.path.abspath(scheduler_path),
        "unet_config": unet_config,
        "scheduler_config": scheduler_config,
    }
    return workdir.write_workdir(args.out, config, params, source=source)
