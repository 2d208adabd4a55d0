"""The train state and the functions one step runs: built from a config, jitted by
:mod:`diffusion_jax.train.loop`, which owns the loop, devices, checkpoints and logs.

Randomness: the key of optimiser step s is ``fold_in(train_key, s)`` (see :func:`run_keys`);
every draw inside the step (timesteps or EDM's sigmas, noise, dropout, label dropout) is over the
global batch, whose values do not depend on how the batch is sharded.

The loss is DDPM's (:func:`diffusion_jax.losses.training_loss` with ``config.diffusion``'s
options) or, with ``diffusion.formulation = "edm"``, EDM's (:func:`diffusion_jax.losses.edm.
edm_loss` on the model's ``denoise`` method, with ``config.edm``'s settings).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import optax

from diffusion_jax import _runtime, losses
from diffusion_jax.losses import edm as edm_losses
from diffusion_jax.models import example_inputs, make_model_fn
from diffusion_jax.models.preconditioned import make_denoise_fn
from diffusion_jax.train import config as config_lib
from diffusion_jax.train import sharding

__all__ = [
    "HISTORY",
    "TrainState",
    "create_train_state",
    "make_eval_step",
    "make_train_step",
    "run_keys",
    "to_model_input",
]

HISTORY = 10  # losses kept per timestep by the loss-second-moment timestep sampler
_UNIFORM_MIX = 1e-3  # improved DDPM mixes the importance weights with this much uniform


def run_keys(seed: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The run's three independent key streams: ``(init, train, eval)``. Step s of training
    uses ``fold_in(train, s)``; eval batch i uses ``fold_in(eval, i)``."""
    init_key, train_key, eval_key = jax.random.split(jax.random.key(seed), 3)
    return init_key, train_key, eval_key


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

    @classmethod
    def initial(cls, params: Any, tx: Any, num_timesteps: int) -> TrainState:
        """The state at step 0 of a run starting from ``params``: EMA equal to them (a copy,
        never the same buffers: PITFALLS), a fresh optimiser state, no losses recorded."""
        return cls(
            step=jnp.zeros((), jnp.int32),
            params=params,
            ema_params=jax.tree.map(jnp.copy, params),
            opt_state=tx.init(params),
            loss_history=jnp.zeros((num_timesteps, HISTORY), jnp.float32),
            loss_counts=jnp.zeros((num_timesteps,), jnp.int32),
        )


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
      ``jit(..., out_shardings=state_shardings)``, compiled as a program run once
      (``_runtime.jit(run_once=True)``: on the CPU without XLA's backend optimisations, a
      third of the compile time for the same values); ``abstract_state`` holds
      ``jax.ShapeDtypeStruct`` leaves with those shardings (for restoring).
    """
    num_timesteps = config.diffusion.num_timesteps
    conditional = bool(config.model.class_conditional)

    def init_fn() -> TrainState:
        x, t, kwargs = example_inputs(data_shape, conditional=conditional)
        params = model.init({"params": run_keys(config.seed)[0]}, x, t, **kwargs)["params"]
        return TrainState.initial(params, tx, num_timesteps)

    abstract = jax.eval_shape(init_fn)
    shardings = jax.tree.map(lambda _: sharding.replicated(mesh), abstract)
    abstract = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings
    )
    init = _runtime.jit(init_fn, run_once=True, out_shardings=shardings)
    return init, abstract, shardings


def _config_loss(config, model, schedule, *, train: bool):
    """``loss(params, x0, key, model_kwargs, timestep_probs=None) -> (loss, metrics)``: the
    training loss of ``config`` (DDPM's with ``config.diffusion``'s options, or EDM's)."""
    d = config.diffusion
    if config_lib.formulation(config) == "edm":
        denoise_fn = make_denoise_fn(model, train=train)
        e = config.edm

        def edm_loss(params, x0, key, model_kwargs, timestep_probs=None):
            del timestep_probs  # EDM draws sigma, not t (the config check keeps it uniform)
            return edm_losses.edm_loss(
                denoise_fn,
                params,
                x0,
                key,
                sigma_data=float(e.sigma_data),
                P_mean=float(e.P_mean),
                P_std=float(e.P_std),
                model_kwargs=model_kwargs,
            )

        return edm_loss
    model_fn = make_model_fn(model, train=train)

    def ddpm_loss(params, x0, key, model_kwargs, timestep_probs=None):
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

    return ddpm_loss


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
    config_loss = _config_loss(config, model, schedule, train=True)
    conditional = bool(config.model.class_conditional)
    accumulate = config.optim.accumulate_steps
    importance = d.timestep_sampler == "loss_second_moment"

    def loss_fn(params, x0, labels, key, probs):
        loss_key, dropout_key = jax.random.split(key)
        kwargs = {"rngs": {"dropout": dropout_key}}
        if conditional:
            kwargs["y"] = labels
        return config_loss(params, x0, loss_key, kwargs, probs)

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
            # Unrolled (k is small): XLA:CPU runs backward convolutions much slower inside a
            # while loop; the figures are in benchmarks/README.md, "Variants and findings".
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
        decay = config_lib.ema_decay(config, state.step)
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
            "grad_norm": metrics["grad_norm"],
            "learning_rate": learning_rate(state.step),
            "update_skipped": 1 - finite.astype(jnp.int32),
            "nonfinite_consecutive": optax.tree_utils.tree_get(opt_state, "notfinite_count"),
            "nonfinite_total": optax.tree_utils.tree_get(opt_state, "total_notfinite"),
        }
        if "vb" in metrics:  # EDM's loss has no bound term
            out["vb"] = metrics["vb"]
        return new_state, out

    return train_step


def make_eval_step(config: ml_collections.ConfigDict, model, schedule):
    """``(params, batch, index) -> loss``: the training loss without dropout, with a fixed key
    per eval batch so that held-out losses are comparable across the run."""
    config_loss = _config_loss(config, model, schedule, train=False)
    conditional = bool(config.model.class_conditional)

    def eval_step(params, batch, index):
        key = jax.random.fold_in(run_keys(config.seed)[2], index)
        kwargs = {"y": batch["label"]} if conditional else {}
        x0 = to_model_input(batch)
        return config_loss(params, x0, key, kwargs)[0]

    return eval_step
