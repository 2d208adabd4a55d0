"""``sample.py``'s job: samples from a trained run's checkpoint, written as images or points.

Example ``i`` of a run always gets the noise of run-wide index ``i``, so the same seed gives the
same samples whatever the batch size or device count
(:func:`diffusion_jax.train.generate.generate`). Bad requests raise
:class:`~diffusion_jax.options.ArgumentError` naming the argument; ``sample.py`` renders it with
its flags.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import numpy as np
from PIL import Image

from diffusion_jax import options, plots, samplers
from diffusion_jax.data import toy
from diffusion_jax.evaluation.outputs import check_writable
from diffusion_jax.evaluation.runs import Run, checkpoint_dir, read_run_config, restore_run
from diffusion_jax.samplers.validation import edm_methods
from diffusion_jax.train.generate import cycled_labels, generate, to_uint8

__all__ = [
    "check_conditioning",
    "check_method",
    "generate_from_run",
    "parse_labels",
    "resolve_steps",
    "sample_from_workdir",
]


def check_method(method: str) -> None:
    """An :class:`~diffusion_jax.options.ArgumentError` about ``method``, naming the sampler
    methods, when ``method`` is not one of them."""
    options.check("method", method)


def check_conditioning(config, *, guidance: float | None, labels: str | None) -> None:
    """Refuses guidance or labels for a model that is not class-conditional.

    Run on the saved config before the parameters are restored, so the request fails first.

    Raises:
      ArgumentError: about ``guidance`` (or ``labels``) for an unconditional model.
    """
    if config.model.class_conditional:
        return
    if guidance is not None:
        raise options.ArgumentError(
            "guidance",
            "{name} needs a class-conditional model; this run's is unconditional (trained "
            "without labels), so classifier-free guidance cannot work.",
        )
    if labels:
        raise options.ArgumentError(
            "labels", "{name} given, but the model is not class-conditional."
        )


def resolve_steps(run: Run | Any, steps: int | None) -> int:
    """The sampler steps for ``run``'s model: ``None`` means all T; others must lie in [1, T].

    ``run`` is a :class:`Run`, or the saved config alone (to check before restoring).

    Raises:
      ArgumentError: about ``steps``, outside [1, T].
    """
    config = run.config if isinstance(run, Run) else run
    num_timesteps = config.diffusion.num_timesteps
    steps = num_timesteps if steps is None else steps
    if not 1 <= steps <= num_timesteps:
        raise options.ArgumentError(
            "steps", f"{{name}} must lie in [1, {num_timesteps}] (T of this model), got {steps}."
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
    timestep_spacing: options.Spacing = "linspace",
    edm: samplers.EDMOptions | None = None,
    labels: np.ndarray | None = None,
    guidance_scale: float | None = None,
    progress: bool = True,
) -> np.ndarray:
    """:func:`generate` with a restored :class:`Run`'s model, params and mesh.

    ``batch_size`` (default ``min(num, 64)``) is rounded up to a multiple of the device count.

    Raises:
      ArgumentError: ``batch_size`` < 1.
    """
    if batch_size is not None and batch_size < 1:
        raise options.ArgumentError("batch_size", f"{{name}} must be >= 1, got {batch_size}.")
    batch_size = min(num, 64) if batch_size is None else batch_size
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
        timestep_spacing=timestep_spacing,
        edm=edm,
        is_image=run.info.kind == "image",
        labels=labels,
        null_label=run.info.num_classes,
        guidance_scale=guidance_scale,
        mesh=run.mesh,
        progress=progress and jax.process_index() == 0,
    )


def parse_labels(text: str | None, num: int, num_classes: int | None) -> np.ndarray | None:
    """``"0,1,2"`` -> labels repeated to ``num``; validated against ``num_classes`` on the host.

    Raises:
      ArgumentError: about ``labels``: given to an unconditional model (``num_classes`` None),
        not comma-separated integers, empty, or outside ``[0, num_classes)``.
    """
    if not text:
        return None
    if not num_classes:
        raise options.ArgumentError(
            "labels", "{name} given, but the model is not class-conditional."
        )
    try:
        values = np.array([int(v) for v in text.split(",") if v.strip()], np.int32)
    except ValueError:
        raise options.ArgumentError(
            "labels", "{name} must be comma-separated integers, got {text}.", text=repr(text)
        ) from None
    if values.size == 0:
        raise options.ArgumentError("labels", "{name} is empty.")
    bad = values[(values < 0) | (values >= num_classes)]
    if bad.size:
        raise options.ArgumentError(
            "labels",
            f"{{name}} {bad.tolist()} out of range: the model has classes 0..{num_classes - 1}.",
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
    timestep_spacing: options.Spacing = "linspace",
    edm: samplers.EDMOptions | None = None,
    seed: int = 0,
    which: options.ParamsChoice = "ema",
    checkpoint_step: int | None = None,
    guidance: float | None = None,
    labels: str | None = None,
    individual: bool = False,
    progress: bool = True,
) -> dict[str, str]:
    """``sample.py``'s job: restore a checkpoint's params and write samples to ``out``.

    Only the chosen parameters are restored (no random initialisation, no optimiser state).

    Args:
      workdir: a training run's directory (with ``checkpoints/``).
      out: the directory to write into.
      num: number of samples.
      batch_size: samples per compiled call (default ``min(num, 64)``).
      method, steps, eta: the sampler (``steps=None``: all T steps).
      timestep_spacing: which timesteps a shortened run visits (see
        :func:`diffusion_jax.timesteps.timesteps_for`).
      edm: EDM's sampler settings for ``heun``/``euler`` (:class:`~diffusion_jax.samplers.
        EDMOptions`; None: EDM's deterministic defaults).
      seed: the samples are a function of (seed, index) alone.
      which: ``"ema"`` or ``"raw"`` parameters.
      checkpoint_step: the checkpoint to read; None for the newest readable one.
      guidance: classifier-free guidance weight (needs ``labels``), or None.
      labels: comma-separated class labels, repeated to ``num``; a class-conditional model
        without them gets ``i % num_classes``.
      individual: also write one PNG per sample (images only).
      progress: show a progress bar over batches.

    Returns:
      The paths written, by kind (``grid``, ``npz``, ``images``).

    The request is checked before anything heavy starts, in this order: the arguments, that
    ``workdir`` has checkpoints (nothing is created in a mistyped workdir), that ``out`` can be
    written, and guidance or labels against the saved config; then the parameters are restored
    and the samples drawn.

    Raises:
      ArgumentError: a bad ``method``, ``num``, ``steps``, ``which``, ``labels``,
        ``guidance``, ``timestep_spacing``, ``edm`` (bad values, or given to a method other
        than heun/euler) or ``out`` (not writable); ``str(error)`` names the argument.
      FileNotFoundError, ValueError, CheckpointError: as :func:`restore_run` raises them.
    """
    check_method(method)
    options.check("params", which, label="which")
    options.check("timestep_spacing", timestep_spacing)
    if edm is not None and method not in edm_methods():
        raise options.ArgumentError(
            "edm",
            f"{{name}} settings apply to {' and '.join(edm_methods())} only, not to method "
            f"{method!r}.",
        )
    if num < 1:
        raise options.ArgumentError("num", f"{{name}} must be >= 1, got {num}.")
    checkpoint_dir(workdir)
    check_writable(out, "out", directory=True)
    saved_config = read_run_config(workdir, checkpoint_step)
    check_conditioning(saved_config, guidance=guidance, labels=labels)
    if guidance is not None and not labels:
        raise options.ArgumentError(
            "guidance", "{name} needs labels to guide towards (the guidance is class-conditional)."
        )
    resolve_steps(saved_config, steps)
    run = restore_run(workdir, which=which, checkpoint_step=checkpoint_step)
    config, info = run.config, run.info
    steps = resolve_steps(run, steps)
    is_image = info.kind == "image"
    conditional = bool(config.model.class_conditional)
    label_array = parse_labels(labels, num, info.num_classes if conditional else None)
    if label_array is None:
        label_array = cycled_labels(config, info, num)
    samples = generate_from_run(
        run,
        num=num,
        batch_size=batch_size,
        seed=seed,
        method=method,
        num_steps=steps,
        eta=eta,
        timestep_spacing=timestep_spacing,
        edm=edm,
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
            folder = os.path.join(out, "images")
            os.makedirs(folder, exist_ok=True)
            for index, image in enumerate(pixels):
                Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(
                    os.path.join(folder, f"{index:05d}.png")
                )
            written["images"] = folder
    else:
        written["npz"] = os.path.join(out, "samples.npz")
        np.savez_compressed(written["npz"], x=samples.astype(np.float32))
        reference = toy.reference_points(config.data.name)
        written["grid"] = plots.plot_points(samples, os.path.join(out, "scatter.png"), reference)
    return written
