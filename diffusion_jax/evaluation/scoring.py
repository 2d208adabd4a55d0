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
from diffusion_jax.train.generate import cycled_labels, to_uint8

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
    pools, logits, pending = [], [], []
    for step in tqdm(
        range(num // read_batch), disable=not progress, desc="reference", unit="batch"
    ):
        pending.append(next(iterator)["image"])
        last = step == num // read_batch - 1
        if last or sum(map(len, pending)) >= extract.batch_size:
            images = np.concatenate(pending)
            # Whole Inception batches now, the rest with the next read (no padding waste).
            cut = len(images) if last else len(images) // extract.batch_size * extract.batch_size
            pool, logit = extract(images[:cut])
            pools.append(pool)
            logits.append(logit)
            pending = [images[cut:]]
    mu, sigma = fid.compute_statistics(np.concatenate(pools))
    score, score_std = fid.inception_score(np.concatenate(logits), fid.default_num_splits(num))
    if jax.process_index() == 0:
        fid.save_statistics(
            out, mu, sigma, num=num, dataset=dataset, split=split, image_size=image_size or 0
        )
    return {"out": out, "num": num, "inception_score": score, "inception_score_std": score_std}


def fid_from_workdir(
    workdir: str,
    ref_stats_path: str,
    *,
    num: int = 50_000,
    batch_size: int | None = None,
    method: str = "ddim",
    steps: int | None = 50,
    eta: float = 0.0,
    seed: int = 0,
    which: options.ParamsChoice = "ema",
    checkpoint_step: int | None = None,
    guidance: float | None = None,
    inception_weights: str | None = None,
    inception_batch_size: int = 200,
    progress: bool = True,
) -> dict[str, Any]:
    """Samples ``num`` images from a checkpoint and scores them: FID against ``ref_stats_path``
    and IS.

    The samples are those ``sample.py`` draws with the same flags (a function of seed and
    index), rounded to uint8 as written to disk; a class-conditional model gets labels
    ``i % num_classes``. IS is over 10 splits (one per 100 samples below 1000). The result is
    also written to ``WORKDIR/eval/fid_{which}_{method}{steps}_n{num}_seed{seed}.json``.

    Args:
      workdir: a training workdir with ``checkpoints/``.
      ref_stats_path: statistics from :func:`ref_stats` (or pytorch-fid's / TTUR's).
      num, batch_size, method, steps, eta, seed, which, checkpoint_step, guidance: as in
        :func:`diffusion_jax.evaluation.sampling.sample_from_workdir` (``which``: ``"ema"`` or
        ``"raw"`` parameters; ``num`` >= 2).
      inception_weights: converted weights (default ``$DIFFUSION_JAX_INCEPTION_WEIGHTS``).
      inception_batch_size: images per Inception call.
      progress: show progress bars.

    Returns:
      ``{"fid", "inception_score", "inception_score_std", "num", "step", ...settings, "json"}``
      (the parameter choice under ``"params"``).

    Raises:
      ArgumentError: a bad ``which``, ``method``, ``num``, ``steps`` or ``guidance``;
        ``str(error)`` names the argument.
      FileNotFoundError: no such workdir, no checkpoint, reference statistics or Inception
        weights.
      ValueError: the run's data are not images; the statistics or weights are not a readable
        ``.npz``.
    """
    options.check("params", which, label="which")
    sampling.check_method(method)
    if num < 2:
        raise options.ArgumentError("num", f"{{name}} must be >= 2 for a covariance, got {num}.")
    # Fail on missing inputs and impossible requests before sampling for hours.
    checkpoint_dir(workdir)
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
    start = time.time()
    samples = sampling.generate_from_run(
        run,
        num=num,
        batch_size=batch_size,
        seed=seed,
        method=method,
        num_steps=steps,
        eta=eta,
        labels=labels,
        guidance_scale=guidance,
        progress=progress,
    )
    sampling_seconds = time.time() - start
    pool, logits = fid.FeatureExtractor(variables, batch_size=inception_batch_size, mesh=run.mesh)(
        to_uint8(samples)
    )
    score, score_std = fid.inception_score(logits, fid.default_num_splits(num))
    result = {
        "fid": fid.frechet_distance(*fid.compute_statistics(pool), ref_mu, ref_sigma),
        "inception_score": score,
        "inception_score_std": score_std,
        "num": num,
        "step": run.step,
        "params": which,
        "method": method,
        "steps": steps,
        "eta": eta,
        "seed": seed,
        "guidance": guidance,
        "ref": os.path.abspath(ref_stats_path),
        "sampling_seconds": round(sampling_seconds, 1),
    }
    name = f"fid_{which}_{method}{steps}_n{num}_seed{seed}.json"
    result["json"] = os.path.join(workdir, "eval", name)
    if jax.process_index() == 0:
        os.makedirs(os.path.dirname(result["json"]), exist_ok=True)
        with open(result["json"], "w") as file:
            json.dump(result, file, indent=2)
    return result
