"""Scoring with the FID Inception network: the reference statistics of a dataset split, and FID
and IS of samples drawn from a trained run (``python -m diffusion_jax.evaluation ref-stats|fid``).

The numbers themselves (features, statistics, Frechet distance, IS) are :mod:`diffusion_jax.
evaluation.fid`'s.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import jax
import numpy as np
from tqdm.auto import tqdm

from diffusion_jax import data, options
from diffusion_jax.evaluation import fid, sampling
from diffusion_jax.evaluation.inception_weights import load_inception_variables
from diffusion_jax.evaluation.outputs import check_writable
from diffusion_jax.evaluation.runs import checkpoint_dir, read_run_config, restore_run
from diffusion_jax.models import inception
from diffusion_jax.train.generate import cycled_labels, generate_batches, to_uint8

__all__ = ["fid_from_workdir", "ref_stats"]


def _largest_divisor(n: int, cap: int) -> int:
    return next(d for d in range(min(n, cap), 0, -1) if n % d == 0)


def ref_stats(
    dataset: str,
    split: str,
    out: str,
    inception_weights: str | None = None,
    data_dir: str | None = None,
    num: int | None = None,
    *,
    image_size: int | None = None,
    batch_size: int = 200,
    progress: bool = True,
) -> dict[str, Any]:
    """Reference statistics of a dataset split, for :func:`fid_from_workdir`.

    The first ``num`` examples of ``split`` in stored order are read through
    :func:`diffusion_jax.data.create_iterator` (grayscale repeated to RGB).

    Args:
      dataset: an image dataset name (``"cifar10"``, ``"digits"``, ``"folder:/path"``, ...).
      split: e.g. ``"train"``.
      out: the ``.npz`` to write (``mu``, ``sigma``, ``num``, ``dataset``, ``split``,
        ``image_size``: 0 for the stored size).
      inception_weights: converted weights (default ``$DIFFUSION_JAX_INCEPTION_WEIGHTS``).
      data_dir: TFDS data directory.
      num: number of examples (default: the whole split).
      image_size: resize and centre-crop to this size first (as the model was trained).
      batch_size: images per Inception call.
      progress: show a progress bar.

    Returns:
      ``{"out", "num", "inception_score", "inception_score_std"}`` (the data's own IS, in
      10 splits, or one per 100 images below 1000).

    Raises:
      ArgumentError: ``num`` outside [2, the split's size], or an ``out`` that cannot be
        written (checked first).
      FileNotFoundError: no Inception weights file.
      ValueError: ``dataset`` holds no images, or the weights file is not a readable ``.npz``.
    """
    check_writable(out, "out")
    variables = load_inception_variables(inception_weights)
    info, source = data.open_split(dataset, split=split, data_dir=data_dir)
    if info.kind != "image":
        raise ValueError(f"FID needs images; {dataset!r} holds {info.kind} data.")
    num = len(source) if num is None else num
    if not 2 <= num <= len(source):
        raise options.ArgumentError(
            "num", f"{{name}} must lie in [2, {len(source)}] (the split's size), got {num}."
        )
    # Reading batches must tile the first `num` examples exactly (the pipeline drops partial
    # batches); the Inception batch is separate and padded.
    read_batch = _largest_divisor(num, max(batch_size, 1000))
    iterator = data.create_iterator(
        dataset,
        split=split,
        batch_size=read_batch,
        data_dir=data_dir,
        shuffle=False,
        num_epochs=1,
        image_size=image_size,
        process_index=0,
        process_count=1,
    )
    extract = fid.FeatureExtractor(variables, batch_size=batch_size)
    # Running sums: memory independent of num (as fid_from_workdir).
    statistics = fid.RunningStatistics(inception.FEATURE_DIM)
    score = fid.RunningInceptionScore(num, fid.default_num_splits(num))
    pending = []
    for step in tqdm(
        range(num // read_batch), disable=not progress, desc="reference", unit="batch"
    ):
        pending.append(next(iterator)["image"])
        last = step == num // read_batch - 1
        if last or sum(map(len, pending)) >= extract.batch_size:
            images = np.concatenate(pending)
            # Whole Inception batches now, the rest with the next read (no padding waste).
            cut = len(images) if last else len(images) // extract.batch_size * extract.batch_size
            pool, logits = extract(images[:cut])
            statistics.update(pool)
            score.update(logits)
            pending = [images[cut:]]
    mu, sigma = statistics.statistics()
    score_mean, score_std = score.result()
    if jax.process_index() == 0:
        fid.save_statistics(
            out, mu, sigma, num=num, dataset=dataset, split=split, image_size=image_size or 0
        )
    return {
        "out": out,
        "num": num,
        "inception_score": score_mean,
        "inception_score_std": score_std,
    }


def fid_from_workdir(
    workdir: str,
    ref_stats_path: str,
    *,
    num: int = 50_000,
    batch_size: int | None = None,
    method: str = "ddim",
    steps: int | None = 50,
    eta: float = 0.0,
    timestep_spacing: options.Spacing = "linspace",
    seed: int = 0,
    which: options.ParamsChoice = "ema",
    checkpoint_step: int | None = None,
    guidance: float | None = None,
    inception_weights: str | None = None,
    inception_batch_size: int = 200,
    samples_dir: str | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Samples ``num`` images from a checkpoint and scores them: FID against ``ref_stats_path``
    and IS.

    The samples are those ``sample.py`` draws with the same flags (a function of seed and
    index), rounded to uint8 as written to disk; a class-conditional model gets labels
    ``i % num_classes``. IS is over 10 splits (one per 100 samples below 1000). The result is
    also written to ``WORKDIR/eval/fid_{which}_{method}{steps}_n{num}_seed{seed}.json``.

    The samples stream: each sampler batch goes through the Inception network as soon as it
    is drawn, its pool features are folded into running float64 sums
    (:class:`~diffusion_jax.evaluation.fid.RunningStatistics`) and its logits into per-split
    IS sums (:class:`~diffusion_jax.evaluation.fid.RunningInceptionScore`), and the batch is
    dropped. The host holds at most one sampler batch plus one Inception batch of images and
    ``O(2048^2 + 10 x 1008)`` floats of statistics, whatever ``num`` is (50,000 samples of
    256x256 need no more memory than 1,000).

    Args:
      workdir: a training workdir with ``checkpoints/``.
      ref_stats_path: statistics from :func:`ref_stats` (or pytorch-fid's / TTUR's).
      num, batch_size, method, steps, eta, seed, which, checkpoint_step, guidance: as in
        :func:`diffusion_jax.evaluation.sampling.sample_from_workdir` (``which``: ``"ema"`` or
        ``"raw"`` parameters; ``num`` >= 2; ``batch_size`` default ``min(num, 64)``, rounded
        up to a multiple of the device count).
      timestep_spacing: which timesteps a shortened run visits (``linspace``, ``leading``,
        ``trailing``, ``quadratic``; see :func:`diffusion_jax.timesteps.timesteps_for`). The
        DDIM paper's CIFAR-10 figures used ``quadratic``.
      inception_weights: converted weights (default ``$DIFFUSION_JAX_INCEPTION_WEIGHTS``).
      inception_batch_size: images per Inception call.
      samples_dir: also keep the samples, one ``samples_{start:07d}.npz`` shard per sampler
        batch (uint8 ``images`` of indices ``start..``, and ``labels`` for a
        class-conditional model); None keeps none.
      progress: show progress bars.

    Returns:
      ``{"fid", "inception_score", "inception_score_std", "num", "step", ...settings, "json"}``
      (the parameter choice under ``"params"``).

    Raises:
      ArgumentError: a bad ``which``, ``method``, ``num``, ``steps``, ``batch_size``,
        ``guidance``, ``timestep_spacing`` or ``samples_dir`` (not writable); ``str(error)``
        names the argument.
      FileNotFoundError: no such workdir, no checkpoint, reference statistics or Inception
        weights.
      ValueError: the run's data are not images; the statistics or weights are not a readable
        ``.npz``.
    """
    options.check("params", which, label="which")
    options.check("timestep_spacing", timestep_spacing)
    sampling.check_method(method)
    if num < 2:
        raise options.ArgumentError("num", f"{{name}} must be >= 2 for a covariance, got {num}.")
    if batch_size is not None and batch_size < 1:
        raise options.ArgumentError("batch_size", f"{{name}} must be >= 1, got {batch_size}.")
    # Fail on missing inputs and impossible requests before sampling for hours.
    checkpoint_dir(workdir)
    if samples_dir is not None:
        check_writable(samples_dir, "samples_dir", directory=True)
    ref_mu, ref_sigma = fid.load_statistics(ref_stats_path)
    variables = load_inception_variables(inception_weights)
    saved_config = read_run_config(workdir, checkpoint_step)
    sampling.check_conditioning(saved_config, guidance=guidance, labels=None)
    sampling.resolve_steps(saved_config, steps)

    run = restore_run(workdir, which=which, checkpoint_step=checkpoint_step)
    config, info = run.config, run.info
    steps = sampling.resolve_steps(run, steps)
    if info.kind != "image":
        raise ValueError(f"FID needs an image model; {config.data.name!r} is {info.kind} data.")
    labels = cycled_labels(config, info, num)
    batch_size = min(num, 64) if batch_size is None else batch_size
    batch_size = -(-batch_size // run.mesh.size) * run.mesh.size
    batches = generate_batches(
        run.config,
        run.model,
        run.schedule,
        run.params,
        run.data_shape,
        num=num,
        batch_size=batch_size,
        seed=seed,
        method=method,
        num_steps=steps,
        eta=eta,
        timestep_spacing=timestep_spacing,
        is_image=True,
        labels=labels,
        null_label=info.num_classes,
        guidance_scale=guidance,
        mesh=run.mesh,
        progress=progress and jax.process_index() == 0,
    )
    extract = fid.FeatureExtractor(variables, batch_size=inception_batch_size, mesh=run.mesh)
    statistics = fid.RunningStatistics(inception.FEATURE_DIM)
    score = fid.RunningInceptionScore(num, fid.default_num_splits(num))

    def score_images(images: np.ndarray) -> None:
        pool, logits = extract(images)
        statistics.update(pool)
        score.update(logits)

    start_time = time.time()
    pending = np.zeros((0, *run.data_shape), np.uint8)  # fewer than one Inception batch
    for start, samples in batches:
        images = to_uint8(samples)
        if samples_dir is not None and jax.process_index() == 0:
            _write_shard(samples_dir, start, images, labels)
        pending = np.concatenate([pending, images])
        # Whole Inception batches now, the rest with the next sampler batch (no padding).
        cut = len(pending) // extract.batch_size * extract.batch_size
        if cut:
            score_images(pending[:cut])
            pending = pending[cut:]
    if len(pending):
        score_images(pending)
    seconds = time.time() - start_time
    score_mean, score_std = score.result()
    result = {
        "fid": fid.frechet_distance(*statistics.statistics(), ref_mu, ref_sigma),
        "inception_score": score_mean,
        "inception_score_std": score_std,
        "num": num,
        "step": run.step,
        "params": which,
        "method": method,
        "steps": steps,
        "eta": eta,
        "timestep_spacing": timestep_spacing,
        "seed": seed,
        "guidance": guidance,
        "ref": os.path.abspath(ref_stats_path),
        # Sampling and Inception interleave: the wall time of both.
        "seconds": round(seconds, 1),
    }
    if samples_dir is not None:
        result["samples_dir"] = os.path.abspath(samples_dir)
    spacing = "" if timestep_spacing == "linspace" else f"_{timestep_spacing}"
    name = f"fid_{which}_{method}{steps}{spacing}_n{num}_seed{seed}.json"
    result["json"] = os.path.join(workdir, "eval", name)
    if jax.process_index() == 0:
        os.makedirs(os.path.dirname(result["json"]), exist_ok=True)
        with open(result["json"], "w") as file:
            json.dump(result, file, indent=2)
    return result


def _write_shard(folder: str, start: int, images: np.ndarray, labels: np.ndarray | None) -> None:
    """One sampler batch as ``folder/samples_{start:07d}.npz`` (uint8 ``images``, ``labels``)."""
    os.makedirs(folder, exist_ok=True)
    extra = {} if labels is None else {"labels": labels[start : start + len(images)]}
    path = os.path.join(folder, f"samples_{start:07d}.npz")
    np.savez(path, images=images, **extra)
