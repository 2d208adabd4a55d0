"""Turning trained parameters into samples: batched, spread over devices, reproducible.

Shared by the trainer (periodic sample grids) and ``sample.py``. Example ``i`` of a run always
gets the noise of run-wide index ``i`` (``samplers.sample(..., first_index=...)``), so the same
seed gives the same samples whatever the batch size or device count.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from diffusion_jax import compiler, plots, samplers, sharding
from diffusion_jax.runs import Run, eval_model_fn, restore_run

__all__ = [
    "Run",
    "check_method",
    "generate",
    "generate_from_run",
    "parse_labels",
    "resolve_steps",
    "restore_run",
    "sample_from_workdir",
    "to_uint8",
    "write_samples",
    "write_training_samples",
]


def to_uint8(images: np.ndarray) -> np.ndarray:
    """[-1, 1] floats to uint8 pixels (rounded, clipped)."""
    return np.clip(np.round((np.asarray(images) + 1.0) * 127.5), 0, 255).astype(np.uint8)


def _clip_option(config: ml_collections.ConfigDict, is_image: bool) -> Any:
    return bool(config.diffusion.clip_x0) and is_image


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
    method: str,
    num_steps: int,
    is_image: bool,
    eta: float = 0.0,
    labels: np.ndarray | None = None,
    null_label: int | None = None,
    guidance_scale: float | None = None,
    mesh: jax.sharding.Mesh | None = None,
    progress: bool = False,
) -> np.ndarray:
    """Draws ``num`` samples in batches of ``batch_size``, each batch split over ``mesh``.

    Args:
      config: the run's config (its ``diffusion`` section says how the model was trained).
      model: the Linen module.
      schedule: the diffusion's schedule.
      params: the parameters to sample with (e.g. the EMA params).
      data_shape: ``(H, W, C)`` or ``(D,)``.
      num: number of samples.
      batch_size: samples per compiled call; a multiple of the mesh size.
      seed: the samples are a function of (seed, index) alone.
      method, num_steps, eta: see :func:`diffusion_jax.samplers.sample`.
      is_image: images are clipped to [-1, 1] when ``config.diffusion.clip_x0``.
      labels: ``[num]`` int labels for a class-conditional model (validated by the caller).
      null_label: the unconditional label, for guidance.
      guidance_scale: classifier-free guidance weight, or ``None``.
      mesh: devices to split each batch over (default: every device).
      progress: show a progress bar over batches.

    Returns:
      float32 ``[num, *data_shape]``.
    """
    mesh = sharding.make_mesh() if mesh is None else mesh
    if batch_size % mesh.size:
        raise ValueError(
            f"batch_size {batch_size} must be a multiple of the number of devices ({mesh.size})."
        )
    d = config.diffusion
    model_fn = eval_model_fn(model)
    key = jax.random.key(seed)
    out_sharding = sharding.data_sharding(mesh)

    @compiler.jit(out_shardings=out_sharding)
    def draw(params, batch_labels, first_index):
        kwargs, uncond = None, None
        if batch_labels is not None:
            kwargs = {"y": batch_labels}
            if guidance_scale is not None:
                uncond = {"y": jnp.full_like(batch_labels, null_label)}
        return samplers.sample(
            model_fn,
            params,
            schedule,
            key,
            (batch_size, *data_shape),
            method=method,
            num_steps=num_steps,
            eta=eta,
            parameterization=d.parameterization,
            variance=d.variance,
            clip_x0=_clip_option(config, is_image),
            model_kwargs=kwargs,
            guidance_scale=guidance_scale if batch_labels is not None else None,
            uncond_kwargs=uncond,
            first_index=first_index,
        )

    from tqdm.auto import tqdm

    chunks = []
    starts = range(0, num, batch_size)
    for start in tqdm(starts, disable=not progress, unit="batch", desc="sampling"):
        batch_labels = None
        if labels is not None:
            batch_labels = np.zeros((batch_size,), np.int32)
            part = labels[start : start + batch_size]
            batch_labels[: len(part)] = part
            host_labels = batch_labels
            batch_labels = jax.make_array_from_callback(
                host_labels.shape, out_sharding, lambda index, a=host_labels: a[index]
            )
        # first_index is a traced value: one compilation serves every batch.
        samples = draw(params, batch_labels, jnp.int32(start))
        chunks.append(sharding.to_host(samples)[: num - start])
    return np.concatenate(chunks, axis=0)


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
    labels = None
    if config.model.class_conditional and info.num_classes:
        labels = np.arange(num, dtype=np.int32) % info.num_classes
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
    from diffusion_jax.data import toy

    reference = None if is_image else toy.reference_points(config.data.name)
    return write_samples(samples, out, is_image=is_image, data=reference)


def check_method(method: str) -> None:
    """A ValueError naming the sampler methods when ``method`` is not one of them."""
    if method not in samplers.METHODS:
        raise ValueError(f"Unknown --method {method!r}; expected one of {samplers.METHODS}.")


def resolve_steps(run: Run, steps: int | None) -> int:
    """The sampler steps for ``run``'s model: ``None`` means all T; others must lie in [1, T]."""
    num_timesteps = run.config.diffusion.num_timesteps
    steps = num_timesteps if steps is None else steps
    if not 1 <= steps <= num_timesteps:
        raise ValueError(
            f"--steps must lie in [1, {num_timesteps}] (T of this model), got {steps}."
        )
    return steps


def generate_from_run(
    run: Run,
    *,
    num: int,
    batch_size: int | None,
    seed: int,
    method: str,
    num_steps: int,
    eta: float = 0.0,
    labels: np.ndarray | None = None,
    guidance_scale: float | None = None,
    progress: bool = True,
) -> np.ndarray:
    """:func:`generate` with a restored :class:`Run`'s model, params and mesh.

    ``batch_size`` (default ``min(num, 64)``) is rounded up to a multiple of the device count.
    """
    batch_size = batch_size or min(num, 64)
    batch_size = -(-batch_size // run.mesh.size) * run.mesh.size
    return generate(
        run.config,
        run.model,
        run.schedule,
        run.params,
        run.data_shape,
        num=num,
        batch_size=batch_size,
        seed=seed,
        method=method,
        num_steps=num_steps,
        eta=eta,
        is_image=run.info.kind == "image",
        labels=labels,
        null_label=run.info.num_classes,
        guidance_scale=guidance_scale,
        mesh=run.mesh,
        progress=progress and jax.process_index() == 0,
    )


def parse_labels(text: str | None, num: int, num_classes: int | None) -> np.ndarray | None:
    """``"0,1,2"`` -> labels repeated to ``num``; validated against ``num_classes`` on the host."""
    if not text:
        return None
    if not num_classes:
        raise ValueError("--labels given, but the model is not class-conditional.")
    try:
        values = np.array([int(v) for v in text.split(",") if v.strip()], np.int32)
    except ValueError:
        raise ValueError(f"--labels must be comma-separated integers, got {text!r}.") from None
    if values.size == 0:
        raise ValueError("--labels is empty.")
    bad = values[(values < 0) | (values >= num_classes)]
    if bad.size:
        raise ValueError(
            f"--labels {bad.tolist()} out of range: the model has classes 0..{num_classes - 1}."
        )
    return np.resize(values, num)


def sample_from_workdir(
    workdir: str,
    *,
    out: str,
    num: int = 64,
    batch_size: int | None = None,
    method: str = "ddim",
    steps: int | None = 50,
    eta: float = 0.0,
    seed: int = 0,
    which: str = "ema",
    checkpoint_step: int | None = None,
    guidance: float | None = None,
    labels: str | None = None,
    individual: bool = False,
    progress: bool = True,
) -> dict[str, str]:
    """``sample.py``'s job: restore a checkpoint's params and write samples to ``out``.

    Only the chosen parameters are restored (no random initialisation, no optimiser state).

    Returns:
      The paths written, by kind (``grid``, ``npz``, ``images``).
    """
    check_method(method)
    if num < 1:
        raise ValueError(f"--num must be >= 1, got {num}.")
    run = restore_run(workdir, which=which, checkpoint_step=checkpoint_step)
    config, info = run.config, run.info
    steps = resolve_steps(run, steps)
    is_image = info.kind == "image"
    conditional = bool(config.model.class_conditional)
    label_array = parse_labels(labels, num, info.num_classes if conditional else None)
    if guidance is not None and label_array is None:
        raise ValueError("--guidance needs --labels (classifier-free guidance is conditional).")
    if conditional and label_array is None:
        label_array = np.arange(num, dtype=np.int32) % info.num_classes
    samples = generate_from_run(
        run,
        num=num,
        batch_size=batch_size,
        seed=seed,
        method=method,
        num_steps=steps,
        eta=eta,
        labels=label_array,
        guidance_scale=guidance,
        progress=progress,
    )
    if jax.process_index() != 0:
        return {}
    os.makedirs(out, exist_ok=True)
    written = {}
    if is_image:
        pixels = to_uint8(samples)
        written["npz"] = os.path.join(out, "samples.npz")
        extra = {} if label_array is None else {"labels": label_array}
        np.savez_compressed(written["npz"], images=pixels, **extra)
        written["grid"] = plots.save_image_grid(pixels, os.path.join(out, "grid.png"))
        if individual:
            from PIL import Image

            folder = os.path.join(out, "images")
            os.makedirs(folder, exist_ok=True)
            for index, image in enumerate(pixels):
                Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(
                    os.path.join(folder, f"{index:05d}.png")
                )
            written["images"] = folder
    else:
        from diffusion_jax.data import toy

        written["npz"] = os.path.join(out, "samples.npz")
        np.savez_compressed(written["npz"], x=samples.astype(np.float32))
        reference = toy.reference_points(config.data.name)
        written["grid"] = plots.plot_points(samples, os.path.join(out, "scatter.png"), reference)
    return written
