"""Turning parameters into samples: batched, spread over devices, reproducible.

The trainer draws its periodic sample grids with it, and the evaluation tools (``sample.py``,
FID, the pictures of a run) build on it. Example ``i`` of a run always
gets the noise of run-wide index ``i`` (``samplers.sample(..., first_index=...)``), so the same
seed gives the same samples whatever the batch size or device count.
"""

from __future__ import annotations

import collections
import dataclasses
import os
from collections.abc import Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from tqdm.auto import tqdm

from diffusion_jax import _runtime, options, plots, samplers
from diffusion_jax.data import toy
from diffusion_jax.models import make_model_fn
from diffusion_jax.train import sharding

__all__ = [
    "cycled_labels",
    "generate",
    "generate_batches",
    "to_uint8",
    "write_samples",
    "write_training_samples",
]


def cycled_labels(config: ml_collections.ConfigDict, info, num: int) -> np.ndarray | None:
    """Labels 0, 1, ..., C-1, 0, 1, ... for ``num`` samples of a class-conditional model (every
    class in turn), or None for an unconditional one."""
    if config.model.class_conditional and info.num_classes:
        return np.arange(num, dtype=np.int32) % info.num_classes
    return None


def to_uint8(images: np.ndarray) -> np.ndarray:
    """[-1, 1] floats to uint8 pixels (rounded, clipped)."""
    return np.clip(np.round((np.asarray(images) + 1.0) * 127.5), 0, 255).astype(np.uint8)


def _clip_option(config: ml_collections.ConfigDict, is_image: bool) -> Any:
    return bool(config.diffusion.clip_x0) and is_image


@dataclasses.dataclass(frozen=True, eq=False)
class _DrawSettings:
    """What a compiled batch of samples depends on besides (params, labels, first index)."""

    model_fn: Any
    schedule: Any
    seed: int
    shape: tuple[int, ...]
    mesh: jax.sharding.Mesh
    method: str
    num_steps: int
    timestep_spacing: str
    edm: Any
    eta: float
    parameterization: str
    variance: str
    clip_x0: bool
    guidance_scale: float | None
    null_label: int | None

    def key(self) -> tuple:
        # model_fn and schedule by identity (the trainer passes the same objects to every
        # grid; a schedule's arrays are not hashable), the rest by value.
        by_identity = ("model_fn", "schedule")
        by_value = (
            getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in by_identity
        )
        return (id(self.model_fn), id(self.schedule), *by_value)


# The jitted sampler of recent settings, so that the trainer's periodic grids (and repeated
# calls from research code) trace and lower it once, not once per grid. Each entry holds its
# settings, so the objects whose ids make its key stay alive while it is cached.
_DRAW_CACHE: collections.OrderedDict[tuple, tuple[_DrawSettings, Any]] = collections.OrderedDict()
_DRAW_CACHE_SIZE = 4


def _draw_fn(settings: _DrawSettings):
    """The jitted ``draw(params, batch_labels, first_index)`` of ``settings``, built once."""
    key = settings.key()
    if key in _DRAW_CACHE:
        _DRAW_CACHE.move_to_end(key)
        return _DRAW_CACHE[key][1]
    s = settings
    rng = jax.random.key(s.seed)

    @_runtime.jit(out_shardings=sharding.data_sharding(s.mesh))
    def draw(params, batch_labels, first_index):
        kwargs, uncond = None, None
        if batch_labels is not None:
            kwargs = {"y": batch_labels}
            if s.guidance_scale is not None:
                uncond = {"y": jnp.full_like(batch_labels, s.null_label)}
        return samplers.sample(
            s.model_fn,
            params,
            s.schedule,
            rng,
            s.shape,
            method=s.method,
            num_steps=s.num_steps,
            timestep_spacing=s.timestep_spacing,
            edm=s.edm,
            eta=s.eta,
            parameterization=s.parameterization,
            variance=s.variance,
            clip_x0=s.clip_x0,
            model_kwargs=kwargs,
            guidance_scale=s.guidance_scale if batch_labels is not None else None,
            uncond_kwargs=uncond,
            first_index=first_index,
        )

    _DRAW_CACHE[key] = (settings, draw)
    while len(_DRAW_CACHE) > _DRAW_CACHE_SIZE:
        _DRAW_CACHE.popitem(last=False)
    return draw


def generate(
    config: ml_collections.ConfigDict,
    model,
    schedule,
    params: Any,
    data_shape: Sequence[int],
    *,
    num: int,
    batch_size: int,
    seed: int,
    method: options.SamplerMethod,
    num_steps: int,
    is_image: bool,
    eta: float = 0.0,
    timestep_spacing: options.Spacing = "linspace",
    edm: samplers.EDMOptions | None = None,
    labels: np.ndarray | None = None,
    null_label: int | None = None,
    guidance_scale: float | None = None,
    mesh: jax.sharding.Mesh | None = None,
    progress: bool = False,
) -> np.ndarray:
    """Draws ``num`` samples in batches of ``batch_size``, each batch split over ``mesh``, and
    returns them all (:func:`generate_batches` hands them over one batch at a time).

    Args:
      config: the run's config (its ``diffusion`` section says how the model was trained).
      model: the Linen module.
      schedule: the diffusion's schedule.
      params: the parameters to sample with (e.g. the EMA params).
      data_shape: ``(H, W, C)`` or ``(D,)``.
      num: number of samples.
      batch_size: samples per compiled call; a multiple of the mesh size.
      seed: the samples are a function of (seed, index) alone.
      method, num_steps, eta, timestep_spacing, edm: see
        :func:`diffusion_jax.samplers.sample`.
      is_image: images are clipped to [-1, 1] when ``config.diffusion.clip_x0``.
      labels: ``[num]`` int labels for a class-conditional model (validated by the caller).
      null_label: the unconditional label, for guidance.
      guidance_scale: classifier-free guidance weight, or ``None``.
      mesh: devices to split each batch over (default: every device).
      progress: show a progress bar over batches.

    Returns:
      float32 ``[num, *data_shape]``.

    Raises:
      ArgumentError: ``batch_size`` is not a positive multiple of the mesh size.
    """
    batches = generate_batches(
        config,
        model,
        schedule,
        params,
        data_shape,
        num=num,
        batch_size=batch_size,
        seed=seed,
        method=method,
        num_steps=num_steps,
        is_image=is_image,
        eta=eta,
        timestep_spacing=timestep_spacing,
        edm=edm,
        labels=labels,
        null_label=null_label,
        guidance_scale=guidance_scale,
        mesh=mesh,
        progress=progress,
    )
    return np.concatenate([samples for _, samples in batches], axis=0)


def generate_batches(
    config: ml_collections.ConfigDict,
    model,
    schedule,
    params: Any,
    data_shape: Sequence[int],
    *,
    num: int,
    batch_size: int,
    seed: int,
    method: options.SamplerMethod,
    num_steps: int,
    is_image: bool,
    eta: float = 0.0,
    timestep_spacing: options.Spacing = "linspace",
    edm: samplers.EDMOptions | None = None,
    labels: np.ndarray | None = None,
    null_label: int | None = None,
    guidance_scale: float | None = None,
    mesh: jax.sharding.Mesh | None = None,
    progress: bool = False,
) -> Iterator[tuple[int, np.ndarray]]:
    """The samples of :func:`generate`, one batch at a time, for callers that must not hold
    all ``num`` of them (FID over 50,000 images of 256x256).

    Takes the arguments of :func:`generate` and checks them when called (not on the first
    ``next``). Only one batch lives on the host at a time unless the caller keeps them; the
    concatenated batches equal :func:`generate`'s result.

    Returns:
      An iterator of ``(start, samples)``: ``samples`` float32 ``[n, *data_shape]`` are the
      samples of run-wide indices ``start .. start + n - 1`` (``n = batch_size``, less in
      the last batch).

    Raises:
      ArgumentError: ``batch_size`` is not a positive multiple of the mesh size.

    Example:
      >>> for start, samples in generate_batches(config, model, schedule, params, (32, 32, 3),
      ...                                        num=50_000, batch_size=250, seed=0,
      ...                                        method="ddim", num_steps=100, is_image=True):
      ...     features.update(to_uint8(samples))  # doctest: +SKIP
    """
    mesh = sharding.make_mesh() if mesh is None else mesh
    if batch_size < 1 or batch_size % mesh.size:
        raise options.ArgumentError(
            "batch_size",
            f"{{name}} must be a positive multiple of the number of devices ({mesh.size}), "
            f"got {batch_size}.",
        )
    d = config.diffusion
    out_sharding = sharding.data_sharding(mesh)
    settings = _DrawSettings(
        model_fn=make_model_fn(model, train=False),
        schedule=schedule,
        seed=seed,
        shape=(batch_size, *tuple(data_shape)),
        mesh=mesh,
        method=method,
        num_steps=num_steps,
        timestep_spacing=timestep_spacing,
        edm=edm,
        eta=eta,
        parameterization=d.parameterization,
        variance=d.variance,
        clip_x0=_clip_option(config, is_image),
        guidance_scale=guidance_scale,
        null_label=null_label,
    )
    draw = _draw_fn(settings)

    def batches() -> Iterator[tuple[int, np.ndarray]]:
        starts = range(0, num, batch_size)
        for start in tqdm(starts, disable=not progress, unit="batch", desc="sampling"):
            batch_labels = None
            if labels is not None:
                host_labels = np.zeros((batch_size,), np.int32)
                part = labels[start : start + batch_size]
                host_labels[: len(part)] = part
                batch_labels = jax.make_array_from_callback(
                    host_labels.shape, out_sharding, lambda index, a=host_labels: a[index]
                )
            # first_index is a traced value: one compilation serves every batch.
            samples = draw(params, batch_labels, jnp.int32(start))
            yield start, sharding.to_host(samples)[: num - start]

    return batches()


def write_samples(samples: np.ndarray, out: str, *, is_image: bool, data=None) -> str:
    """Writes a grid (images) or a scatter plot over ``data`` (2-D points) to ``out``."""
    if is_image:
        return plots.save_image_grid(to_uint8(samples), out)
    return plots.plot_points(samples, out, data=data)


def write_training_samples(
    config: ml_collections.ConfigDict,
    model,
    schedule,
    params: Any,
    info,
    data_shape: Sequence[int],
    workdir: str,
    step: int,
    mesh: jax.sharding.Mesh | None = None,
) -> str | None:
    """The trainer's periodic picture: ``workdir/samples/step_XXXXXXX.png`` from ``params``.

    Every process takes part in sampling (the batch is split over all devices); process 0
    writes the file.
    """
    t = config.train
    is_image = info.kind == "image"
    mesh = sharding.make_mesh() if mesh is None else mesh
    num = t.num_samples
    batch = -(-num // mesh.size) * mesh.size
    labels = cycled_labels(config, info, num)
    samples = generate(
        config,
        model,
        schedule,
        params,
        data_shape,
        num=num,
        batch_size=batch,
        seed=config.seed,
        method=t.sample_method,
        num_steps=t.sample_steps,
        is_image=is_image,
        labels=labels,
        mesh=mesh,
    )
    if jax.process_index() != 0:
        return None
    out = os.path.join(workdir, "samples", f"step_{step:07d}.png")
    reference = None if is_image else toy.reference_points(config.data.name)
    return write_samples(samples, out, is_image=is_image, data=reference)
