"""The diffusers configs of a trained run: a ``UNet2DModel`` config and a ``DDPMScheduler`` config.

What :mod:`~diffusion_jax.convert.to_diffusers` writes as ``unet/config.json`` and
``scheduler/scheduler_config.json``; the inverse of :mod:`~diffusion_jax.convert.diffusers_config`.

How the config maps (our field -> diffusers):

- ``model.ch``, ``ch_mult`` -> ``block_out_channels``; ``num_res_blocks`` ->
  ``layers_per_block``; the levels with attention (read from the parameters) ->
  ``AttnDownBlock2D``/``AttnUpBlock2D``, the others ``DownBlock2D``/``UpBlock2D``
  (``ResnetDownsampleBlock2D``/``ResnetUpsampleBlock2D`` with ``resblock_updown``, which also
  sets ``downsample_type``/``upsample_type = "resnet"``);
- ``num_groups`` -> ``norm_num_groups`` (and ``attn_norm_num_groups``); ``norm_eps`` ->
  ``norm_eps``; ``downsample_padding`` "same"/"symmetric" -> 0/1; ``flip_sin_to_cos``,
  ``freq_shift`` as they are; ``use_scale_shift_norm`` -> ``resnet_time_scale_shift =
  "scale_shift"``; ``head_dim`` -> ``attention_head_dim`` (one head when ``num_heads = 1``:
  ``attention_head_dim = None``); ``dropout`` as it is;
- a class-conditional model -> ``num_class_embeds = num_classes + 1``: the last row is our null
  label, so ``class_labels = num_classes`` is the unconditional pass of classifier-free
  guidance (``DDPMPipeline`` itself passes no labels, so call the U-Net directly then);
- ``diffusion.parameterization`` eps/x0/v -> ``prediction_type`` epsilon/sample/v_prediction;
  ``variance`` fixed_small/fixed_large/learned_range -> ``variance_type`` of the same name (the
  network's 2C outputs are [mean output, interpolation v], the order diffusers splits);
  ``clip_x0`` -> ``clip_sample`` (range 1); the schedule -> ``beta_schedule`` linear,
  scaled_linear (our quadratic), sigmoid or squaredcos_cap_v2 (our cosine) with the (scaled)
  beta range, or ``trained_betas`` (our float64 betas) where diffusers' formula would differ:
  explicit ``diffusion.betas`` (a converted published schedule), zero terminal SNR, or betas
  capped at 0.999 by the scaling to a small T.
- ``remat``, ``train.compute_dtype``, the loss, the optimiser and the data pipeline do not
  change the function the network computes and are not exported.

Refused, each with one line naming the config field and its value: ``model.name = 'mlp'``
(diffusers has no such network), ``diffusion.formulation = 'edm'`` (no EDM preconditioning in
``UNet2DModel``), ``model.conv_resample = False`` without ``resblock_updown``
(diffusers' blocks always resample with convolutions), ``model.timestep_scale != 1``
(``UNet2DModel`` cannot scale its timesteps), ``model.num_heads > 1`` without ``head_dim`` when
the attention blocks differ in width (diffusers fixes the head width, not the head count), and a
sample size that disagrees with the attention found in the parameters. diffusers'
``learned_range`` differs from ours only in the variance at t = 0, where no noise is added.
"""

from __future__ import annotations

from typing import Any

import ml_collections
import numpy as np

from diffusion_jax import schedules

__all__ = ["DIFFUSERS_VERSION", "check_exportable", "scheduler_config", "unet_config"]

DIFFUSERS_VERSION = "0.42.1"
"""The diffusers version whose layout the export was checked against (written to the configs)."""

_PREDICTION_TYPES = {"eps": "epsilon", "x0": "sample", "v": "v_prediction"}
_VARIANCE_TYPES = {
    "fixed_small": "fixed_small",
    "fixed_large": "fixed_large",
    "learned_range": "learned_range",
}
# Our schedule -> diffusers' beta_schedule computing the same betas from the same range.
_BETA_SCHEDULES = {
    "linear": "linear",
    "quadratic": "scaled_linear",
    "sigmoid": "sigmoid",
    "cosine": "squaredcos_cap_v2",
}
_DDPM_BETA_RANGE = (1e-4, 0.02)  # the range our linear/quadratic/sigmoid schedules use at T=1000
_MAX_BETA = 0.999  # the cap of our scaled schedules and of diffusers' squaredcos_cap_v2


def _refuse(field: str, value: Any, why: str) -> ValueError:
    return ValueError(f"config.{field} = {value!r} cannot be exported to diffusers: {why}")


def _levels_with_attention(params: Any, num_levels: int) -> list[bool]:
    """Which resolution levels have attention blocks, read from the parameter names."""
    return [any(name.startswith(f"down{lvl}_attn") for name in params) for lvl in range(num_levels)]


def check_exportable(config: ml_collections.ConfigDict, sample_size: int) -> int | None:
    """Refuses a model config diffusers' ``UNet2DModel`` cannot represent, before any array is
    read; returns diffusers' ``attention_head_dim`` (None: one head per block).

    Args:
      config: the run's config.
      sample_size: the image size the model was trained at.

    Returns:
      The channels per attention head for diffusers' ``attention_head_dim``: ``model.head_dim``,
      or the one width that ``model.num_heads`` heads give every attention block, or None for
      one head per block.

    Raises:
      ValueError: one line naming the config field and its value.

    Example:
      >>> check_exportable(config, 32) is None  # one attention head
      True
    """
    m = config.model
    if m.get("name", "unet") != "unet":
        raise _refuse("model.name", m.name, "only the U-Net has a diffusers counterpart.")
    formulation = config.diffusion.get("formulation", "ddpm")
    if formulation != "ddpm":
        raise _refuse(
            "diffusion.formulation",
            formulation,
            "UNet2DModel has no EDM preconditioning (c_in, c_skip, c_out, c_noise).",
        )
    timestep_scale = float(m.get("timestep_scale", 1.0))
    if timestep_scale != 1.0:
        raise _refuse(
            "model.timestep_scale", timestep_scale, "UNet2DModel cannot scale its timesteps."
        )
    if not m.get("resblock_updown", False) and not m.get("conv_resample", True):
        raise _refuse(
            "model.conv_resample",
            False,
            "diffusers' DownBlock2D/UpBlock2D always resample with convolutions.",
        )
    head_dim = m.get("head_dim", None)
    if head_dim is not None or int(m.num_heads) == 1:
        return None if head_dim is None else int(head_dim)
    channels = [int(m.ch) * int(k) for k in m.ch_mult]
    attends = [sample_size // 2**lvl in tuple(m.attn_resolutions) for lvl in range(len(channels))]
    widths = sorted({c for c, a in zip(channels, attends, strict=True) if a} | {channels[-1]})
    if len(widths) != 1:
        raise _refuse(
            "model.num_heads",
            int(m.num_heads),
            f"the attention blocks have widths {widths}, and diffusers fixes the channels per "
            "head, not the number of heads; set model.head_dim instead.",
        )
    return widths[0] // int(m.num_heads)


def unet_config(config: ml_collections.ConfigDict, params: Any, sample_size: int) -> dict:
    """The diffusers ``UNet2DModel`` config of our U-Net, refusing what it cannot represent.

    Args:
      config: the run's config (``model.*``).
      params: the U-Net's parameters (a nested dict); the input/output channels, the classes
        and the levels with attention are read from them.
      sample_size: the image height (= width) the model was trained at.

    Returns:
      A JSON-ready dict for ``unet/config.json``.

    Raises:
      ValueError: one line naming the config field diffusers cannot represent (see
        :func:`check_exportable`), or a ``sample_size`` that puts attention elsewhere than the
        parameters have it.

    Example:
      >>> unet_config(config, params, 32)["block_out_channels"]
      [128, 256, 256, 256]
    """
    head_dim = check_exportable(config, sample_size)
    m = config.model
    resblock_updown = bool(m.get("resblock_updown", False))
    ch_mult = [int(k) for k in m.ch_mult]
    channels = [int(m.ch) * k for k in ch_mult]
    attention = _levels_with_attention(params, len(ch_mult))
    expected = [sample_size // 2**lvl in tuple(m.attn_resolutions) for lvl in range(len(ch_mult))]
    if attention != expected:
        raise _refuse(
            "data.image_size",
            sample_size,
            f"with model.attn_resolutions = {tuple(m.attn_resolutions)} it puts attention at "
            f"levels {expected}, the parameters at {attention}; pass the trained size with "
            "--sample_size.",
        )
    padding = m.get("downsample_padding", "same")
    freq_shift = float(m.get("freq_shift", 1.0))
    down_plain = "ResnetDownsampleBlock2D" if resblock_updown else "DownBlock2D"
    up_plain = "ResnetUpsampleBlock2D" if resblock_updown else "UpBlock2D"
    label_rows = params["label_embed"]["embedding"].shape[0] if "label_embed" in params else None
    return {
        "_class_name": "UNet2DModel",
        "_diffusers_version": DIFFUSERS_VERSION,
        "sample_size": int(sample_size),
        "in_channels": int(params["conv_in"]["kernel"].shape[2]),
        "out_channels": int(params["conv_out"]["kernel"].shape[3]),
        "center_input_sample": False,
        "time_embedding_type": "positional",
        "freq_shift": int(freq_shift) if freq_shift.is_integer() else freq_shift,
        "flip_sin_to_cos": bool(m.get("flip_sin_to_cos", False)),
        "down_block_types": ["AttnDownBlock2D" if attends else down_plain for attends in attention],
        "mid_block_type": "UNetMidBlock2D",
        "up_block_types": [
            "AttnUpBlock2D" if attends else up_plain for attends in reversed(attention)
        ],
        "block_out_channels": channels,
        "layers_per_block": int(m.num_res_blocks),
        "mid_block_scale_factor": 1,
        "downsample_padding": {"same": 0, "symmetric": 1}[padding],
        "downsample_type": "resnet" if resblock_updown else "conv",
        "upsample_type": "resnet" if resblock_updown else "conv",
        "dropout": float(m.dropout),
        "act_fn": "silu",
        "attention_head_dim": None if head_dim is None else int(head_dim),
        "norm_num_groups": int(m.num_groups),
        # Explicit: diffusers' mid-block attention has no GroupNorm with scale_shift otherwise.
        "attn_norm_num_groups": int(m.num_groups),
        "norm_eps": float(m.get("norm_eps", 1e-6)),
        "resnet_time_scale_shift": (
            "scale_shift" if m.get("use_scale_shift_norm", False) else "default"
        ),
        "add_attention": True,
        "class_embed_type": None,
        "num_class_embeds": None if label_rows is None else int(label_rows),
        "num_train_timesteps": None,
    }


def scheduler_config(config: ml_collections.ConfigDict) -> dict:
    """The diffusers ``DDPMScheduler`` config of the run's diffusion.

    A named schedule is written by name with its beta range when diffusers' formula gives our
    betas; otherwise (zero terminal SNR, or betas capped by the scaling to a small T) the betas
    themselves, as ``trained_betas``.

    Args:
      config: the run's config (``diffusion.*``).

    Returns:
      A JSON-ready dict for ``scheduler/scheduler_config.json``.

    Example:
      >>> scheduler_config(config)["beta_schedule"]
      'squaredcos_cap_v2'
    """
    d = config.diffusion
    num_timesteps = int(d.num_timesteps)
    # As config_lib.build_schedule, before the float32 tables: a saved config without these
    # fields was trained with the literal range and no rescaling.
    scale = bool(d.get("scale_to_num_timesteps", False))
    zero_terminal_snr = bool(d.get("zero_terminal_snr", False))
    betas = schedules.beta_table(d.schedule, num_timesteps, scale_to_num_timesteps=scale)
    factor = 1000 / num_timesteps if scale and d.schedule != "cosine" else 1.0
    beta_start, beta_end = (b * factor for b in _DDPM_BETA_RANGE)
    capped = d.schedule != "cosine" and bool(np.any(betas >= _MAX_BETA))
    table = {}
    if d.get("betas") is not None:  # a converted published schedule, given explicitly
        table = {"trained_betas": [float(b) for b in d.betas]}
    elif zero_terminal_snr or capped:
        # diffusers reads them as float32, as our tables store them.
        if zero_terminal_snr:
            betas = schedules.rescale_zero_terminal_snr(betas)
        table = {"trained_betas": [float(b) for b in betas]}
    return {
        "_class_name": "DDPMScheduler",
        "_diffusers_version": DIFFUSERS_VERSION,
        "num_train_timesteps": num_timesteps,
        "beta_start": beta_start,
        "beta_end": beta_end,
        "beta_schedule": _BETA_SCHEDULES[d.schedule],
        "trained_betas": None,
        "variance_type": _VARIANCE_TYPES[d.variance],
        "clip_sample": bool(d.clip_x0),
        "clip_sample_range": 1.0,
        "prediction_type": _PREDICTION_TYPES[d.parameterization],
        "thresholding": False,
        "timestep_spacing": "leading",
        "steps_offset": 0,
        "rescale_betas_zero_snr": False,
        **table,
    }
