"""Data-parallel training: the loop that feeds the jitted step and does the periodic work.

``train_and_evaluate(config, workdir)`` is the whole job; ``train.py`` only parses flags. Its
pieces live beside it: the state and the step in :mod:`~diffusion_jax.train.step`, resuming or
initialising in :mod:`~diffusion_jax.train.resume`, log lines and the non-finite stop in
:mod:`~diffusion_jax.train.monitor`, when periodic work is due in
:mod:`~diffusion_jax.train.periodic`, SIGTERM in :mod:`~diffusion_jax.train.preemption`, the
start-up checks in :mod:`~diffusion_jax.train.preflight`, the workdir's lock in
:mod:`~diffusion_jax.train.lock`, and the batches read and placed on the devices ahead of the
step (``data.prefetch``) in :mod:`~diffusion_jax.train.prefetch`. In the steady state the host
waits for the device only to read the previous step's non-finite counter and at log steps.
Since every draw in the step is over the global batch, the same global batch gives the same
loss on 1 device or 8.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import ml_collections
import numpy as np
from jax.experimental import multihost_utils
from tqdm.auto import tqdm

from diffusion_jax import _runtime, data, schedules
from diffusion_jax.train import checkpoint as checkpoint_lib
from diffusion_jax.train import config as config_lib
from diffusion_jax.train import (
    generate,
    monitor,
    periodic,
    preemption,
    prefetch,
    preflight,
    resume,
    sharding,
)
from diffusion_jax.train import lock as lock_lib
from diffusion_jax.train import metrics as metrics_lib
from diffusion_jax.train.monitor import NonFiniteError
from diffusion_jax.train.preemption import Preempted
from diffusion_jax.train.step import TrainState, create_train_state, make_eval_step, make_train_step

__all__ = ["NonFiniteError", "Preempted", "train_and_evaluate"]


def train_and_evaluate(
    config: ml_collections.ConfigDict,
    workdir: str,
    *,
    allow_config_change: bool = False,
    devices: list[jax.Device] | None = None,
) -> TrainState:
    """Trains (or resumes training) the model of ``config``, writing everything to ``workdir``.

    First everything knowable before the first step is checked (:mod:`~diffusion_jax.train.
    preflight`: the config, the workdir, the data against the model) and the workdir is locked
    (:mod:`~diffusion_jax.train.lock`: one writer per workdir). After each step, work falls due
    through :func:`periodic.itstime`, in this order: a log line every ``train.log_every`` steps
    and at the last one; a checkpoint every ``train.checkpoint_every`` steps and at the last one,
    saved before anything else at that step can fail; the held-out loss every
    ``train.eval_every`` and a sample grid every ``train.sample_every`` steps. On resumption, the
    evaluation and grid due at the restored step are done again (a kill after the checkpoint
    would otherwise lose them). The run ends with a grid. SIGTERM (or Ctrl-C) saves and raises
    :class:`~diffusion_jax.train.preemption.Preempted`. A wall-clock budget
    (``train.max_seconds``, counted from the end of the first step) saves too, then ends the
    run as at ``train.num_steps`` (a grid, no exception); running again resumes it.

    Args:
      config: a config as declared in :mod:`diffusion_jax.train.defaults`.
      workdir: the run's directory: ``checkpoints/``, ``metrics.jsonl``, ``tensorboard/``,
        ``samples/``, ``config.json`` and the ``.lock`` of the run writing it. An existing
        workdir is resumed from its latest good checkpoint.
      allow_config_change: resume even when ``config`` differs from the saved one in fields that
        change what is trained (fields such as ``train.num_steps`` may always change).
      devices: the devices to train on (default: all).

    Returns:
      The final :class:`TrainState`.

    Raises:
      ValueError: an invalid config or a config that does not fit the data, naming the field;
        an ``options.ArgumentError`` naming ``workdir`` (empty, a file, not writable) or
        ``allow_config_change`` (``workdir`` was trained with a different config).
      FileNotFoundError: the dataset is not prepared.
      lock.WorkdirLockedError: another process is training ``workdir`` (named in the message).
      checkpoint.CheckpointError: no readable checkpoint to resume, or in ``train.init_from``.
      NonFiniteError: ``train.max_nonfinite_steps`` consecutive updates were not finite.
      Preempted: SIGTERM or SIGINT stopped the run after its checkpoint was saved.
    """
    config_lib.validate_config(config)
    workdir = preflight.check_workdir(workdir)
    info, data_shape = preflight.check_data(config)
    with lock_lib.WorkdirLock(workdir):  # taken by process 0, followed by all
        return _train(config, workdir, info, data_shape, allow_config_change, devices)


def _train(
    config: ml_collections.ConfigDict,
    workdir: str,
    info: data.DatasetInfo,
    data_shape: tuple[int, ...],
    allow_config_change: bool,
    devices: list[jax.Device] | None,
) -> TrainState:
    """The run itself, once checked and locked (see :func:`train_and_evaluate`)."""
    is_chief = jax.process_index() == 0
    mesh = sharding.make_mesh(devices)
    run = _build(config, info, data_shape, mesh)
    t = config.train
    train_iter = _iterator(config, train=True)
    config_dict = config_lib.config_to_dict(config)
    with checkpoint_lib.CheckpointManager(
        os.path.join(workdir, "checkpoints"), max_to_keep=t.keep_checkpoints
    ) as ckpt:
        state = resume.restore_or_init(
            config, workdir, ckpt, run.init, run.abstract_state, train_iter,
            allow_config_change=allow_config_change,
        )  # fmt: skip
        resume.write_config(config, workdir)
        step = int(jax.device_get(state.step))
        window = monitor.LogWindow(step, config.data.batch_size, t.max_nonfinite_steps)
        stopped = False
        with (
            metrics_lib.MetricsWriter(workdir, enabled=is_chief) as writer,
            _progress(t.num_steps, step, enabled=is_chief and t.progress_bar) as progress,
            preemption.StopFlag() as stop,
            # From here on only the prefetcher reads train_iter; its state is the position of
            # the last batch a step consumed, which is what a checkpoint must hold.
            _prefetcher(config, train_iter, mesh) as batches,
        ):
            # Resumed after a kill between a checkpoint and its step's evaluation or grid: redo
            # them (an evaluation already in metrics.jsonl is not written twice).
            if step and periodic.itstime(step, t.eval_every, t.num_steps):
                _evaluate(step, config, run.eval_step, state.ema_params, mesh, writer)
            if 0 < step < t.num_steps and periodic.itstime(step, t.sample_every, t.num_steps):
                _write_samples(config, run, state.ema_params, workdir, step, mesh)
            budget_start = None  # the clock of train.max_seconds starts after the first step
            out_of_time = False
            while step < t.num_steps and not stopped and not out_of_time:
                state, out = run.train_step(state, next(batches))
                step += 1
                budget_start = budget_start or time.monotonic()
                out_of_time = _out_of_time(budget_start, t.max_seconds, step, t.log_every)
                window.add(step, out)
                progress.update(1)
                if periodic.itstime(step, t.log_every, t.num_steps, last=True) or out_of_time:
                    _log(step, t.num_steps, window.flush(), writer, progress)
                stopped = stop.signal is not None  # read once: a save always precedes the stop
                due = periodic.itstime(step, t.checkpoint_every, t.num_steps, last=True)
                if due or stopped or out_of_time:
                    _save(ckpt, step, state, batches, config_dict)
                if stopped or out_of_time:
                    break
                if periodic.itstime(step, t.eval_every, t.num_steps):
                    _evaluate(step, config, run.eval_step, state.ema_params, mesh, writer)
                if periodic.itstime(step, t.sample_every, t.num_steps) and step < t.num_steps:
                    _write_samples(config, run, state.ema_params, workdir, step, mesh)
            if stopped:
                logging.warning(
                    "Signal %s: checkpoint saved at step %d; stopping.", stop.signal, step
                )
                raise preemption.Preempted(stop.signal, step)
            if out_of_time:
                logging.info("train.max_seconds = %s spent at step %d.", t.max_seconds, step)
            if ckpt.latest_step() != step:  # checkpoint_every = 0: nothing saved yet
                _save(ckpt, step, state, batches, config_dict)
            _write_samples(config, run, state.ema_params, workdir, step, mesh)
    return state


class _Run(NamedTuple):
    """What a run is made of, built from its config for one mesh."""

    info: data.DatasetInfo  # the dataset's shapes and classes
    data_shape: tuple[int, ...]  # one example: (H, W, C) or (D,)
    schedule: schedules.Schedule
    model: nn.Module
    init: Callable[[], TrainState]  # the initial state, born in its sharding
    abstract_state: TrainState  # its shapes, dtypes and shardings: the restore target
    train_step: Callable  # jitted (state, global_batch) -> (state, metrics); donates state
    eval_step: Callable  # jitted (ema_params, global_batch, index) -> loss


def _build(
    config: ml_collections.ConfigDict,
    info: data.DatasetInfo,
    data_shape: tuple[int, ...],
    mesh: jax.sharding.Mesh,
) -> _Run:
    """Data -> model -> optimiser -> state -> jitted steps, as ``config`` describes them.

    Raises:
      ValueError: the mesh does not fit the config (naming the field).
    """
    config_lib.validate_batch_split(config, mesh.size)
    schedule = config_lib.build_schedule(config)
    model = config_lib.build_model(config, data_shape, info.num_classes)
    tx, learning_rate = config_lib.build_optimizer(config)
    init, abstract_state, state_shardings = create_train_state(config, model, tx, data_shape, mesh)
    library_fusions = config_lib.cpu_library_fusions(config)
    train_step = _runtime.jit(
        make_train_step(config, model, schedule, tx, learning_rate, info.num_classes),
        library_fusions=library_fusions,
        in_shardings=(state_shardings, sharding.data_sharding(mesh)),
        out_shardings=(state_shardings, sharding.replicated(mesh)),
        donate_argnums=0,
    )
    eval_step = _runtime.jit(
        make_eval_step(config, model, schedule), library_fusions=library_fusions
    )
    return _Run(info, data_shape, schedule, model, init, abstract_state, train_step, eval_step)


def _save(
    ckpt: checkpoint_lib.CheckpointManager,
    step: int,
    state: TrainState,
    batches: prefetch.DevicePrefetcher,
    config_dict: dict,
) -> None:
    """Checkpoints the state with the position of the last batch consumed and the config."""
    data_state = batches.get_state()
    ckpt.save(step, state.to_dict(), data_state=data_state, config=config_dict, force=True)


def _write_samples(
    config: ml_collections.ConfigDict,
    run: _Run,
    params: Any,
    workdir: str,
    step: int,
    mesh: jax.sharding.Mesh,
) -> None:
    """Writes the sample grid of ``params`` at ``step`` (none if ``train.num_samples`` is 0)."""
    if config.train.num_samples:
        generate.write_training_samples(
            config, run.model, run.schedule, params, run.info, run.data_shape, workdir, step, mesh
        )


def _out_of_time(start: float, max_seconds: float, step: int, log_every: int) -> bool:
    """Whether ``train.max_seconds`` (0: no budget) have passed since ``start``, the end of
    the first step. With several processes the clock of process 0 decides, read at logging
    steps only (a broadcast is a host synchronisation), so that every process stops at the
    same step."""
    if not max_seconds:
        return False
    if jax.process_count() == 1:
        return time.monotonic() - start >= max_seconds
    if step % log_every:
        return False
    spent = np.asarray(time.monotonic() - start >= max_seconds)
    return bool(multihost_utils.broadcast_one_to_all(spent))


def _prefetcher(
    config: ml_collections.ConfigDict, train_iter: data.BatchIterator, mesh: jax.sharding.Mesh
) -> prefetch.DevicePrefetcher:
    """The global batches of ``train_iter``, placed on ``mesh`` up to ``data.prefetch`` ahead
    of the step by a background thread (:mod:`~diffusion_jax.train.prefetch`)."""
    return prefetch.DevicePrefetcher(
        train_iter, lambda batch: sharding.global_batch(batch, mesh), size=config.data.prefetch
    )


def _iterator(config: ml_collections.ConfigDict, *, train: bool) -> data.BatchIterator:
    """This process's share of the global batches: of the training split, shuffled and endless
    (``train=True``), or one pass over the held-out split in order."""
    d = config.data
    return data.create_iterator(
        d.name,
        split=d.train_split if train else d.eval_split,
        batch_size=d.batch_size,
        seed=config.seed,
        shuffle=train,
        num_epochs=None if train else 1,
        random_flip=d.random_flip if train else False,
        data_dir=d.data_dir or None,
        image_size=d.image_size or None,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
    )


def _evaluate(
    step: int,
    config: ml_collections.ConfigDict,
    eval_step: Callable,
    params: Any,
    mesh: jax.sharding.Mesh,
    writer: metrics_lib.MetricsWriter,
) -> None:
    """Writes ``eval_loss``: the mean loss of ``params`` over the first ``train.eval_batches``
    held-out batches (nothing if the split has none, or if ``step`` has one already: a
    resumed run evaluates its restored step again)."""
    batches = zip(range(config.train.eval_batches), _iterator(config, train=False), strict=False)
    losses = [eval_step(params, sharding.global_batch(b, mesh), index) for index, b in batches]
    if losses and not writer.recorded(step, "eval_loss"):
        writer.write(step, {"eval_loss": float(np.mean(jax.device_get(losses)))})


def _log(
    step: int,
    num_steps: int,
    values: dict[str, float],
    writer: metrics_lib.MetricsWriter,
    progress: tqdm,
) -> None:
    """One log line: to ``metrics.jsonl``/TensorBoard, the progress bar and the Python log."""
    writer.write(step, values)
    progress.set_postfix(loss=f"{values['loss']:.4f}", img_s=f"{values['images_per_sec']:.0f}")
    logging.info(
        "step %d/%d loss %.5f (mean %.5f) %.2f steps/s %.0f images/s",
        step, num_steps, values["loss"], values["loss_mean"], values["steps_per_sec"],
        values["images_per_sec"],
    )  # fmt: skip


def _progress(total: int, initial: int, enabled: bool) -> tqdm:
    """A tqdm bar over the run's steps (a silent one when not ``enabled``)."""
    return tqdm(total=total, initial=initial, disable=not enabled, unit="step", dynamic_ncols=True)
