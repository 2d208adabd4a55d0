"""A diffusers ``UNet2DModel`` config.json and ``DDPMScheduler`` scheduler_config.json as the
fields of our config (:mod:`diffusion_jax.convert.from_diffusers` writes the workdir).

**The network** (a field missing from ``config.json`` takes ``UNet2DModel``'s default, as
diffusers does when it loads the folder):

- ``block_out_channels`` ``(c0, c1, ...)`` -> ``model.ch = c0``, ``model.ch_mult = (ci / c0)``
  (each must be a whole multiple); ``layers_per_block`` -> ``num_res_blocks``;
  ``norm_num_groups`` -> ``num_groups``; ``norm_eps``; ``downsample_padding`` 0 / 1 ->
  ``"same"`` / ``"symmetric"``; ``flip_sin_to_cos``; ``freq_shift``; ``attention_head_dim``
  -> ``head_dim`` (None: one head per block, ``num_heads = 1``); ``resnet_time_scale_shift``
  ``"default"`` / ``"scale_shift"`` -> ``use_scale_shift_norm``; ``dropout``;
  ``sample_size`` -> ``data.image_size``; ``in_channels`` (the data's channels) and
  ``out_channels`` (the same, or twice with a learned variance); ``num_class_embeds`` N (with
  ``class_embed_type`` unset: an ``nn.Embedding`` added to the time embedding) ->
  ``model.class_conditional`` and our ``label_embed``, whose last row is the null label of
  classifier-free guidance: with ``null_label="append"`` (the default) N classes and a zero
  null row appended (the null label then adds nothing; the model was never trained without a
  label), with ``"last"`` N - 1 classes and the file's last row as the null label (what
  ``to-diffusers`` exports).
- ``down_block_types`` / ``up_block_types``: ``DownBlock2D`` / ``UpBlock2D`` and
  ``AttnDownBlock2D`` / ``AttnUpBlock2D``; a level with attention on the way down must have it
  on the way up; it becomes ``attn_resolutions`` (the level's height ``sample_size / 2**l``).
- Refused, each with one line naming the field and its value: other block types,
  ``mid_block_type`` other than ``UNetMidBlock2D``, ``add_attention = False``,
  ``time_embedding_type`` other than ``positional``, a ``time_embedding_dim`` other than
  ``4 * c0``, ``center_input_sample``, ``class_embed_type`` (timestep or identity class
  embeddings),
  ``act_fn`` other than silu, ``mid_block_scale_factor != 1``, ``downsample_type`` /
  ``upsample_type`` other than conv, ``attn_norm_num_groups`` other than ``norm_num_groups``
  (or, with ``scale_shift``, unset: the middle attention would have no GroupNorm), a
  non-square ``sample_size``, and any field this module does not know.

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
float32 where we use float64 (its alpha_bar drifts by up to about T ulps of 1).

Example:
  >>> scheduler_fields({"beta_schedule": "squaredcos_cap_v2"})["schedule"]
  'cosine'
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from diffusion_jax import schedules

__all__ = [
    "SCHEDULER_DEFAULTS",
    "UNET_DEFAULTS",
    "diffusers_betas",
    "field_error",
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


def field_error(field: str, value: Any, why: str) -> ValueError:
    """The one-line error refusing config ``field = value``, saying why."""
    return ValueError(f"config field {field} = {value!r}: {why}")


def _with_defaults(config: Mapping[str, Any], defaults: Mapping[str, Any], what: str) -> dict:
    unknown = sorted(
        k for k in config if not k.startswith("_") and k not in defaults and k != "trained_betas"
    )
    if what == "scheduler":
        unknown = [k for k in unknown if k not in _LEGACY_SCHEDULER_FIELDS]
    if unknown:
        raise field_error(
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
      "out_channels": int, "num_class_embeds": int | None}``.

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
        raise field_error("_class_name", name, "only UNet2DModel converts")
    c = _with_defaults(config, UNET_DEFAULTS, "UNet2DModel")
    fixed = {
        "center_input_sample": (False, "the U-Net takes data in [-1, 1] as it is"),
        "time_embedding_type": ("positional", "only the sinusoidal embedding is built in"),
        "mid_block_type": ("UNetMidBlock2D", "the middle is ResNet, attention, ResNet"),
        "add_attention": (True, "the middle block always attends"),
        "class_embed_type": (None, "only an embedding table of labels converts"),
        "mid_block_scale_factor": (1, "the residual branches are not rescaled"),
        "downsample_type": ("conv", "downsampling is a strided convolution"),
        "upsample_type": ("conv", "upsampling is nearest + convolution"),
    }
    for field, (allowed, why) in fixed.items():
        if c[field] != allowed:
            raise field_error(field, c[field], f"must be {allowed!r} ({why})")
    if c["act_fn"] not in ("silu", "swish"):
        raise field_error("act_fn", c["act_fn"], "the U-Net uses SiLU")
    channels_out = list(c["block_out_channels"])
    if not channels_out or not all(isinstance(n, int) and n > 0 for n in channels_out):
        raise field_error("block_out_channels", c["block_out_channels"], "need positive integers")
    ch = channels_out[0]
    if any(n % ch for n in channels_out):
        raise field_error(
            "block_out_channels", channels_out, f"each must be a whole multiple of the first, {ch}"
        )
    levels = len(channels_out)
    down, up = list(c["down_block_types"]), list(c["up_block_types"])
    for field, types, known in (("down_block_types", down, _DOWN), ("up_block_types", up, _UP)):
        if len(types) != levels:
            raise field_error(field, types, f"needs one type per block_out_channels ({levels})")
        bad = [t for t in types if t not in known]
        if bad:
            raise field_error(field, types, f"{bad[0]} is not one of {sorted(known)}")
    for level in range(levels):
        if _DOWN[down[level]] != _UP[up[levels - 1 - level]]:
            raise field_error(
                "up_block_types",
                up,
                f"level {level} attends on one path only ({down[level]} with "
                f"{up[levels - 1 - level]}); the U-Net attends at a resolution on both",
            )
    size = c["sample_size"]
    if isinstance(size, list | tuple):
        if len(size) != 2 or size[0] != size[1]:
            raise field_error("sample_size", size, "only square images convert")
        size = size[0]
    if not isinstance(size, int) or size < 1 or size % 2 ** (levels - 1):
        raise field_error(
            "sample_size", size, f"needs a positive size divisible by 2**{levels - 1}"
        )
    if c["time_embedding_dim"] not in (None, 4 * ch):
        raise field_error("time_embedding_dim", c["time_embedding_dim"], f"must be 4 * {ch}")
    groups = c["norm_num_groups"]
    if not isinstance(groups, int) or groups < 1:
        raise field_error("norm_num_groups", groups, "needs a number of groups")
    attn_groups = c["attn_norm_num_groups"]
    if attn_groups is None and c["resnet_time_scale_shift"] == "scale_shift":
        raise field_error(
            "resnet_time_scale_shift",
            "scale_shift",
            "with attn_norm_num_groups unset the middle attention has no GroupNorm",
        )
    if attn_groups not in (None, groups):
        raise field_error(
            "attn_norm_num_groups", attn_groups, f"must equal norm_num_groups {groups}"
        )
    shift = {"default": False, "scale_shift": True}
    if c["resnet_time_scale_shift"] not in shift:
        raise field_error(
            "resnet_time_scale_shift", c["resnet_time_scale_shift"], f"not in {shift}"
        )
    padding = {0: "same", 1: "symmetric"}
    if c["downsample_padding"] not in padding:
        raise field_error("downsample_padding", c["downsample_padding"], "must be 0 or 1")
    attended = [size // 2**level for level in range(levels) if _DOWN[down[level]]]
    head_dim = c["attention_head_dim"]
    if head_dim is not None:
        widths = [channels_out[level] for level in range(levels) if _DOWN[down[level]]]
        bad = [w for w in widths + [channels_out[-1]] if w % head_dim]
        if not isinstance(head_dim, int) or head_dim < 1 or bad:
            raise field_error(
                "attention_head_dim", head_dim, f"must divide every attention width ({bad})"
            )
    labels = c["num_class_embeds"]
    if labels is not None and (
        isinstance(labels, bool) or not isinstance(labels, int) or labels < 1
    ):
        raise field_error("num_class_embeds", labels, "must be a positive number of classes")
    dropout = c["dropout"]
    if not isinstance(dropout, int | float) or not 0 <= dropout < 1:
        raise field_error("dropout", dropout, "must lie in [0, 1)")
    for field in ("norm_eps", "freq_shift"):
        if isinstance(c[field], bool) or not isinstance(c[field], int | float):
            raise field_error(field, c[field], "must be a number")
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
        "class_conditional": labels is not None,
    }
    return {
        "model": model,
        "image_size": size,
        "channels": int(c["in_channels"]),
        "out_channels": int(c["out_channels"]),
        "num_class_embeds": labels,
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
        raise field_error(
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
        raise field_error("_class_name", name, "only DDPMScheduler configs convert")
    c = _with_defaults(config, SCHEDULER_DEFAULTS, "DDPMScheduler")
    if c.get("timestep_values") is not None:
        raise field_error(
            "timestep_values", c["timestep_values"], "custom timesteps do not convert"
        )
    prediction = c["prediction_type"]
    if "predict_epsilon" in config and "prediction_type" not in config:
        prediction = "epsilon" if config["predict_epsilon"] else "sample"
    if prediction not in _PREDICTION:
        raise field_error("prediction_type", prediction, f"must be one of {sorted(_PREDICTION)}")
    if c["variance_type"] not in _VARIANCE:
        raise field_error(
            "variance_type", c["variance_type"], f"must be one of {sorted(_VARIANCE)}"
        )
    if c["thresholding"]:
        raise field_error("thresholding", True, "dynamic thresholding is not converted")
    if c["clip_sample"] and float(c["clip_sample_range"]) != 1.0:
        raise field_error("clip_sample_range", c["clip_sample_range"], "x0 is clipped to [-1, 1]")
    num = c["num_train_timesteps"]
    if isinstance(num, bool) or not isinstance(num, int) or num < 1:
        raise field_error("num_train_timesteps", num, "must be a positive integer")
    betas = diffusers_betas(c)
    if betas.shape != (num,):
        raise field_error("trained_betas", f"{betas.shape[0]} values", f"need {num}")
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
