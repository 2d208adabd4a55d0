"""Export a trained run to diffusers: a ``UNet2DModel`` and a ``DDPMScheduler`` in the hub layout.

Command line::

    python -m diffusion_jax.convert to-diffusers --workdir W --out DIR [--params ema|raw]
        [--checkpoint_step N] [--sample_size S]

writes ``DIR/unet/config.json``, ``DIR/unet/diffusion_pytorch_model.safetensors``,
``DIR/scheduler/scheduler_config.json`` and ``DIR/model_index.json``, so that
``diffusers.DDPMPipeline.from_pretrained(DIR)`` (or ``UNet2DModel.from_pretrained(DIR,
subfolder="unet")``) loads the run. The weights are written with ``safetensors.numpy``: no torch
is needed to export. The EMA parameters are exported by default (``--params raw`` for the
trained ones); ``--sample_size`` gives the image size when neither ``config.data.image_size``,
a converted workdir's ``data_info.json`` nor the dataset (prepared on this machine) tells it.

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

Example:
  >>> out = export(params, config, "/tmp/export", sample_size=32)
  >>> pipeline = diffusers.DDPMPipeline.from_pretrained(out)
"""

from __future__ import annotations

import argparse
import json
import os
import re
from typing import Any

import ml_collections
import numpy as np
from safetensors.numpy import save_file

from diffusion_jax import data, options, schedules
from diffusion_jax.evaluation.outputs import check_writable
from diffusion_jax.evaluation.runs import checkpoint_dir, read_data_info
from diffusion_jax.train import checkpoint as checkpoint_lib

__all__ = [
    "DIFFUSERS_VERSION",
    "add_arguments",
    "check_exportable",
    "export",
    "run",
    "scheduler_config",
    "unet_config",
    "unet_state_dict",
]

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


# Our module names -> diffusers' (``{i}`` is the up block's index, levels counted from the top).
_MODULES = (
    (r"temb_dense0", "time_embedding.linear_1"),
    (r"temb_dense1", "time_embedding.linear_2"),
    (r"label_embed", "class_embedding"),
    (r"conv_in", "conv_in"),
    (r"norm_out", "conv_norm_out"),
    (r"conv_out", "conv_out"),
    (r"mid_block(\d+)", "mid_block.resnets.{0}"),
    (r"mid_attn", "mid_block.attentions.0"),
    (r"down(\d+)_block(\d+)", "down_blocks.{0}.resnets.{1}"),
    (r"down(\d+)_attn(\d+)", "down_blocks.{0}.attentions.{1}"),
    (r"down(\d+)_downsample", "down_blocks.{0}.downsamplers.0"),
    (r"up(\d+)_block(\d+)", "up_blocks.{i}.resnets.{1}"),
    (r"up(\d+)_attn(\d+)", "up_blocks.{i}.attentions.{1}"),
    (r"up(\d+)_upsample", "up_blocks.{i}.upsamplers.0"),
)
# Sub-modules of our ResBlock and AttnBlock -> diffusers' ResnetBlock2D and Attention.
_SUBMODULES = {
    "norm1": "norm1",
    "conv1": "conv1",
    "temb_proj": "time_emb_proj",
    "norm2": "norm2",
    "conv2": "conv2",
    "skip": "conv_shortcut",
    "norm": "group_norm",
    "q": "to_q",
    "k": "to_k",
    "v": "to_v",
    "proj_out": "to_out.0",
}


def _module_name(name: str, num_levels: int) -> str:
    for pattern, target in _MODULES:
        match = re.fullmatch(pattern, name)
        if match:
            groups = match.groups()
            up_index = num_levels - 1 - int(groups[0]) if name.startswith("up") else None
            return target.format(*groups, i=up_index)
    raise ValueError(f"parameter {name!r} is not a module of the U-Net; cannot export it.")


def _tensor(path: tuple[str, ...], leaf: str, value: np.ndarray) -> tuple[str, np.ndarray]:
    """Our leaf -> (diffusers' leaf name, its array in PyTorch's layout)."""
    if leaf == "kernel" and value.ndim == 4:  # Conv HWIO -> OIHW
        return "weight", value.transpose(3, 2, 0, 1)
    if leaf == "kernel" and path[-1] == "skip":  # Dense [in, out] -> 1x1 Conv2d [out, in, 1, 1]
        return "weight", value.T[:, :, None, None]
    if leaf == "kernel":  # Dense [in, out] -> Linear [out, in]
        return "weight", value.T
    if leaf in ("scale", "embedding"):  # GroupNorm's scale, Embed's table
        return "weight", value
    if leaf == "bias":
        return "bias", value
    raise ValueError(f"parameter {'/'.join(path)}/{leaf} has no diffusers counterpart.")


def unet_state_dict(params: Any, num_levels: int, *, resblock_updown: bool = False) -> dict:
    """Our U-Net's parameters as the state dict of the equivalent diffusers ``UNet2DModel``.

    Every leaf is used once; convolution kernels are transposed from HWIO to OIHW, dense kernels
    from ``[in, out]`` to ``[out, in]`` (the 1x1 skip becomes a 1x1 convolution), GroupNorm's
    ``scale`` becomes ``weight``. The values are not changed, so importing the result back
    gives the same bits.

    Args:
      params: the U-Net's parameters, a nested dict of arrays.
      num_levels: ``len(model.ch_mult)``.
      resblock_updown: the resampling layers are ResNet blocks (else convolutions, whose
        diffusers name ends in ``.conv``).

    Returns:
      ``{diffusers key: float32 C-contiguous np.ndarray}``.

    Raises:
      ValueError: a parameter that is not part of the U-Net.

    Example:
      >>> state = unet_state_dict(params, 2)
      >>> state["conv_in.weight"].shape  # [out, in, 3, 3]
      (32, 3, 3, 3)
    """
    state = {}

    def visit(path: tuple[str, ...], tree: Any) -> None:
        for key, value in tree.items():
            if isinstance(value, dict) or hasattr(value, "items"):
                visit(path + (key,), value)
                continue
            prefix = _module_name(path[0], num_levels)
            if path[0].endswith(("_downsample", "_upsample")) and not resblock_updown:
                prefix += ".conv"
            inner = [_SUBMODULES.get(p) for p in path[1:]]
            if None in inner:
                raise ValueError(f"parameter {'/'.join(path)} has no diffusers counterpart.")
            name, array = _tensor(path, key, np.asarray(value, dtype=np.float32))
            full = ".".join([prefix, *inner, name])
            if full in state:
                raise ValueError(f"two parameters map to the diffusers key {full!r}.")
            state[full] = np.ascontiguousarray(array)

    visit((), params)
    return state


def export(params: Any, config: ml_collections.ConfigDict, out: str, *, sample_size: int) -> str:
    """Writes our U-Net and its schedule as a diffusers ``DDPMPipeline`` folder.

    Args:
      params: the U-Net's parameters.
      config: the run's config.
      out: the folder to write (created; files of the same names are replaced).
      sample_size: the image size the model was trained at.

    Returns:
      ``out``, absolute.

    Raises:
      ValueError: a config diffusers cannot represent (one line naming the field).
    """
    params = _plain(params)
    unet = unet_config(config, params, sample_size)
    scheduler = scheduler_config(config)
    state = unet_state_dict(
        params, len(config.model.ch_mult), resblock_updown=bool(config.model.resblock_updown)
    )
    out = os.path.abspath(os.fspath(out))
    for sub in ("unet", "scheduler"):
        os.makedirs(os.path.join(out, sub), exist_ok=True)
    save_file(
        state,
        os.path.join(out, "unet", "diffusion_pytorch_model.safetensors"),
        metadata={"format": "pt"},
    )
    pipeline = {
        "_class_name": "DDPMPipeline",
        "_diffusers_version": DIFFUSERS_VERSION,
        "scheduler": ["diffusers", "DDPMScheduler"],
        "unet": ["diffusers", "UNet2DModel"],
    }
    for path, content in (
        (("unet", "config.json"), unet),
        (("scheduler", "scheduler_config.json"), scheduler),
        (("model_index.json",), pipeline),
    ):
        with open(os.path.join(out, *path), "w") as f:
            json.dump(content, f, indent=2)
            f.write("\n")
    return out


def _plain(tree: Any) -> Any:
    """A nested plain dict of host NumPy arrays (from Flax's FrozenDict / jax.Array leaves)."""
    if hasattr(tree, "items"):
        return {key: _plain(value) for key, value in tree.items()}
    return np.asarray(tree)


def _sample_size(workdir: str, config: ml_collections.ConfigDict, requested: int | None) -> int:
    """The trained image size: ``requested``, else the config's, else the workdir's recorded
    data shape, else the dataset's."""
    if requested is not None:
        if requested < 1:
            raise options.ArgumentError(
                "--sample_size",
                "{name} must be a positive image size, got {value}.",
                value=requested,
            )
        return int(requested)
    if config.data.get("image_size", 0):
        return int(config.data.image_size)
    recorded = read_data_info(workdir, config)  # a converted workdir's data_info.json
    if recorded is not None:
        return int(recorded.shape[0])
    try:
        info = data.get_dataset_info(config.data.name, data_dir=config.data.data_dir or None)
        size = info.element_shape(None)[0]
    except Exception as error:  # not prepared here, unknown, mixed sizes: the user knows
        raise options.ArgumentError(
            "--sample_size",
            "cannot tell the trained image size from dataset {dataset!r} ({error}); pass it "
            "with {name}.",
            dataset=config.data.name,
            error=str(error).splitlines()[0] if str(error) else type(error).__name__,
        ) from None
    return int(size)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Adds the ``to-diffusers`` flags to ``parser``."""
    parser.add_argument("--workdir", required=True, help="the trained run's directory")
    parser.add_argument("--out", required=True, help="new folder for the diffusers pipeline")
    parser.add_argument(
        "--params",
        choices=options.PARAMS_CHOICES,
        default="ema",
        help="which parameters to export (default: ema)",
    )
    parser.add_argument("--checkpoint_step", type=int, default=None, help="default: newest")
    parser.add_argument(
        "--sample_size",
        type=int,
        default=None,
        help="trained image size (default: config.data.image_size, else the dataset's)",
    )


def run(args: argparse.Namespace) -> str:
    """Exports ``args.workdir`` into ``args.out`` (see the module docstring); returns ``out``.

    Raises:
      ArgumentError: a bad flag (``--out`` not a new or empty folder, ``--params``,
        ``--sample_size``).
      ValueError: a config diffusers cannot represent, or no readable checkpoint with its
        config in the workdir (the checkpoint reader's error, as one line).
      FileNotFoundError: no such workdir, or no checkpoint in it.
    """
    options.check("params", args.params, label="--params")
    out = check_writable(args.out, "--out", directory=True)
    if os.path.isdir(out) and os.listdir(out):
        raise options.ArgumentError(
            "--out", "{name} {path} is not empty; give a new folder.", path=out
        )
    ckpt_dir = checkpoint_dir(args.workdir)
    try:
        return _export_checkpoint(ckpt_dir, args, out)
    except checkpoint_lib.CheckpointError as error:  # a RuntimeError: one line, as ValueErrors
        raise ValueError(str(error).splitlines()[0]) from error


def _export_checkpoint(ckpt_dir: str, args: argparse.Namespace, out: str) -> str:
    saved = checkpoint_lib.read_config(ckpt_dir, args.checkpoint_step, warn=False)
    if saved is None:
        raise ValueError(f"The checkpoint of {args.workdir} was saved without its config.")
    config = ml_collections.ConfigDict(saved)
    sample_size = _sample_size(args.workdir, config, args.sample_size)
    # Refuse an unrepresentable config before reading any array.
    check_exportable(config, sample_size)
    scheduler_config(config)
    found = {}

    def abstract_for(step_config: dict | None) -> None:
        found["config"] = ml_collections.ConfigDict(step_config) if step_config else config
        return None  # the saved shapes, on this process's first device

    _, params = checkpoint_lib.restore_params_with_config(
        ckpt_dir, abstract_for, which=args.params, step=args.checkpoint_step
    )
    return export(params, found["config"], out, sample_size=sample_size)
