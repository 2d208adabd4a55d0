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

What maps to what: the config fields in :mod:`.diffusers_config` (refusing, with one line
naming the field and its value, anything our U-Net cannot represent exactly), the weights in
:mod:`.diffusers_weights` (every key used exactly once, else one line naming the key).

Example:
  >>> _, unet, scheduler, _ = read_configs("ddpm-cifar10-32")  # doctest: +SKIP
  >>> config = build_config(unet, scheduler)  # doctest: +SKIP
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Mapping
from typing import Any

import ml_collections

from diffusion_jax.convert import workdir
from diffusion_jax.convert.diffusers_config import (
    SCHEDULER_DEFAULTS,
    UNET_DEFAULTS,
    diffusers_betas,
    field_error,
    scheduler_fields,
    unet_fields,
)
from diffusion_jax.convert.diffusers_weights import (
    WEIGHT_NAMES,
    convert_state_dict,
    load_state_dict,
)
from diffusion_jax.train import config as config_lib

__all__ = [
    "SCHEDULER_DEFAULTS",
    "UNET_DEFAULTS",
    "WEIGHT_NAMES",
    "add_arguments",
    "build_config",
    "convert_state_dict",
    "diffusers_betas",
    "load_state_dict",
    "num_classes",
    "read_configs",
    "run",
    "scheduler_fields",
    "unet_fields",
]


NULL_LABELS = ("append", "last")


def num_classes(num_class_embeds: int | None, null_label: str) -> int | None:
    """Our number of classes for a U-Net with ``num_class_embeds`` label rows: all of them with
    a null row appended (``"append"``), or all but the last, which is the null label
    (``"last"``); None for an unconditional U-Net.

    Raises:
      ValueError: an unknown ``null_label``, or ``"last"`` with a single row.

    Example:
      >>> num_classes(10, "append"), num_classes(11, "last"), num_classes(None, "append")
      (10, 10, None)
    """
    if null_label not in NULL_LABELS:
        raise ValueError(f"--null_label {null_label!r}: choose one of {NULL_LABELS}")
    if num_class_embeds is None:
        return None
    if null_label == "last":
        if num_class_embeds < 2:
            raise field_error(
                "num_class_embeds", num_class_embeds, "--null_label last needs a class besides it"
            )
        return num_class_embeds - 1
    return num_class_embeds


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
        raise field_error(
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


# --- The command line -------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Adds ``--src``, ``--unet``, ``--scheduler``, ``--dataset``, ``--null_label``, ``--out``."""
    parser.add_argument("--src", help="hub-layout folder (unet/, scheduler/) or a flat folder")
    parser.add_argument("--unet", help="the U-Net folder (config.json + weights)")
    parser.add_argument("--scheduler", help="the scheduler folder or scheduler_config.json")
    parser.add_argument(
        "--dataset",
        default=None,
        help="config.data.name of the workdir (default: cifar10 for a cifar10 model, else "
        "'converted'); the bound and FID evaluate on it",
    )
    parser.add_argument(
        "--null_label",
        choices=NULL_LABELS,
        default="append",
        help="a class-conditional U-Net (num_class_embeds): append a zero row as the null label "
        "of classifier-free guidance (default), or take the last row as it (a to-diffusers "
        "export)",
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
    net = unet_fields(unet_config)
    null_label = getattr(args, "null_label", "append")
    classes = num_classes(net["num_class_embeds"], null_label)
    shape = (config.data.image_size, config.data.image_size, net["channels"])
    params = convert_state_dict(load_state_dict(unet_dir), config, shape, num_classes=classes)
    source = {
        "format": "diffusers",
        "unet": os.path.abspath(unet_dir),
        "scheduler": scheduler_path and os.path.abspath(scheduler_path),
        "unet_config": unet_config,
        "scheduler_config": scheduler_config,
        "null_label": null_label if classes is not None else None,
    }
    return workdir.write_workdir(args.out, config, params, source=source)
