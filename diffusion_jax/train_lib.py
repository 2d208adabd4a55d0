"""Data-parallel training: the train state, one jitted train step, and the loop that resumes.

``train_and_evaluate(config, workdir)`` is the whole job; ``train.py`` only parses flags.

Randomness: the key of optimiser step s is ``fold_in(train_key, s)`` (see ``run_keys``); every
draw inside the step (timesteps, noise, dropout, label dropout) is over the global batch, whose
values do not depend on how the batch is sharded, so the same global batch gives the same loss
on 1 device or 8.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from collections.abc import Callable
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from diffusion_jax import checkpoint as checkpoint_lib
from diffusion_jax import configuration, data, losses, sharding
from diffusion_jax import metrics as metrics_lib
from diffusion_jax.models import make_model_fn

__all__ = [
    "NonFiniteError",
    "TrainState",
    "create_train_state",
    "make_eval_step",
    "make_train_step",
    "run_keys",
    "to_model_input",
    "train_and_evaluate",
]

HISTORY = 10  # losses kept per timestep by the loss-second-moment timestep sampler
_UNIFORM_MIX = 1e-3  # improved DDPM mixes the importance weights with this much uniform


def run_keys(seed: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The run's three independent key streams: ``(init, train, eval)``. Step s of training
    uses ``fold_in(train, s)``; eval batch i uses ``fold_in(eval, i)``."""
    init_key, train_key, eval_key = jax.random.split(jax.random.key(seed), 3)
    return init_key, train_key, eval_key


class NonFiniteError(RuntimeError):
    """Raised when too many consecutive updates had a non-finite loss or gradient."""


@flax.struct.dataclass
class TrainState:
    """Everything a step reads and writes; saved whole in each checkpoint."""

    step: jax.Array  # [] int32, optimiser steps done
    params: Any  # model parameters, float32
    ema_params: Any  # exponential moving average of params
    opt_state: Any  # optax state (incl. apply_if_finite counters)
    loss_history: jax.Array  # [T, HISTORY] recent losses per timestep (loss-aware sampler)
    loss_counts: jax.Array  # [T] int32, losses recorded per timestep (capped at HISTORY)

    def to_dict(self) -> dict[str, Any]:
        """The state as a plain dict (what the checkpoint stores)."""
        return {name: getattr(self, name) for name in self.__dataclass_fields__}

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainState:
        """Inverse of :meth:`to_dict`."""
        return cls(**values)


def to_model_input(batch: dict[str, jax.Array]) -> jax.Array:
    """Scales a batch's data for the model, on the device: uint8 images to [-1, 1] float32,
    vectors as float32."""
    if "image" in batch:
        return batch["image"].astype(jnp.float32) / 127.5 - 1.0
    return batch["x"].astype(jnp.float32)


def _timestep_probs(state: TrainState) -> jax.Array:
    """improved DDPM's loss-second-moment sampler: p_t ~ sqrt(E[L_t^2]) once every t has
    HISTORY losses, uniform before."""
    num_timesteps = state.loss_counts.shape[0]
    uniform = jnp.full((num_timesteps,), 1.0 / num_timesteps)
    weights = jnp.sqrt(jnp.mean(state.loss_history**2, axis=1))
    weights = weights / jnp.maximum(jnp.sum(weights), 1e-12)
    weights = weights * (1.0 - _UNIFORM_MIX) + _UNIFORM_MIX / num_timesteps
    return jnp.where(jnp.all(state.loss_counts >= HISTORY), weights, uniform)


def _record_losses(state: TrainState, t: jax.Array, per_example: jax.Array) -> TrainState:
    def record(i, carry):
        history, counts = carry
        ti, loss = t[i], per_example[i]
        row, count = history[ti], counts[ti]
        full = count >= HISTORY
        shifted = jnp.where(full, jnp.roll(row, -1), row)
        slot = jnp.where(full, HISTORY - 1, count)
        history = history.at[ti].set(shifted.at[slot].set(loss))
        return history, counts.at[ti].set(jnp.minimum(count + 1, HISTORY))

    history, counts = jax.lax.fori_loop(
        0, t.shape[0], record, (state.loss_history, state.loss_counts)
    )
    return state.replace(loss_history=history, loss_counts=counts)


def create_train_state(
    config: ml_collections.ConfigDict,
    model,
    tx: optax.GradientTransformation,
    data_shape: tuple[int, ...],
    mesh: jax.sharding.Mesh,
) -> tuple[Callable[[], TrainState], TrainState, Any]:
    """How to build the initial state, directly in its (replicated) sharding.

    Returns:
      ``(init, abstract_state, state_shardings)``: ``init()`` creates the state under
      ``jax.jit(..., out_shardings=state_shardings)``; ``abstract_state`` holds
      ``jax.ShapeDtypeStruct`` leaves with those shardings (for restoring).
    """
    num_timesteps = config.diffusion.num_timesteps
    conditional = bool(config.model.class_conditional)

    def init_fn() -> TrainState:
        x = jnp.zeros((1, *data_shape), jnp.float32)
        t = jnp.zeros((1,), jnp.int32)
        kwargs = {"y": jnp.zeros((1,), jnp.int32)} if conditional else {}
        params = model.init({"params": run_keys(config.seed)[0]}, x, t, **kwargs)["params"]
        return TrainState(
            step=jnp.zeros((), jnp.int32),
            params=params,
            ema_params=jax.tree.map(jnp.copy, params),
            opt_state=tx.init(params),
            loss_history=jnp.zeros((num_timesteps, HISTORY), jnp.float32),
            loss_counts=jnp.zeros((num_timesteps,), jnp.int32),
        )

    abstract = jax.eval_shape(init_fn)
    shardings = jax.tree.map(lambda _: sharding.replicated(mesh), abstract)
    abstract = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings
    )
    init = jax.jit(init_fn, out_shardings=shardings)
    return init, abstract, shardings


def _config_loss(config, model_fn, params, schedule, x0, key, model_kwargs, timestep_probs=None):
    """``losses.training_loss`` with the options of ``config.diffusion``."""
    d = config.diffusion
    return losses.training_loss(
        model_fn,
        params,
        schedule,
        x0,
        key,
        parameterization=d.parameterization,
        variance=d.variance,
        loss_type=d.loss_type,
        min_snr_gamma=d.min_snr_gamma or None,
        model_kwargs=model_kwargs,
        timestep_probs=timestep_probs,
    )


def make_train_step(
    config: ml_collections.ConfigDict,
    model,
    schedule,
    tx: optax.GradientTransformation,
    learning_rate: optax.Schedule,
    num_classes: int | None,
) -> Callable[[TrainState, dict[str, jax.Array]], tuple[TrainState, dict[str, jax.Array]]]:
    """The (unjitted) train step: ``(state, global_batch) -> (state, scalar metrics)``.

    With ``optim.accumulate_steps = k`` the batch is split into k micro-batches whose gradients
    ``optax.MultiSteps`` averages into one optimiser step, so one call is always one step.
    """
    d = config.diffusion
    model_fn = make_model_fn(model, train=True)
    conditional = bool(config.model.class_conditional)
    accumulate = config.optim.accumulate_steps
    importance = d.timestep_sampler == "loss_second_moment"

    def loss_fn(params, x0, labels, key, probs):
        loss_key, dropout_key = jax.random.split(key)
        kwargs = {"rngs": {"dropout": dropout_key}}
        if conditional:
            kwargs["y"] = labels
        return _config_loss(config, model_fn, params, schedule, x0, loss_key, kwargs, probs)

    grad_fn = jax.grad(loss_fn, has_aux=True)

    def train_step(state: TrainState, batch: dict[str, jax.Array]):
        key = jax.random.fold_in(run_keys(config.seed)[1], state.step)
        label_key, step_key = jax.random.split(key)
        x0 = to_model_input(batch)
        labels = batch.get("label")
        if conditional and d.p_uncond > 0:
            drop = jax.random.uniform(label_key, labels.shape) < d.p_uncond
            labels = jnp.where(drop, num_classes, labels)
        probs = _timestep_probs(state) if importance else None

        def micro_step(carry, inputs):
            params, opt_state = carry
            x_micro, labels_micro, index = inputs
            grads, metrics = grad_fn(
                params, x_micro, labels_micro, jax.random.fold_in(step_key, index), probs
            )
            updates, opt_state = tx.update(grads, opt_state, params)
            params = optax.apply_updates(params, updates)
            metrics = dict(metrics, grad_norm=optax.tree.norm(grads))
            return (params, opt_state), metrics

        if accumulate == 1:
            (params, opt_state), metrics = micro_step(
                (state.params, state.opt_state), (x0, labels, 0)
            )
        else:

            def split(x):
                # [B, ...] -> [k, B/k, ...] keeping each device's rows together.
                x = x.reshape(x.shape[0] // accumulate, accumulate, *x.shape[1:])
                return jnp.moveaxis(x, 1, 0)

            micro_labels = None if labels is None else split(labels)
            # Unrolled: inside an XLA:CPU while loop the backward convolutions run 25-100x
            # slower (benchmarks/README.md, "Variants and findings"); k is small.
            (params, opt_state), stacked = jax.lax.scan(
                micro_step,
                (state.params, state.opt_state),
                (split(x0), micro_labels, jnp.arange(accumulate)),
                unroll=True,
            )
            metrics = {
                k: (v.reshape(-1) if v.ndim > 1 else jnp.mean(v)) for k, v in stacked.items()
            }

        finite = optax.tree_utils.tree_get(opt_state, "last_finite")
        decay = configuration.ema_decay(config, state.step)
        new_ema = optax.incremental_update(params, state.ema_params, step_size=1.0 - decay)
        ema = jax.tree.map(lambda n, o: jnp.where(finite, n, o), new_ema, state.ema_params)
        new_state = state.replace(
            step=state.step + 1, params=params, ema_params=ema, opt_state=opt_state
        )
        if importance:
            new_state = _record_losses(new_state, metrics["t"], metrics["per_example_loss"])
        out = {
            "loss": metrics["loss"],
            "mse": metrics["mse"],
            "vb": metrics["vb"],
            "grad_norm": metrics["grad_norm"],
            "learning_rate": learning_rate(state.step),
            "update_skipped": 1 - finite.astype(jnp.int32),
            "nonfinite_consecutive": optax.tree_utils.tree_get(opt_state, "notfinite_count"),
            "nonfinite_total": optax.tree_utils.tree_get(opt_state, "total_notfinite"),
        }
        return new_state, out

    return train_step


def make_eval_step(config: ml_collections.ConfigDict, model, schedule):
    """``(params, batch, index) -> loss``: the training loss without dropout, with a fixed key
    per eval batch so that held-out losses are comparable across the run."""
    model_fn = make_model_fn(model, train=False)
    conditional = bool(config.model.class_conditional)

    def eval_step(params, batch, index):
        key = jax.random.fold_in(run_keys(config.seed)[2], index)
        kwargs = {"y": batch["label"]} if conditional else {}
        x0 = to_model_input(batch)
        return _config_loss(config, model_fn, params, schedule, x0, key, kwargs)[0]

    return eval_step


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
      config: a config as declared in ``configs/default.py``.
      workdir: the run's directory: ``checkpoints/``, ``metrics.jsonl``, ``tensorboard/``,
        ``samples/`` and ``config.json``. An existing workdir is resumed from its latest good
        checkpoint.
      allow_config_change: resume even when ``config`` differs from the saved one in fields that
        change what is trained (fields such as ``train.num_steps`` may always change).
      devices: the devices to train on (default: all).

    Returns:
      The final :class:`TrainState`.
    """
    from diffusion_jax import sampling_lib

    configuration.validate_config(config)
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

    schedule = configuration.build_schedule(config)
    model = configuration.build_model(config, data_shape, info.num_classes)
    tx, learning_rate = configuration.build_optimizer(config)
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

    config_dict = configuration.config_to_dict(config)
    latest = ckpt.latest_step()
    if latest is not None:
        saved = ckpt.read_config()
        if saved is not None and not allow_config_change:
            old, new = configuration.identity_dict(saved), configuration.identity_dict(config_dict)
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
                _resolve_ckpt_dir(t.init_from), abstract_state.params, which="params"
            )
            state = state.replace(params=params, ema_params=jax.tree.map(jnp.copy, params))
            logging.info("Initialised params from %s.", t.init_from)
    if is_chief:
        os.makedirs(workdir, exist_ok=True)
        with open(os.path.join(workdir, "config.json"), "w") as f:
            f.write(config.to_json(indent=2))

    batch_sharding = sharding.data_sharding(mesh)
    replicated = sharding.replicated(mesh)
    train_step = jax.jit(
        make_train_step(config, model, schedule, tx, learning_rate, info.num_classes),
        in_shardings=(state_shardings, batch_sharding),
        out_shardings=(state_shardings, replicated),
        donate_argnums=0,
    )
    eval_step = jax.jit(make_eval_step(config, model, schedule))
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
            sampling_lib.write_training_samples(
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
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, disable=not enabled, unit="step", dynamic_ncols=True)
