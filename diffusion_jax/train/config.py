"""From a config to the objects it describes: validation, schedule, model and optimiser.

Every field the trainer reads is declared, with its comment, in
:mod:`diffusion_jax.train.defaults`; a config with a key the default does not have, or with an
invalid value, fails here before anything heavy starts, with an error naming the key.
"""

from __future__ import annotations

import json
import math
import warnings
from typing import Any

import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from diffusion_jax import models, options, schedules
from diffusion_jax.models.preconditioned import Preconditioned
from diffusion_jax.train import defaults

__all__ = [
    "RUN_FIELDS",
    "build_model",
    "build_optimizer",
    "build_schedule",
    "config_to_dict",
    "cpu_library_fusions",
    "default_config",
    "ema_decay",
    "formulation",
    "identity_dict",
    "validate_batch_split",
    "validate_config",
]

# Fields that may change between a run and its resumption without changing what is trained.
RUN_FIELDS = (
    "data.data_dir",
    "data.prefetch",
    "diffusion.allow_prior_mismatch",
    "train.num_steps",
    "train.max_seconds",
    "train.log_every",
    "train.checkpoint_every",
    "train.sample_every",
    "train.eval_every",
    "train.eval_batches",
    "train.keep_checkpoints",
    "train.max_nonfinite_steps",
    "train.cpu_library_fusions",
    "train.num_samples",
    "train.sample_method",
    "train.sample_steps",
    "train.progress_bar",
)


def default_config() -> ml_collections.ConfigDict:
    """The default config (:func:`diffusion_jax.train.defaults.get_config`), the reference for
    every field."""
    return defaults.get_config()


def config_to_dict(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """A JSON-safe plain dict of ``config`` (tuples become lists)."""
    return json.loads(config.to_json())


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flatten(value, name + "."))
        else:
            flat[name] = value
    return flat


# Fields added after runs were saved without them, with the value that reproduces those runs:
# a missing one compares equal to it when a run is resumed.
FILLED_WHEN_MISSING = {
    "diffusion.formulation": "ddpm",
    "edm.sigma_data": 0.5,
    "edm.P_mean": -1.2,
    "edm.P_std": 1.2,
    "diffusion.betas": None,
    "model.norm_eps": 1e-6,
    "model.downsample_padding": "same",
    "model.flip_sin_to_cos": False,
    "model.freq_shift": 1.0,
    "model.head_dim": None,
    "model.timestep_scale": 1.0,
}


def identity_dict(config_dict: dict[str, Any]) -> dict[str, Any]:
    """The flattened fields that define what a run trains (all but :data:`RUN_FIELDS`), with
    :data:`FILLED_WHEN_MISSING` filled in."""
    flat = dict(FILLED_WHEN_MISSING) | _flatten(config_dict)
    return {k: v for k, v in flat.items() if k not in RUN_FIELDS}


def formulation(config: ml_collections.ConfigDict) -> options.Formulation:
    """``config.diffusion.formulation``: ``"ddpm"``, or ``"edm"`` for EDM's preconditioned
    denoiser and loss (a config saved before the field existed is ``"ddpm"``)."""
    return config.diffusion.get("formulation", "ddpm")


def _choice(name: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        raise ValueError(f"config.{name} = {value!r} is not valid; expected one of {allowed}.")


def _option(name: str, value: Any, option: str) -> None:
    """A field holding one of the core's options (:mod:`diffusion_jax.options`)."""
    _choice(name, value, options.ALLOWED[option])


def _positive(name: str, value: Any, *, allow_zero: bool = False, finite: bool = False) -> None:
    number = isinstance(value, int | float) and not isinstance(value, bool)
    ok = number and (value >= 0 if allow_zero else value > 0)
    if not ok or (finite and not math.isfinite(value)):
        bound = ">= 0" if allow_zero else "> 0"
        kind = "a finite number" if finite else "a number"
        raise ValueError(f"config.{name} = {value!r} is not valid; it must be {kind} {bound}.")


def _positive_ints(name: str, values: Any, *, allow_empty: bool = False) -> tuple[int, ...]:
    ok = isinstance(values, tuple | list) and (allow_empty or len(values) > 0)
    ok = ok and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in values)
    if not ok:
        empty = "." if allow_empty else ", not empty."
        raise ValueError(
            f"config.{name} = {values!r} is not valid; it must be a tuple of positive "
            f"integers{empty}"
        )
    return tuple(values)


def _check_unet(m: ml_collections.ConfigDict) -> None:
    """The U-Net's own consistency: its levels, attention resolutions, groups and heads."""
    ch_mult = _positive_ints("model.ch_mult", m.ch_mult)
    _positive_ints("model.attn_resolutions", m.attn_resolutions, allow_empty=True)
    channels = sorted({m.ch} | {m.ch * k for k in ch_mult})
    bad = [c for c in channels if c % m.num_groups]
    if bad:
        raise ValueError(
            f"config.model.num_groups = {m.num_groups!r} is not valid; GroupNorm needs it to "
            f"divide every channel count {channels} (model.ch = {m.ch} times model.ch_mult = "
            f"{ch_mult}); {bad} are not divisible."
        )
    bad = [m.ch * k for k in ch_mult if (m.ch * k) % m.num_heads]
    if bad and m.head_dim is None:
        raise ValueError(
            f"config.model.num_heads = {m.num_heads!r} is not valid; it must divide the "
            f"channel counts {bad}."
        )
    if m.head_dim is not None and (
        isinstance(m.head_dim, bool) or not isinstance(m.head_dim, int) or m.head_dim < 1
    ):
        raise ValueError(
            f"config.model.head_dim = {m.head_dim!r} is not valid; it must be a positive "
            "integer (channels per attention head) or None (use model.num_heads)."
        )
    _choice("model.downsample_padding", m.downsample_padding, ("same", "symmetric"))
    _positive("model.norm_eps", m.norm_eps, finite=True)
    _positive("model.timestep_scale", m.timestep_scale, finite=True)
    if not isinstance(m.freq_shift, int | float) or not math.isfinite(m.freq_shift):
        raise ValueError(f"config.model.freq_shift = {m.freq_shift!r} must be a finite number.")


def validate_config(config: ml_collections.ConfigDict) -> None:
    """Checks every key and value of a training config.

    Raises:
      ValueError: naming the first unknown key or invalid value, and what is allowed.
    """
    known = _flatten(config_to_dict(default_config()))
    given = _flatten(config_to_dict(config))
    unknown = sorted(set(given) - set(known))
    if unknown:
        raise ValueError(
            f"Unknown config keys {unknown}; every field is declared in "
            "diffusion_jax/train/defaults.py."
        )
    missing = sorted(set(known) - set(given))
    if missing:
        raise ValueError(f"Config is missing keys {missing} (see diffusion_jax/train/defaults.py).")

    d, m, o, t = config.diffusion, config.model, config.optim, config.train
    _option("diffusion.schedule", d.schedule, "schedule")
    _positive("diffusion.num_timesteps", d.num_timesteps)
    _option("diffusion.parameterization", d.parameterization, "parameterization")
    _option("diffusion.variance", d.variance, "variance")
    _option("diffusion.loss_type", d.loss_type, "loss_type")
    if d.loss_type == "hybrid" and d.variance != "learned_range":
        raise ValueError(
            "config.diffusion.loss_type = 'hybrid' trains the variance: it needs "
            f"config.diffusion.variance = 'learned_range', got {d.variance!r}."
        )
    _positive("diffusion.min_snr_gamma", d.min_snr_gamma, allow_zero=True)
    if not 0.0 <= d.p_uncond < 1.0:
        raise ValueError(f"config.diffusion.p_uncond = {d.p_uncond} must lie in [0, 1).")
    if d.p_uncond > 0 and not m.class_conditional:
        raise ValueError(
            "config.diffusion.p_uncond > 0 drops labels for classifier-free guidance: it needs "
            "config.model.class_conditional = True."
        )
    _option("diffusion.timestep_sampler", d.timestep_sampler, "timestep_sampler")
    _option("diffusion.formulation", d.formulation, "formulation")
    if d.formulation == "edm":
        _check_edm(config)
    _check_schedule(config)
    _choice("model.name", m.name, ("unet", "mlp"))
    if not 0.0 <= m.dropout < 1.0:
        raise ValueError(f"config.model.dropout = {m.dropout} must lie in [0, 1).")
    if m.name == "unet":
        _check_unet(m)
    _choice("optim.optimizer", o.optimizer, ("adam", "adamw"))
    for name in ("b1", "b2"):
        value = o[name]
        if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value < 1:
            raise ValueError(
                f"config.optim.{name} = {value!r} is not valid; Adam's decay rates must lie in "
                "[0, 1)."
            )
    _positive("optim.eps", o.eps, finite=True)
    _positive("optim.lr", o.lr, finite=True)
    _positive("optim.weight_decay", o.weight_decay, allow_zero=True, finite=True)
    _positive("optim.warmup_steps", o.warmup_steps, allow_zero=True)
    _choice("optim.lr_schedule", o.lr_schedule, ("constant", "cosine"))
    _positive("optim.grad_clip", o.grad_clip, allow_zero=True, finite=True)
    _positive("optim.accumulate_steps", o.accumulate_steps)
    if not 0.0 <= o.ema_decay < 1.0:
        raise ValueError(f"config.optim.ema_decay = {o.ema_decay} must lie in [0, 1).")
    _positive("data.batch_size", config.data.batch_size)
    _positive("data.image_size", config.data.image_size, allow_zero=True)
    _positive("data.prefetch", config.data.prefetch, allow_zero=True)
    if config.data.batch_size % o.accumulate_steps:
        raise ValueError(
            f"config.data.batch_size = {config.data.batch_size} must be a multiple of "
            f"config.optim.accumulate_steps = {o.accumulate_steps}."
        )
    for name in ("num_steps", "log_every", "keep_checkpoints", "max_nonfinite_steps"):
        _positive(f"train.{name}", t[name])
    for name in ("checkpoint_every", "sample_every", "eval_every", "eval_batches", "num_samples"):
        _positive(f"train.{name}", t[name], allow_zero=True)
    _positive("train.max_seconds", t.max_seconds, allow_zero=True, finite=True)
    _choice("train.compute_dtype", t.compute_dtype, ("float32", "bfloat16"))
    _choice("train.cpu_library_fusions", t.cpu_library_fusions, ("auto", "on", "off"))
    _option("train.sample_method", t.sample_method, "method")
    _positive("train.sample_steps", t.sample_steps)
    if t.sample_steps > d.num_timesteps:
        raise ValueError(
            f"config.train.sample_steps = {t.sample_steps} exceeds "
            f"config.diffusion.num_timesteps = {d.num_timesteps}."
        )


def validate_batch_split(config: ml_collections.ConfigDict, num_devices: int) -> None:
    """Checks that the global batch splits evenly over ``num_devices`` devices and
    ``config.optim.accumulate_steps`` micro-batches.

    Raises:
      ValueError: naming ``config.data.batch_size``, the device count and the micro-batches.
    """
    batch_size, accumulate = config.data.batch_size, config.optim.accumulate_steps
    if batch_size % (num_devices * accumulate):
        raise ValueError(
            f"config.data.batch_size = {batch_size} must be a multiple of the number of "
            f"devices ({num_devices}) times config.optim.accumulate_steps ({accumulate})."
        )


def build_schedule(config: ml_collections.ConfigDict) -> schedules.Schedule:
    """The noise schedule of ``config.diffusion``.

    A config saved before ``scale_to_num_timesteps`` and ``zero_terminal_snr`` existed was
    trained with the literal beta range and no rescaling, so a missing field means False.
    Explicit ``diffusion.betas`` (a converted published schedule) replace the named schedule.
    """
    d = config.diffusion
    if d.get("betas") is not None:
        return schedules.from_betas(np.asarray(d.betas, dtype=np.float64))
    return schedules.get_schedule(
        d.schedule,
        d.num_timesteps,
        scale_to_num_timesteps=bool(d.get("scale_to_num_timesteps", False)),
        zero_terminal_snr=bool(d.get("zero_terminal_snr", False)),
    )


def _check_schedule(config: ml_collections.ConfigDict) -> None:
    """The schedule reaches noise (or the config allows it) and suits the parameterisation."""
    d = config.diffusion
    if d.betas is not None:
        betas = d.betas
        if not isinstance(betas, list | tuple) or len(betas) != d.num_timesteps:
            raise ValueError(
                f"config.diffusion.betas must be None or a list of config.diffusion.num_timesteps "
                f"= {d.num_timesteps} numbers; got {type(betas).__name__} of length "
                f"{len(betas) if isinstance(betas, list | tuple) else '-'}."
            )
        try:
            schedules.from_betas(np.asarray(betas, dtype=np.float64))
        except (TypeError, ValueError) as error:
            raise ValueError(f"config.diffusion.betas is not valid: {error}") from None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the refusal below says more than get_schedule's warning
        schedule = build_schedule(config)
    try:
        schedules.check_parameterization(schedule, d.parameterization)
    except ValueError as error:
        raise ValueError(
            f"config.diffusion.zero_terminal_snr = True needs config.diffusion.parameterization "
            f"'v' or 'x0', got {d.parameterization!r}: {error}"
        ) from None
    if not d.allow_prior_mismatch:
        try:
            schedules.check_prior(schedule)
        except ValueError as error:
            raise ValueError(
                f"config.diffusion ({d.schedule!r}, num_timesteps = {d.num_timesteps}, "
                f"scale_to_num_timesteps = {d.scale_to_num_timesteps}): {error} Or set "
                "config.diffusion.allow_prior_mismatch = True to train anyway."
            ) from None


def _check_edm(config: ml_collections.ConfigDict) -> None:
    """EDM's settings, and the DDPM options EDM's training fixes (one error naming the field)."""
    d, e = config.diffusion, config.edm
    _positive("edm.sigma_data", e.sigma_data, finite=True)
    _positive("edm.P_std", e.P_std, finite=True)
    if isinstance(e.P_mean, bool) or not isinstance(e.P_mean, int | float):
        raise ValueError(f"config.edm.P_mean = {e.P_mean!r} is not valid; it must be a number.")
    if not math.isfinite(e.P_mean):
        raise ValueError(f"config.edm.P_mean = {e.P_mean!r} is not valid; it must be finite.")
    why = "config.diffusion.formulation = 'edm' trains a denoiser of x0 with a fixed variance"
    conflicts = (
        ("parameterization", d.parameterization != "x0", "set it to 'x0' (what it predicts)"),
        ("variance", d.variance == "learned_range", "use 'fixed_small' or 'fixed_large'"),
        ("loss_type", d.loss_type != "simple", "use 'simple' (EDM's loss replaces it)"),
        ("min_snr_gamma", d.min_snr_gamma != 0, "use 0 (EDM weights its loss itself)"),
        ("timestep_sampler", d.timestep_sampler != "uniform", "use 'uniform' (unused by EDM)"),
        ("zero_terminal_snr", bool(d.zero_terminal_snr), "use False (sigma = inf at t = T-1)"),
    )
    for name, conflict, fix in conflicts:
        if conflict:
            raise ValueError(f"config.diffusion.{name} = {d[name]!r} conflicts: {why}; {fix}.")


def build_model(config: ml_collections.ConfigDict, data_shape: tuple, num_classes: int | None):
    """The denoiser of ``config.model`` for data of ``data_shape`` (``(H, W, C)`` or ``(D,)``).

    The output has C (or D) channels, doubled for a learned variance. With
    ``diffusion.formulation = "edm"`` the network is wrapped in EDM's preconditioning
    (:class:`~diffusion_jax.models.preconditioned.Preconditioned`): called as usual it predicts
    x0 at the schedule's timesteps, and its ``denoise`` method is what EDM's loss trains.
    """
    m = config.model
    channels = data_shape[-1]
    out = 2 * channels if config.diffusion.variance == "learned_range" else channels
    if m.class_conditional and not num_classes:
        raise ValueError(
            f"config.model.class_conditional = True but dataset {config.data.name!r} has no labels."
        )
    classes = num_classes if m.class_conditional else None
    dtype = jnp.bfloat16 if config.train.compute_dtype == "bfloat16" else jnp.float32
    if m.name == "mlp":
        if len(data_shape) != 1:
            raise ValueError(f"model.name = 'mlp' needs vector data [B, D], got {data_shape}.")
        # The MLP's width and depth are the config's ch and num_res_blocks.
        fields = {"features": m.ch, "num_layers": m.num_res_blocks, "out_dim": out}
    else:
        if len(data_shape) != 3:
            raise ValueError(f"model.name = 'unet' needs images [B, H, W, C], got {data_shape}.")
        fields = {
            "ch": m.ch,
            "ch_mult": m.ch_mult,
            "num_res_blocks": m.num_res_blocks,
            "attn_resolutions": m.attn_resolutions,
            "out_channels": out,
            "num_groups": m.num_groups,
            "num_heads": m.num_heads,
            "conv_resample": m.conv_resample,
            "resblock_updown": m.resblock_updown,
            "use_scale_shift_norm": m.use_scale_shift_norm,
            "remat": m.remat,
            # Configs saved before these options existed describe the DDPM network.
            "norm_eps": float(m.get("norm_eps", 1e-6)),
            "downsample_padding": m.get("downsample_padding", "same"),
            "flip_sin_to_cos": bool(m.get("flip_sin_to_cos", False)),
            "freq_shift": float(m.get("freq_shift", 1.0)),
            "head_dim": m.get("head_dim"),
            "timestep_scale": float(m.get("timestep_scale", 1.0)),
        }
    net = models.get_model(m.name, dropout=m.dropout, num_classes=classes, dtype=dtype, **fields)
    if formulation(config) != "edm":
        return net
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a prior mismatch is the config checks' business
        alphas_cumprod = build_schedule(config).alphas_cumprod
    return Preconditioned(
        net,
        alphas_cumprod=tuple(float(a) for a in alphas_cumprod),
        sigma_data=float(config.edm.sigma_data),
    )


def build_optimizer(
    config: ml_collections.ConfigDict,
) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """Adam/AdamW with linear warm-up then constant or cosine decay, global-norm clipping,
    skipping of non-finite updates (``optax.apply_if_finite``) and gradient accumulation
    (``optax.MultiSteps``).

    Returns:
      ``(tx, learning_rate_schedule)``; the schedule counts optimiser steps.
    """
    o, t = config.optim, config.train
    warmup = min(o.warmup_steps, t.num_steps)
    if o.lr_schedule == "cosine":
        lr = optax.warmup_cosine_decay_schedule(0.0, o.lr, warmup, max(t.num_steps, warmup + 1))
    else:
        lr = optax.join_schedules(
            [optax.linear_schedule(0.0, o.lr, warmup), optax.constant_schedule(o.lr)], [warmup]
        )
    if o.optimizer == "adamw":
        inner = optax.adamw(lr, b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay)
    else:
        inner = optax.adam(lr, b1=o.b1, b2=o.b2, eps=o.eps)
    if o.grad_clip > 0:
        inner = optax.chain(optax.clip_by_global_norm(o.grad_clip), inner)
    # The trainer stops the run itself after train.max_nonfinite_steps consecutive skips, so the
    # optax limit (after which updates would be applied anyway) is never reached.
    tx = optax.apply_if_finite(inner, max_consecutive_errors=2**31 - 1)
    if o.accumulate_steps > 1:
        tx = optax.MultiSteps(tx, every_k_schedule=o.accumulate_steps)
    return tx, lr


# Base width from which XLA:CPU's YNNPACK convolutions beat its own in the train step
# (benchmarks/README.md, "XLA:CPU library fusions").
WIDE_CHANNELS = 128


def cpu_library_fusions(config: ml_collections.ConfigDict) -> bool:
    """Whether the train step keeps XLA:CPU's YNNPACK library fusions (``train.
    cpu_library_fusions``; ``auto``: for U-Nets with ``model.ch >= WIDE_CHANNELS``). Passed to
    :func:`diffusion_jax.jit`; no effect on other backends."""
    choice = config.train.cpu_library_fusions
    if choice == "auto":
        return config.model.get("ch", 0) >= WIDE_CHANNELS
    return choice == "on"


def ema_decay(config: ml_collections.ConfigDict, step) -> Any:
    """The EMA decay at an optimiser step (with the optional warm-up of short runs)."""
    decay = config.optim.ema_decay
    if config.optim.ema_warmup:
        return jnp.minimum(decay, (1.0 + step) / (10.0 + step))
    return jnp.asarray(decay, jnp.float32) + 0.0 * step
