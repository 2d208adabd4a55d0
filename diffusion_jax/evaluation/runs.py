"""A trained run restored from its workdir: config, model, schedule and parameters.

Only the chosen parameters are read (no optimiser state, no random initialisation). Sampling
(``sample.py``), the bound, FID and the pictures of a run all start here.
"""

from __future__ import annotations

import json
import os
from typing import Any, NamedTuple

import jax
import ml_collections

from diffusion_jax import data, options
from diffusion_jax.models import example_inputs, make_model_fn
from diffusion_jax.train import checkpoint as checkpoint_lib
from diffusion_jax.train import config as config_lib
from diffusion_jax.train import sharding

__all__ = [
    "DATA_INFO_FILE",
    "Run",
    "abstract_params",
    "checkpoint_dir",
    "read_data_info",
    "read_run_config",
    "restore_run",
]

# A workdir converted from published weights (diffusion_jax.convert) describes its data here, so
# that it samples with no dataset prepared: {"kind": "image", "shape": [H, W, C],
# "num_classes": null | int}.
DATA_INFO_FILE = "data_info.json"


def checkpoint_dir(workdir: str) -> str:
    """``workdir/checkpoints`` (absolute), checked to exist; nothing is created.

    Raises:
      FileNotFoundError: no such workdir, or no checkpoint in it.
    """
    workdir = os.path.abspath(os.fspath(workdir))
    if not os.path.isdir(workdir):
        raise FileNotFoundError(f"No such workdir {workdir}: check the path.")
    ckpt_dir = os.path.join(workdir, "checkpoints")
    if not os.path.isdir(ckpt_dir):
        raise FileNotFoundError(f"No checkpoint in {ckpt_dir}: train a model there first.")
    return ckpt_dir


def read_run_config(workdir: str, checkpoint_step: int | None = None) -> ml_collections.ConfigDict:
    """The config saved with a workdir's checkpoint, without reading any array.

    A tool checks a request against it (e.g. guidance needs a class-conditional model) before
    restoring anything heavy. The checkpoint is chosen as :func:`restore_run` chooses it; a
    skipped damaged one is not logged here, since the restore that follows warns about it.

    Raises:
      FileNotFoundError: as :func:`checkpoint_dir`.
      diffusion_jax.train.checkpoint.CheckpointError: no readable checkpoint.
    """
    saved = checkpoint_lib.read_config(checkpoint_dir(workdir), checkpoint_step, warn=False)
    if saved is None:
        raise checkpoint_lib.CheckpointError(
            f"The checkpoint of {workdir} was saved without its config."
        )
    return ml_collections.ConfigDict(saved)


def read_data_info(workdir: str, config: ml_collections.ConfigDict, data_dir: str | None = None):
    """The :class:`~diffusion_jax.data.DatasetInfo` recorded in ``workdir/data_info.json``
    (a converted workdir), or None when the workdir has no such file.

    Its name is ``config.data.name`` and it has no splits: enough to build the model and
    sample; the bound and FID open their evaluation data by name as usual.

    Raises:
      ValueError: a file that does not describe an image shape ``[H, W, C]``.
    """
    path = os.path.join(os.path.abspath(os.fspath(workdir)), DATA_INFO_FILE)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        recorded = json.load(f)
    shape = recorded.get("shape") if isinstance(recorded, dict) else None
    if not (isinstance(shape, list) and len(shape) == 3 and all(isinstance(n, int) for n in shape)):
        raise ValueError(f"{path} must hold {{'shape': [H, W, C], ...}}; got {recorded!r}.")
    return data.DatasetInfo(
        name=config.data.name,
        kind=recorded.get("kind", "image"),
        shape=tuple(shape),
        num_classes=recorded.get("num_classes"),
        splits={},
        data_dir=data_dir or config.data.data_dir or None,
        notes=recorded.get("notes", ""),
    )


def abstract_params(model, data_shape, conditional: bool, mesh) -> Any:
    """The parameters' shapes, dtypes and (replicated) shardings, without allocating them."""
    x, t, kwargs = example_inputs(tuple(data_shape), conditional=conditional)
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), x, t, **kwargs)["params"])
    replicated = sharding.replicated(mesh)
    return jax.tree.map(
        lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=replicated), shapes
    )


class Run(NamedTuple):
    """A trained model restored from a workdir, ready to evaluate or sample."""

    config: Any  # ml_collections.ConfigDict saved with the checkpoint
    info: Any  # data.DatasetInfo of config.data.name
    data_shape: tuple[int, ...]  # (H, W, C) or (D,)
    model: Any  # the Linen module
    model_fn: Any  # its model_fn(params, x_t, t, **kwargs), one object per model (no dropout)
    schedule: Any  # schedules.Schedule
    params: Any  # the restored parameters, replicated over ``mesh``
    step: int  # the checkpoint's step
    which: options.ParamsChoice  # "ema" or "raw"
    mesh: Any  # jax.sharding.Mesh the params live on


def restore_run(
    workdir: str,
    *,
    which: options.ParamsChoice = "ema",
    checkpoint_step: int | None = None,
    data_dir: str | None = None,
    mesh=None,
) -> Run:
    """Restores a workdir's config, model and parameters (no optimiser state, no random init).

    The config and the parameters come from the same checkpoint: with ``checkpoint_step=None``
    an unreadable newest checkpoint is skipped with a warning (the one fallback rule of
    :func:`diffusion_jax.train.checkpoint.restore_params`).

    Args:
      workdir: a training run's directory (with ``checkpoints/``).
      which: ``"ema"`` for the EMA parameters, ``"raw"`` for the trained ones.
      checkpoint_step: the checkpoint to read; None for the newest readable one.
      data_dir: TFDS data directory, overriding the one saved in the config.
      mesh: devices to replicate the params over (default: every device).

    Returns:
      A :class:`Run`.

    Raises:
      ArgumentError: ``which`` is neither ``"ema"`` nor ``"raw"``.
      FileNotFoundError: no such workdir, or it has no checkpoint.
      ValueError: a ``checkpoint_step`` that does not exist.
      diffusion_jax.train.checkpoint.CheckpointError: no checkpoint of the workdir is readable.
    """
    options.check("params", which, label="which")
    ckpt_dir = checkpoint_dir(workdir)
    mesh = sharding.make_mesh() if mesh is None else mesh
    built = {}

    def abstract_for(saved_config: dict) -> Any:
        config = ml_collections.ConfigDict(saved_config)
        # A converted workdir knows its data shape without the dataset (read_data_info).
        info = read_data_info(workdir, config, data_dir) or data.get_dataset_info(
            config.data.name, data_dir=data_dir or config.data.data_dir or None
        )
        data_shape = tuple(info.element_shape(config.data.image_size or None))
        model = config_lib.build_model(config, data_shape, info.num_classes)
        built.update(config=config, info=info, data_shape=data_shape, model=model)
        return abstract_params(model, data_shape, bool(config.model.class_conditional), mesh)

    step, params = checkpoint_lib.restore_params_with_config(
        ckpt_dir, abstract_for, which=which, step=checkpoint_step
    )
    return Run(
        config=built["config"],
        info=built["info"],
        data_shape=built["data_shape"],
        model=built["model"],
        model_fn=make_model_fn(built["model"], train=False),
        schedule=config_lib.build_schedule(built["config"]),
        params=params,
        step=int(step),
        which=which,
        mesh=mesh,
    )
