"""Starting a run: resume a workdir from its latest good checkpoint, or initialise a new one.

Resuming restores everything a step reads (parameters, EMA, optimiser state, loss history and
the step counter) and the data iterator's position, and drops the metric lines logged after
that checkpoint, so a run killed at any moment continues exactly as if it had not been. The
config may change between a run and its resumption only in the fields that do not change
what is trained (:data:`diffusion_jax.train.config.RUN_FIELDS`), unless the caller allows it.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from diffusion_jax import options
from diffusion_jax.train import checkpoint as checkpoint_lib
from diffusion_jax.train import config as config_lib
from diffusion_jax.train import metrics as metrics_lib
from diffusion_jax.train.step import TrainState

__all__ = ["check_config_unchanged", "init_params_from", "restore_or_init", "write_config"]

CONFIG_FILE = "config.json"


def check_config_unchanged(
    saved: Mapping[str, Any] | None, config_dict: Mapping[str, Any], workdir: str
) -> None:
    """Refuses to resume ``workdir`` with a config that trains something else.

    Args:
      saved: the config saved with the checkpoint (None for a checkpoint saved without one,
        which is accepted).
      config_dict: the config of this run, as :func:`config.config_to_dict` gives it.
      workdir: the run's directory, for the message.

    Raises:
      options.ArgumentError: about ``allow_config_change``, naming the fields that differ
        outside :data:`config.RUN_FIELDS`, with their saved and new values.
    """
    if saved is None:
        return
    old, new = config_lib.identity_dict(dict(saved)), config_lib.identity_dict(dict(config_dict))
    changed = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    if changed:
        raise options.ArgumentError(
            "allow_config_change",
            "{workdir} was trained with a different config: {changed} differ (saved {saved}, "
            "now {now}). Pass {name}=True to resume anyway, or use a new workdir.",
            workdir=workdir,
            changed=changed,
            saved=[old.get(k) for k in changed],
            now=[new.get(k) for k in changed],
        )


def _checkpoint_dir(path: str) -> str:
    """A workdir's ``checkpoints/`` if it has one, else ``path`` itself."""
    nested = os.path.join(path, "checkpoints")
    return nested if os.path.isdir(nested) else path


def init_params_from(state: TrainState, source: str, abstract_params: Any) -> TrainState:
    """``state`` with the raw parameters of another run's latest good checkpoint, as both its
    parameters and their EMA (fine-tuning: ``train.init_from``).

    Args:
      state: a freshly initialised state.
      source: a workdir or a checkpoint directory.
      abstract_params: ``jax.ShapeDtypeStruct`` leaves with shardings, like ``state.params``.

    Raises:
      checkpoint.CheckpointError: no readable checkpoint in ``source``.
    """
    params = checkpoint_lib.restore_params(_checkpoint_dir(source), abstract_params, which="raw")
    logging.info("Initialised params from %s.", source)
    return state.replace(params=params, ema_params=jax.tree.map(jnp.copy, params))


def restore_or_init(
    config: ml_collections.ConfigDict,
    workdir: str,
    ckpt: checkpoint_lib.CheckpointManager,
    init: Callable[[], TrainState],
    abstract_state: TrainState,
    train_iter: Any,
    *,
    allow_config_change: bool = False,
) -> TrainState:
    """The state to train from: the latest good checkpoint of ``ckpt``, or ``init()``.

    On resumption ``train_iter`` is moved to the saved position and, on process 0, the
    records of ``metrics.jsonl`` after the checkpoint's step are dropped (all of them when
    there is no checkpoint: they belong to a run killed before its first save). A new run takes its
    parameters from ``config.train.init_from`` when set.

    Args:
      config: the run's (validated) config.
      workdir: the run's directory.
      ckpt: the run's checkpoint manager.
      init: builds the initial state (from :func:`step.create_train_state`).
      abstract_state: the state's shapes, dtypes and shardings (idem).
      train_iter: the training data iterator (``get_state``/``set_state``).
      allow_config_change: resume even if the saved config trains something else.

    Raises:
      options.ArgumentError: the saved config differs (see :func:`check_config_unchanged`).
      checkpoint.CheckpointError: no checkpoint is readable, here or in ``init_from``.
    """
    if ckpt.latest_step() is None:
        if jax.process_index() == 0:  # records of a run killed before its first checkpoint
            metrics_lib.truncate_metrics(workdir, 0)
        state = init()
        if config.train.init_from:
            state = init_params_from(state, config.train.init_from, abstract_state.params)
        return state
    if not allow_config_change:
        check_config_unchanged(ckpt.read_config(), config_lib.config_to_dict(config), workdir)
    # A data position the iterator refuses (even one saved before the JSON digests existed)
    # makes that step unreadable, so the restore falls back to the one before it.
    restored = ckpt.restore(
        abstract_state.to_dict(),
        check=lambda r: r.data_state is None or train_iter.set_state(r.data_state),
    )
    if jax.process_index() == 0:
        metrics_lib.truncate_metrics(workdir, restored.step)
    logging.info("Resumed %s from step %d.", workdir, restored.step)
    return TrainState.from_dict(restored.state)


def write_config(config: ml_collections.ConfigDict, workdir: str) -> None:
    """Writes ``config`` to ``workdir/config.json`` (on process 0; creates ``workdir``)."""
    if jax.process_index() == 0:
        os.makedirs(workdir, exist_ok=True)
        with open(os.path.join(workdir, CONFIG_FILE), "w") as f:
            f.write(config.to_json(indent=2))
