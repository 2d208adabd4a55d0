"""Checks run before the first step: anything knowable at step 0 fails at step 0.

:func:`diffusion_jax.train.config.validate_config` checks the config itself (every field, the
optimiser's hyperparameters, the U-Net's own consistency). What it cannot see is checked here,
before anything heavy starts: the workdir (given, a directory, writable), how the model's levels
and attention resolutions fit the data, and that the training and held-out splits exist and hold
a batch. A check that runs later (the first
evaluation, the first sample grid) would otherwise fail after N steps, for a reason that was
known before the first one.

A held-out split the dataset lacks is refused, not replaced: an image folder has only
``train``, and silently evaluating on the training split would publish a "held-out" loss that
is not held out. The message offers both ways out (``data.eval_split=train`` knowingly, or
``train.eval_every=0``).

Example:
  >>> workdir = check_workdir(workdir)  # absolute, created, writable
  >>> info, data_shape = check_data(config)
"""

from __future__ import annotations

import os
import tempfile

import ml_collections

from diffusion_jax import data, options

__all__ = ["check_data", "check_workdir"]


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
