"""A trained run restored from its workdir: config, model, schedule and parameters.

Only the chosen parameters are read (no optimiser state, no random initialisation). Sampling
(`sample.py`), the bound, FID and the run pictures all start here.
"""

from __future__ import annotations

import functools
import logging
import os
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections

from diffusion_jax import sharding
from diffusion_jax.models import make_model_fn

__all__ = ["Run", "abstract_params", "eval_model_fn", "restore_run"]


@functools.lru_cache(maxsize=8)
def eval_model_fn(model):
    """The model's ``model_fn`` without dropout, one object per model (samplers key their
    compiled loops on it)."""
    # One model_fn per model: the sampler's compiled loop is keyed on it.
    return make_model_fn(model, train=False)


def abstract_params(model, data_shape, conditional: bool, mesh) -> Any:
    """The parameters' shapes, dtypes and (replicated) shardings, without allocating them."""
    x = jnp.zeros((1, *data_shape), jnp.float32)
    t = jnp.zeros((1,), jnp.int32)
    kwargs = {"y": jnp.zeros((1,), jnp.int32)} if conditional else {}
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
    which: str  # "ema" or "raw"
    mesh: Any  # jax.sharding.Mesh the params live on


def restore_run(
    workdir: str,
    *,
    which: str = "ema",
    checkpoint_step: int | None = None,
    data_dir: str | None = None,
    mesh=None,
) -> Run:
    """Restores a workdir's config, model and parameters (no optimiser state, no random init).

    Args:
      workdir: a training run's directory (with ``checkpoints/``).
      which: ``"ema"`` for the EMA parameters, ``"raw"`` for the trained ones.
      checkpoint_step: the checkpoint to read; None for the newest readable one (falling back
        past unreadable ones with a warning).
      data_dir: TFDS data directory, overriding the one saved in the config.
      mesh: devices to replicate the params over (default: every device).

    Returns:
      A :class:`Run`.

    Raises:
      FileNotFoundError: the workdir has no checkpoint.
      ValueError: a bad ``which`` or a ``checkpoint_step`` that does not exist.
    """
    from diffusion_jax import checkpoint as checkpoint_lib
    from diffusion_jax import configuration, data

    if which not in ("ema", "raw"):
        raise ValueError(f"--params must be 'ema' or 'raw', got {which!r}.")
    ckpt_dir = os.path.join(workdir, "checkpoints")
    manager = checkpoint_lib.CheckpointManager(ckpt_dir)
    available = manager.all_steps()
    if not available:
        manager.close()
        raise FileNotFoundError(f"No checkpoint in {ckpt_dir}: train first with train.py.")
    if checkpoint_step is not None and checkpoint_step not in available:
        manager.close()
        raise ValueError(f"No checkpoint at step {checkpoint_step}; available: {available}.")
    candidates = [checkpoint_step] if checkpoint_step is not None else sorted(available)[::-1]
    config = ml_collections.ConfigDict(manager.read_config(candidates[0]))
    manager.close()
    data_dir = data_dir or config.data.data_dir or None
    info = data.get_dataset_info(config.data.name, data_dir=data_dir)
    data_shape = info.element_shape(config.data.image_size or None)
    mesh = sharding.make_mesh() if mesh is None else mesh
    model = configuration.build_model(config, data_shape, info.num_classes)
    abstract = abstract_params(model, data_shape, bool(config.model.class_conditional), mesh)
    for index, step in enumerate(candidates):
        # An explicit step never falls back, so the step we report is the one we read.
        try:
            params = checkpoint_lib.restore_params(
                ckpt_dir, abstract, which="ema_params" if which == "ema" else "params", step=step
            )
            break
        except checkpoint_lib.CheckpointError:
            if index == len(candidates) - 1:
                raise
            logging.warning(
                "Checkpoint %d of %s is unreadable; trying an older one.", step, workdir
            )
    return Run(
        config=config,
        info=info,
        data_shape=tuple(data_shape),
        model=model,
        model_fn=eval_model_fn(model),
        schedule=configuration.build_schedule(config),
        params=params,
        step=int(step),
        which=which,
        mesh=mesh,
    )
