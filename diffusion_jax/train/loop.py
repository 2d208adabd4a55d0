"""Data-parallel training: the loop that jits the step, feeds it, logs, checkpoints, resumes.

``train_and_evaluate(config, workdir)`` is the whole job; ``train.py`` only parses flags. The
state and the step itself are in :mod:`diffusion_jax.train.step`. Since every
draw in the step is over the global batch, the same global batch gives the same loss on 1 device
or 8.
"""

from __future__ import annotations

import logging
import os
import signal
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from tqdm.auto import tqdm

from diffusion_jax import _runtime, data
from diffusion_jax.train import checkpoint as checkpoint_lib
from diffusion_jax.train import config as config_lib
from diffusion_jax.train import generate, sharding
from diffusion_jax.train import metrics as metrics_lib
from diffusion_jax.train.step import (
    TrainState,
    create_train_state,
    make_eval_step,
    make_train_step,
)

__all__ = ["NonFiniteError", "train_and_evaluate"]


class NonFiniteError(RuntimeError):
    """Raised when too many consecutive updates had a non-finite loss or gradient."""


class _StopFlag:
    """Turns SIGTERM/SIGINT into a request to checkpoint and stop at the end of the step."""

    def __init__(self):
        self.signal = None
        self._previous = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: leave signals alone
                pass
        return self

    def _handle(self, signum, frame):
        if self.signal is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C means now
        self.signal = signum

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        return False


def _resolve_ckpt_dir(path: str) -> str:
    nested = os.path.join(path, "checkpoints")
    return nested if os.path.isdir(nested) else path


def train_and_evaluate(
    config: ml_collections.ConfigDict,
    workdir: str,
    *,
    allow_config_change: bool = False,
    devices: list[jax.Device] | None = None,
) -> TrainState:
    """Trains (or resumes training) the model of ``config``, writing everything to ``workdir``.

    Args:
      config: a config as declared in :mod:`diffusion_jax.train.defaults`.
      workdir: the run's directory: ``checkpoints/``, ``metrics.jsonl``, ``tensorboard/``,
        ``samples/`` and ``config.json``. An existing workdir is resumed from its latest good
        checkpoint.
      allow_config_change: resume even when ``config`` differs from the saved one in fields that
        change what is trained (fields such as ``train.num_steps`` may always change).
      devices: the devices to train on (default: all).

    Returns:
      The final :class:`TrainState`.
    """
    config_lib.validate_config(config)
    workdir = os.path.abspath(workdir)
    is_chief = jax.process_index() == 0
    mesh = sharding.make_mesh(devices)
    d, t = config.data, config.train
    data_dir = d.data_dir or None
    info = data.get_dataset_info(d.name, data_dir=data_dir)
    data_shape = info.element_shape(d.image_size or None)
    if d.batch_size % (mesh.size * config.optim.accumulate_steps):
        raise ValueError(
            f"config.data.batch_size = {d.batch_size} must be a multiple of the number of "
            f"devices ({mesh.size}) times config.optim.accumulate_steps "
            f"({config.optim.accumulate_steps})."
        )

    schedule = config_lib.build_schedule(config)
    model = config_lib.build_model(config, data_shape, info.num_classes)
    tx, learning_rate = config_lib.build_optimizer(config)
    init, abstract_state, state_shardings = create_train_state(config, model, tx, data_shape, mesh)
    ckpt = checkpoint_lib.CheckpointManager(
        os.path.join(workdir, "checkpoints"), max_to_keep=t.keep_checkpoints
    )
    iterator_kwargs = dict(
        data_dir=data_dir,
        image_size=d.image_size or None,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
    )
    train_iter = data.create_iterator(
        d.name,
        split=d.train_split,
        batch_size=d.batch_size,
        seed=config.seed,
        shuffle=True,
        num_epochs=None,
        random_flip=d.random_flip,
        **iterator_kwargs,
    )

    config_dict = config_lib.config_to_dict(config)
    latest = ckpt.latest_step()
    if latest is not None:
        saved = ckpt.read_config()
        if saved is not None and not allow_config_change:
            old, new = config_lib.identity_dict(saved), config_lib.identity_dict(config_dict)
            changed = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
            if changed:
                raise ValueError(
                    f"{workdir} was trained with a different config: {changed} differ "
                    f"(saved {[old.get(k) for k in changed]}, now "
                    f"{[new.get(k) for k in changed]}). Pass --allow_config_change to resume "
                    "anyway, or use a new workdir."
                )
        abstract_dict = abstract_state.to_dict()
        restored = ckpt.restore(abstract_dict)
        state = TrainState.from_dict(restored.state)
        if restored.data_state is not None:
            train_iter.set_state(restored.data_state)
        if is_chief:
            metrics_lib.truncate_metrics(workdir, restored.step)
        logging.info("Resumed %s from step %d.", workdir, restored.step)
    else:
        state = init()
        if t.init_from:
            params = checkpoint_lib.restore_params(
                _resolve_ckpt_dir(t.init_from), abstract_state.params, which="raw"
            )
            state = state.replace(params=params, ema_params=jax.tree.map(jnp.copy, params))
            logging.info("Initialised params from %s.", t.init_from)
    if is_chief:
        os.makedirs(workdir, exist_ok=True)
        with open(os.path.join(workdir, "config.json"), "w") as f:
            f.write(config.to_json(indent=2))

    batch_sharding = sharding.data_sharding(mesh)
    replicated = sharding.replicated(mesh)
    library_fusions = config_lib.cpu_library_fusions(config)
    train_step = _runtime.jit(
        make_train_step(config, model, schedule, tx, learning_rate, info.num_classes),
        library_fusions=library_fusions,
        in_shardings=(state_shardings, batch_sharding),
        out_shardings=(state_shardings, replicated),
        donate_argnums=0,
    )
    eval_step = _runtime.jit(
        make_eval_step(config, model, schedule), library_fusions=library_fusions
    )
    writer = metrics_lib.MetricsWriter(workdir, enabled=is_chief)

    def save(step: int) -> None:
        ckpt.save(
            step,
            state.to_dict(),
            data_state=train_iter.get_state(),
            config=config_dict,
            force=True,
        )

    def evaluate(step: int) -> None:
        eval_iter = data.create_iterator(
            d.name,
            split=d.eval_split,
            batch_size=d.batch_size,
            seed=config.seed,
            shuffle=False,
            num_epochs=1,
            random_flip=False,
            **iterator_kwargs,
        )
        values = []
        for index, batch in zip(range(t.eval_batches), eval_iter, strict=False):
            values.append(eval_step(state.ema_params, sharding.global_batch(batch, mesh), index))
        if values:
            writer.write(step, {"eval_loss": float(np.mean(jax.device_get(values)))})

    def write_samples(step: int) -> None:
        if t.num_samples:
            generate.write_training_samples(
                config, model, schedule, state.ema_params, info, data_shape, workdir, step, mesh
            )

    progress = None
    try:
        step = int(jax.device_get(state.step))
        progress = _progress(t.num_steps, step, enabled=is_chief and t.progress_bar)
        window_start, window_time = step, time.perf_counter()
        window_losses: list[jax.Array] = []
        previous: dict[str, jax.Array] | None = None
        with _StopFlag() as stop:
            while step < t.num_steps:
                batch = next(train_iter)
                state, out = train_step(state, sharding.global_batch(batch, mesh))
                step += 1
                window_losses.append(out["loss"])
                # Reading the previous step's counter keeps one step in flight on accelerators.
                if previous is not None:
                    _check_nonfinite(previous, t.max_nonfinite_steps, step - 1)
                previous = out
                progress.update(1)
                if step % t.log_every == 0 or step == t.num_steps:
                    _check_nonfinite(out, t.max_nonfinite_steps, step)
                    elapsed = time.perf_counter() - window_time
                    rate = (step - window_start) / max(elapsed, 1e-9)
                    values = {k: float(v) for k, v in jax.device_get(out).items()}
                    values["loss_mean"] = float(np.mean(jax.device_get(window_losses)))
                    values.update(steps_per_sec=rate, images_per_sec=rate * d.batch_size)
                    writer.write(step, values)
                    progress.set_postfix(
                        loss=f"{values['loss']:.4f}", img_s=f"{rate * d.batch_size:.0f}"
                    )
                    logging.info(
                        "step %d/%d loss %.5f (mean %.5f) %.2f steps/s %.0f images/s",
                        step, t.num_steps, values["loss"], values["loss_mean"], rate,
                        rate * d.batch_size,
                    )  # fmt: skip
                    window_start, window_time, window_losses = step, time.perf_counter(), []
                if t.eval_every and step % t.eval_every == 0:
                    evaluate(step)
                if (t.checkpoint_every and step % t.checkpoint_every == 0) or stop.signal:
                    save(step)
                if t.sample_every and step % t.sample_every == 0 and step != t.num_steps:
                    write_samples(step)
                if stop.signal:
                    logging.warning(
                        "Signal %s: checkpoint saved at step %d; stopping.", stop.signal, step
                    )
                    break
            else:
                if ckpt.latest_step() != step:
                    save(step)
                write_samples(step)
    finally:
        # Let in-flight async saves land even when the loop raised.
        if progress is not None:
            progress.close()
        ckpt.wait_until_finished()
        ckpt.close()
        writer.close()
    return state


def _check_nonfinite(out: dict[str, jax.Array], limit: int, step: int) -> None:
    consecutive = int(jax.device_get(out["nonfinite_consecutive"]))
    if consecutive >= limit:
        raise NonFiniteError(
            f"{consecutive} consecutive steps up to step {step} had a non-finite loss or "
            f"gradient; their updates were skipped and the parameters are unchanged since. "
            f"Stopping (train.max_nonfinite_steps = {limit}). Lower the learning rate, check "
            "the data, or use float32 compute."
        )


def _progress(total: int, initial: int, enabled: bool):
    return tqdm(total=total, initial=initial, disable=not enabled, unit="step", dynamic_ncols=True)
