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

The configs (what maps to what, and what is refused) are
:mod:`~diffusion_jax.convert.diffusers_export_config`.

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

from diffusion_jax import data, options
from diffusion_jax.convert.diffusers_export_config import (
    DIFFUSERS_VERSION,
    check_exportable,
    scheduler_config,
    unet_config,
)
from diffusion_jax.evaluation.outputs import check_writable
from diffusion_jax.evaluation.runs import checkpoint_dir, read_data_info
from diffusion_jax.train import checkpoint as checkpoint_lib

__all__ = ["add_arguments", "export", "run", "unet_state_dict"]

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
