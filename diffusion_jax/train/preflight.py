"""Checks run before the first step: anything knowable at step 0 fails at step 0.

:func:`diffusion_jax.train.config.validate_config` checks each field alone. What it cannot see
is checked here, before anything heavy starts: the workdir (given, a directory, writable), the
optimiser's hyperparameters, how the model's levels and attention resolutions fit the data, and
that the training and held-out splits exist and hold a batch. A check that runs later (the first
evaluation, the first sample grid) would otherwise fail after N steps, for a reason that was
known before the first one.

A held-out split the dataset lacks is refused, not replaced: an image folder has only
``train``, and silently evaluating on the training split would publish a "held-out" loss that
is not held out. The message offers both ways out (``data.eval_split=train`` knowingly, or
``train.eval_every=0``).

Example:
  >>> workdir = check_workdir(workdir)  # absolute, created, writable
  >>> check_config(config)
  >>> info, data_shape = check_data(config)
"""

from __future__ import annotations

import math
import os
import tempfile

import ml_collections

from diffusion_jax import data, options

__all__ = ["check_config", "check_data", "check_workdir"]


def check_workdir(workdir: str | os.PathLike) -> str:
    """The absolute path of ``workdir``, created if needed, once it is known to be writable.

    Raises:
      options.ArgumentError: about ``workdir``: empty (an unset shell variable, say), a file,
        or a directory this process cannot create or write into.
    """
    text = os.fspath(workdir) if workdir is not None else ""
    if not text.strip():
        raise options.ArgumentError(
            "workdir",
            "{name} is empty (an unset shell variable?); give the run's directory, "
            "e.g. {name}=workdirs/digits.",
        )
    path = os.path.abspath(text)
    if os.path.exists(path) and not os.path.isdir(path):
        raise options.ArgumentError(
            "workdir", "{name}={path} is a file, not a directory; choose another path.", path=path
        )
    try:
        os.makedirs(path, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as err:
        raise options.ArgumentError(
            "workdir",
            "{name}={path} is not writable ({reason}); choose another path.",
            path=path,
            reason=err.strerror or str(err),
        ) from err
    return path


def _fail(field: str, value: object, requirement: str) -> None:
    raise ValueError(f"config.{field} = {value!r} is not valid; {requirement}")


def _finite(field: str, value: float, *, positive: bool = False) -> None:
    number = isinstance(value, int | float) and not isinstance(value, bool)
    if not number or not math.isfinite(value) or (positive and value <= 0) or value < 0:
        _fail(field, value, "it must be a finite number " + ("> 0." if positive else ">= 0."))


def _positive_ints(field: str, values: object, *, allow_empty: bool = False) -> tuple[int, ...]:
    ok = isinstance(values, tuple | list) and (allow_empty or len(values) > 0)
    ok = ok and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in values)
    if not ok:
        _fail(field, values, "it must be a tuple of positive integers" + (
            "." if allow_empty else ", not empty."))  # fmt: skip
    return tuple(values)


def check_config(config: ml_collections.ConfigDict) -> None:
    """Checks what :func:`~diffusion_jax.train.config.validate_config` does not: optimiser
    hyperparameters (Adam's b1, b2 in [0, 1), eps > 0, finite learning rate, decay and clip) and
    the model's own consistency (levels, attention resolutions, GroupNorm groups and heads).

    Raises:
      ValueError: naming the field, its value and what is allowed.
    """
    o, m = config.optim, config.model
    for name in ("b1", "b2"):
        value = o[name]
        if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value < 1:
            _fail(f"optim.{name}", value, "Adam's decay rates must lie in [0, 1).")
    _finite("optim.eps", o.eps, positive=True)
    _finite("optim.lr", o.lr, positive=True)
    _finite("optim.weight_decay", o.weight_decay)
    _finite("optim.grad_clip", o.grad_clip)
    if m.name != "unet":
        return
    ch_mult = _positive_ints("model.ch_mult", m.ch_mult)
    _positive_ints("model.attn_resolutions", m.attn_resolutions, allow_empty=True)
    channels = sorted({m.ch} | {m.ch * k for k in ch_mult})
    bad = [c for c in channels if c % m.num_groups]
    if bad:
        _fail(
            "model.num_groups",
            m.num_groups,
            f"GroupNorm needs it to divide every channel count {channels} (model.ch = {m.ch} "
            f"times model.ch_mult = {ch_mult}); {bad} are not divisible.",
        )
    bad = [m.ch * k for k in ch_mult if (m.ch * k) % m.num_heads]
    if bad:
        _fail("model.num_heads", m.num_heads, f"it must divide the channel counts {bad}.")


def _split_name(split: str) -> str:
    return split.split("[", 1)[0]


def _check_split(field: str, split: str, info: data.DatasetInfo, batch_size: int, hint: str):
    name = _split_name(split)
    if name not in info.splits:
        _fail(
            field,
            split,
            f"dataset {info.name!r} has the splits {sorted(info.splits)}. {hint}",
        )
    size = info.splits[name]
    if name == split and size < batch_size:
        _fail(
            field,
            split,
            f"it holds {size} examples, fewer than one batch (config.data.batch_size = "
            f"{batch_size}).",
        )


def check_data(config: ml_collections.ConfigDict) -> tuple[data.DatasetInfo, tuple[int, ...]]:
    """Checks the dataset against the config: the splits exist and hold a batch, the examples
    fit the model (images for a U-Net, with sides divisible by its downsampling and attention
    at resolutions it reaches; vectors for the MLP), labels exist for a conditional model.

    Returns:
      ``(info, data_shape)``: the dataset's description and one example's shape as the
      pipeline yields it.

    Raises:
      ValueError: naming the field to change.
      FileNotFoundError: the dataset is not prepared (the message gives the command).
    """
    d, m, t = config.data, config.model, config.train
    info = data.get_dataset_info(d.name, data_dir=d.data_dir or None)
    _check_split(
        "data.train_split", d.train_split, info, d.batch_size, "Set config.data.train_split."
    )
    if t.eval_every:
        _check_split(
            "data.eval_split",
            d.eval_split,
            info,
            d.batch_size,
            "Set config.data.eval_split to one of them (data.eval_split=train evaluates on the "
            "training data, knowingly), or turn the held-out loss off with train.eval_every=0.",
        )
    if info.kind == "image" and not d.image_size and None in info.shape:
        _fail(
            "data.image_size",
            d.image_size,
            f"dataset {info.name!r} holds images of different sizes: set it to resize and "
            "centre-crop them.",
        )
    if info.kind != "image" and (d.image_size or d.random_flip):
        _fail("data.image_size", d.image_size, f"{info.name!r} holds vectors, not images "
              "(data.image_size and data.random_flip must be 0 and False).")  # fmt: skip
    data_shape = info.element_shape(d.image_size or None)
    if m.class_conditional and not info.num_classes:
        _fail("model.class_conditional", True, f"dataset {info.name!r} has no labels.")
    if m.name == "mlp" and len(data_shape) != 1:
        _fail("model.name", m.name, f"the MLP takes vectors; {info.name!r} holds images "
              f"{data_shape}: use model.name = 'unet'.")  # fmt: skip
    if m.name == "unet":
        if len(data_shape) != 3:
            _fail("model.name", m.name, f"the U-Net takes images; {info.name!r} holds vectors "
                  f"{data_shape}: use model.name = 'mlp'.")  # fmt: skip
        _check_unet_fits(m, data_shape)
    return info, data_shape


def _check_unet_fits(m: ml_collections.ConfigDict, data_shape: tuple[int, ...]) -> None:
    """A U-Net of ``len(ch_mult)`` levels halves the sides ``len(ch_mult) - 1`` times."""
    height, width = data_shape[:2]
    levels = len(m.ch_mult)
    factor = 2 ** (levels - 1)
    if height % factor or width % factor:
        _fail(
            "model.ch_mult",
            tuple(m.ch_mult),
            f"its {levels} levels halve the image {levels - 1} times, so the sides must be "
            f"divisible by {factor}; the images are {height}x{width}. Use fewer levels or set "
            "config.data.image_size.",
        )
    reached = [height // 2**level for level in range(levels)]
    unreachable = [r for r in m.attn_resolutions if r not in reached]
    if unreachable:
        _fail(
            "model.attn_resolutions",
            tuple(m.attn_resolutions),
            f"{unreachable} are never reached: on {height}x{width} images the feature maps are "
            f"{reached} pixels high.",
        )
