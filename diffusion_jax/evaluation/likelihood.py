"""The variational bound of a trained model on a dataset split: bits/dim for 8-bit images,
nats/dim for continuous vectors.

The bound of Ho et al. (2020) with all T terms, reported the way the DDPM and improved-DDPM
papers do: the decoder L_0, the sum of the KL terms L_1..L_{T-1}, the prior L_T and their total.
``python -m diffusion_jax.evaluation nll`` is its command line; see :func:`nll_from_workdir`.

Images are 8-bit: ``x0 = uint8 / 127.5 - 1`` on the grid of 256 levels, so the numbers compare
with published ones for CIFAR-10 or ImageNet. The embedded ``digits`` hold 17 levels upscaled to
8 bits: their bits/dim compare with no published figure. L_0 uses the exact normal CDF
(:func:`~diffusion_jax.losses.discretized_gaussian_log_likelihood`); the published DDPM and
improved-DDPM code uses a tanh approximation of it, whose L_0, and so total, differs: 4.8e-4
bits/dim higher on the input that ``tests/test_losses.py`` pins (decoder mean off by half its
sigma); the gap depends on the decoder's error, of order 1e-4..1e-3 bits/dim, so compare
with published figures to about 1e-3 bits/dim.

2-D toy sets are continuous: they get a bound with a Gaussian decoder, L_0 = -log N(x0;
mu_theta(x_1, 1), sigma_1^2), a density, reported in nats per dimension (``units:
"nats/dim"``). It is a bound on the differential negative log-likelihood of continuous data,
not comparable with the bits/dim of 8-bit images (a code length of discrete data).
"""

from __future__ import annotations

import functools
import json
import math
import os
import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from diffusion_jax import _runtime, data, losses, options
from diffusion_jax.data import resize_and_center_crop
from diffusion_jax.evaluation.runs import restore_run
from diffusion_jax.train import sharding

__all__ = ["DECODER_NOTES", "format_nll", "nll_from_workdir", "nll_of_source"]

# What the result's notes say about L_0, per decoder.
DECODER_NOTES = {
    "discretized": (
        "L_0 uses the exact normal CDF; the DDPM / improved-DDPM reference code's tanh "
        "approximation of it changes L_0 (and the total) by 1e-4..1e-3 bits/dim: 4.8e-4 "
        "bits/dim higher on the input tests/test_losses.py pins."
    ),
    "gaussian": (
        "continuous data: a bound in nats/dim with a Gaussian decoder L_0 = -log N(x0; "
        "mu(x_1, 1), sigma_1^2) (a density), not comparable with bits/dim of 8-bit images."
    ),
}
UNITS = {"discretized": "bits/dim", "gaussian": "nats/dim"}
LN2 = math.log(2.0)  # nats per bit
SUFFIX = {"bits/dim": "bpd", "nats/dim": "nats"}


# ----------------------------------------------------------------------------- likelihood


@functools.lru_cache(maxsize=8)
def _batch_nll_fn(model_fn, parameterization, variance, clip_x0, num_bins, conditional, decoder):
    """One compiled bound per (model, options); jit then compiles once per batch shape."""

    def one_example(params, schedule, key, example, label, index):
        if decoder == "discretized":
            x0 = example.astype(jnp.float32)[None] / 127.5 - 1.0
        else:
            x0 = example.astype(jnp.float32)[None]
        terms = losses.nll_bpd(
            model_fn,
            params,
            schedule,
            x0,
            # The noise of example i is a function of (seed, i): batch size and device count
            # do not change the result.
            jax.random.fold_in(key, index),
            parameterization=parameterization,
            variance=variance,
            clip_x0=clip_x0,
            model_kwargs={"y": label[None]} if conditional else None,
            num_bins=num_bins,
            decoder=decoder,
        )
        return terms.prior_bpd[0], terms.terms_bpd[0]

    @_runtime.jit
    def batch_nll(params, schedule, key, images, labels, indices):
        return jax.vmap(one_example, in_axes=(None, None, None, 0, 0, 0))(
            params, schedule, key, images, labels, indices
        )

    return batch_nll


def nll_of_source(
    model_fn,
    params: Any,
    schedule,
    source,
    *,
    num: int | None = None,
    batch_size: int = 64,
    seed: int = 0,
    parameterization: str = "eps",
    variance: str = "fixed_small",
    clip_x0: bool = True,
    conditional: bool = False,
    image_size: int | None = None,
    num_bins: int = 256,
    mesh=None,
    progress: bool = False,
) -> dict[str, Any]:
    """The variational bound of the first ``num`` examples of a record source: bits/dim for
    8-bit images, nats/dim for continuous vectors.

    Each batch runs :func:`diffusion_jax.losses.nll_bpd` (all T terms) under one ``jax.jit``,
    split over the devices of ``mesh``; the last batch is padded to the same shape, so the
    bound compiles once. The T terms are one ``lax.scan`` over the timesteps (one model call on
    the batch per step, only the ``[T, B]`` terms kept), so memory is that of one model call
    whatever T is: the 4,000 terms of improved-diffusion's models fit as 40 do
    (``tests/test_likelihood_large_t.py`` checks the compiled program's buffers). Sums are kept
    in float64 on the host. Images (record key ``image``,
    uint8) get the discretized decoder and bits/dim; vectors (record key ``x``, float) get the
    Gaussian decoder (:func:`diffusion_jax.losses.gaussian_log_likelihood`) and nats/dim, the
    bits of :func:`~diffusion_jax.losses.nll_bpd` times log(2).

    Args:
      model_fn: ``model_fn(params, x_t, t, **model_kwargs) -> output``; pass the same object
        on every call to reuse the compiled bound.
      params: the model's parameters.
      schedule: the diffusion's tables.
      source: anything with ``len(source)`` and ``source.read(indices) -> {"image": uint8
        [B, H, W, C] (or a list of [H, W, C]), "label": int [B]}`` (a ``data`` record source),
        or ``{"x": float [B, D], ...}`` for continuous vectors (pass ``clip_x0=False``).
      num: examples to score (the first ``num`` in stored order); None for all.
      batch_size: examples per compiled call, rounded up to a multiple of the mesh size.
      seed: seeds the noise; example ``i`` gets the noise of ``fold_in(key(seed), i)``.
      parameterization, variance, clip_x0: how the model was trained / is read, see
        :func:`diffusion_jax.diffusion.p_mean_variance`.
      conditional: pass the source's labels to the model as ``y``.
      image_size: resize and centre-crop images to this size first (as training did).
      num_bins: levels of the data (256 for 8-bit images).
      mesh: devices to split each batch over (default: every device).
      progress: show a progress bar over batches.

    Returns:
      ``{"num_examples", "num_timesteps", "units", "decoder", "decoder_bpd" (L_0),
      "transitions_bpd" (the sum of L_1..L_{T-1}), "prior_bpd" (L_T), "total_bpd" (their
      sum), "total_bpd_stderr" (standard error of the mean over examples), "terms_bpd" (list
      of T means; [0] is L_0)}``, means over the examples; ``units`` is ``"bits/dim"`` and
      ``decoder`` ``"discretized"``. For vectors the same keys end in ``_nats`` in place of
      ``_bpd``, ``units`` is ``"nats/dim"`` and ``decoder`` ``"gaussian"``.

    Raises:
      ArgumentError: a bad ``num`` or ``batch_size``.
      ValueError: a source without uint8 images or float vectors.

    Example:
      >>> _, source = data.open_split("digits", split="test")  # doctest: +SKIP
      >>> nll_of_source(model_fn, params, schedule, source, num=256)["total_bpd"]  # doctest: +SKIP
    """
    total = len(source)
    num = total if num is None else num
    if not 1 <= num <= total:
        raise options.ArgumentError(
            "num", f"{{name}} must lie in [1, {total}] (the split's size), got {num}."
        )
    if batch_size < 1:
        raise options.ArgumentError("batch_size", f"{{name}} must be >= 1, got {batch_size}.")
    mesh = sharding.make_mesh() if mesh is None else mesh
    batch_size = -(-min(batch_size, num) // mesh.size) * mesh.size
    batch_sharding = sharding.data_sharding(mesh)
    replicated = sharding.replicated(mesh)
    params = jax.device_put(params, replicated)
    schedule = jax.device_put(schedule, replicated)
    key = jax.random.key(seed)

    def to_device(host: np.ndarray) -> jax.Array:
        return jax.make_array_from_callback(host.shape, batch_sharding, lambda i: host[i])

    num_timesteps = schedule.num_timesteps
    prior_sum, terms_sum = 0.0, np.zeros(num_timesteps, np.float64)
    totals = []
    starts = range(0, num, batch_size)
    bar = tqdm(starts, disable=not progress, unit="batch", desc="bits/dim")
    for start in bar:
        indices = np.arange(start, start + batch_size)
        valid = int(min(batch_size, num - start))
        # The padded tail repeats the last example and is dropped below.
        record = source.read(np.minimum(indices, num - 1))
        examples, decoder = _examples(record, image_size)
        batch_nll = _batch_nll_fn(
            model_fn, parameterization, variance, bool(clip_x0), num_bins, conditional, decoder
        )
        labels = np.asarray(record.get("label", np.zeros(batch_size)), np.int32)
        prior, terms = batch_nll(
            params,
            schedule,
            key,
            to_device(examples),
            to_device(labels),
            to_device(indices.astype(np.int32)),
        )
        prior = sharding.to_host(prior).astype(np.float64)[:valid]
        terms = sharding.to_host(terms).astype(np.float64)[:valid]
        prior_sum += prior.sum()
        terms_sum += terms.sum(axis=0)
        totals.append(prior + terms.sum(axis=1))
        running = np.mean(np.concatenate(totals)) * (1.0 if decoder == "discretized" else LN2)
        bar.set_postfix(total=f"{running:.4f} {UNITS[decoder]}")
    bar.close()
    # nll_bpd works in bits; continuous data report nats (float64 on the host).
    scale = 1.0 if decoder == "discretized" else LN2
    totals = np.concatenate(totals) * scale
    terms_mean = terms_sum / num * scale
    decoder_term, transitions = terms_mean[0], terms_mean[1:].sum()
    prior_mean = prior_sum / num * scale
    stderr = totals.std(ddof=1) / math.sqrt(num) if num > 1 else float("nan")
    units = UNITS[decoder]
    suffix = SUFFIX[units]
    return {
        "num_examples": int(num),
        "num_timesteps": int(num_timesteps),
        "units": units,
        "decoder": decoder,
        f"decoder_{suffix}": float(decoder_term),
        f"transitions_{suffix}": float(transitions),
        f"prior_{suffix}": float(prior_mean),
        f"total_{suffix}": float(decoder_term + transitions + prior_mean),
        f"total_{suffix}_stderr": float(stderr),
        f"terms_{suffix}": terms_mean.tolist(),
    }


def _examples(record: dict[str, Any], image_size: int | None) -> tuple[np.ndarray, str]:
    """A batch's examples as the bound takes them, and their decoder."""
    if "image" in record:
        images = record["image"]
        if image_size is not None:
            images = [resize_and_center_crop(np.asarray(im), image_size) for im in images]
        images = np.stack(images) if isinstance(images, list) else np.asarray(images)
        if images.dtype != np.uint8 or images.ndim != 4:
            raise ValueError(
                f"bits/dim needs uint8 [B, H, W, C] images, got {images.dtype} {images.shape}."
            )
        return images, "discretized"
    if "x" in record:
        vectors = np.asarray(record["x"])
        if not np.issubdtype(vectors.dtype, np.floating) or vectors.ndim != 2:
            raise ValueError(
                f"the continuous bound needs float [B, D] vectors, got {vectors.dtype} "
                f"{vectors.shape}."
            )
        return vectors.astype(np.float32), "gaussian"
    raise ValueError(
        "the bound needs uint8 images (record key 'image') or float vectors (record key 'x'); "
        f"the source yields {sorted(record)}."
    )


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_")


def nll_from_workdir(
    workdir: str,
    *,
    split: str = "test",
    num: int | None = None,
    batch_size: int = 64,
    which: options.ParamsChoice = "ema",
    checkpoint_step: int | None = None,
    seed: int = 0,
    clip_x0: bool | None = None,
    data_dir: str | None = None,
    write: bool = True,
    progress: bool = True,
) -> dict[str, Any]:
    """``python -m diffusion_jax.evaluation nll``'s job: the bound of a checkpoint on a dataset
    split, in bits/dim for 8-bit images and nats/dim for continuous (2-D) data.

    Args:
      workdir: a training run's directory.
      split: the dataset split to score (TFDS slices like ``"test[:1000]"`` work too).
      num: score the first ``num`` examples of the split; None for all.
      batch_size: examples per compiled call.
      which: ``"ema"`` or ``"raw"`` parameters.
      checkpoint_step: the checkpoint to read; None for the newest.
      seed: seeds the noise of every term.
      clip_x0: clip the predicted x0 to [-1, 1] in each term (improved-diffusion reports the
        bound with clipping); None follows the config's ``diffusion.clip_x0`` for images and
        does not clip vector data (not in [-1, 1]), as sampling does.
      data_dir: TFDS data directory, overriding the config's.
      write: write the result as JSON into the workdir (process 0 only).
      progress: show a progress bar over batches.

    Returns:
      The dict of :func:`nll_of_source` (``units`` says bits/dim or nats/dim) plus
      ``workdir``, ``dataset``, ``split``, ``params``, ``step``, ``seed``, ``clip_x0``,
      ``num_bins`` (None for vectors), ``parameterization``, ``variance``, ``conditional``,
      ``notes`` (the dataset's caveats and what L_0 is, see :data:`DECODER_NOTES`) and, when
      written, ``json_path``.

    Raises:
      ArgumentError: a bad ``which``, ``num`` or ``batch_size``; ``str(error)`` names it.
      FileNotFoundError, CheckpointError: as :func:`~diffusion_jax.evaluation.runs.restore_run`.

    Example:
      >>> result = nll_from_workdir("workdirs/digits", split="test", num=1000)  # doctest: +SKIP
      >>> print(format_nll(result))  # L_0, L_1..L_{T-1}, L_T, total  # doctest: +SKIP
    """
    run = restore_run(workdir, which=which, checkpoint_step=checkpoint_step, data_dir=data_dir)
    config, info = run.config, run.info
    is_image = info.kind == "image"
    _, source = data.open_split(config.data.name, split=split, data_dir=info.data_dir)
    default_clip = bool(config.diffusion.clip_x0) and is_image
    clip = default_clip if clip_x0 is None else bool(clip_x0)
    conditional = bool(config.model.class_conditional)
    result = nll_of_source(
        run.model_fn,
        run.params,
        run.schedule,
        source,
        num=num,
        batch_size=batch_size,
        seed=seed,
        parameterization=config.diffusion.parameterization,
        variance=config.diffusion.variance,
        clip_x0=clip,
        conditional=conditional,
        image_size=(config.data.image_size or None) if is_image else None,
        mesh=run.mesh,
        progress=progress and jax.process_index() == 0,
    )
    full = result["num_examples"] == len(source)
    result = {
        "workdir": os.path.abspath(workdir),
        "dataset": config.data.name,
        "split": split,
        "params": which,
        "step": run.step,
        "seed": seed,
        "clip_x0": clip,
        "num_bins": 256 if is_image else None,
        "parameterization": config.diffusion.parameterization,
        "variance": config.diffusion.variance,
        "conditional": conditional,
        "notes": " ".join(note for note in (info.notes, DECODER_NOTES[result["decoder"]]) if note),
        **result,
    }
    if write and jax.process_index() == 0:
        name = f"nll_{_slug(split)}_{which}_step{run.step}"
        name += "" if full else f"_n{result['num_examples']}"
        path = os.path.join(workdir, name + ".json")
        with open(path + ".tmp", "w") as f:
            json.dump(result, f, indent=2)
        os.replace(path + ".tmp", path)
        result["json_path"] = path
    return result


def format_nll(result: dict[str, Any]) -> str:
    """The bound as the DDPM / improved-DDPM papers report it, one term per line.

    Args:
      result: a dict from :func:`nll_from_workdir` (or :func:`nll_of_source`).

    Returns:
      Lines of text; the last one holds the total and its units ("bits/dim", or "nats/dim"
      for continuous data), then the notes.
    """
    big_t = result["num_timesteps"]
    units = result.get("units", "bits/dim")
    suffix = SUFFIX[units]
    where = ""
    if "dataset" in result:
        where = (
            f" on {result['num_examples']} examples of {result['dataset']}:{result['split']}, "
            f"{result['params']} params at step {result['step']}, clip_x0={result['clip_x0']}"
        )
    rows = [
        ("L_0", "decoder -log p(x_0 | x_1)", result[f"decoder_{suffix}"]),
        (
            f"L_1..L_{big_t - 1}",
            f"sum of the {big_t - 1} KL terms",
            result[f"transitions_{suffix}"],
        ),
        ("L_T", "prior KL(q(x_T | x_0) || N(0, I))", result[f"prior_{suffix}"]),
    ]
    per_dim = "bits per dimension" if units == "bits/dim" else "nats per dimension"
    lines = [f"variational bound, T = {big_t}{where}; terms in {per_dim}:"]
    lines += [f"  {name:<12} {what:<36} {value:9.5f}" for name, what, value in rows]
    total = f"{result[f'total_{suffix}']:9.5f} +- {result[f'total_{suffix}_stderr']:.5f} {units}"
    lines.append(f"  {'total':<12} {'NLL <= L_0 + sum + L_T':<36} {total}")
    if result.get("notes"):
        lines.append(f"note: {result['notes']}")
    return "\n".join(lines)
