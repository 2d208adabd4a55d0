"""The pictures of a trained run, read from its workdir: the reverse process, the training
curves and a sample set. ``python -m diffusion_jax.plots trajectory|loss|samples`` draws them;
the figure helpers they share live in :mod:`diffusion_jax.plots`.
"""

from __future__ import annotations

import os

import jax
import numpy as np

from diffusion_jax import options, samplers
from diffusion_jax.data import toy
from diffusion_jax.evaluation.runs import restore_run
from diffusion_jax.evaluation.sampling import check_method, generate_from_run, resolve_steps
from diffusion_jax.plots import image_grid, plot_points, pyplot, save_figure
from diffusion_jax.train import metrics, sharding
from diffusion_jax.train.generate import cycled_labels, to_uint8

__all__ = ["plot_loss", "plot_samples", "plot_trajectory"]


def _upscale(images: np.ndarray, min_side: int) -> np.ndarray:
    """Nearest-neighbour upscaling of uint8 ``[..., H, W, C]`` so tiles are >= ``min_side``."""
    scale = max(1, int(np.ceil(min_side / images.shape[-2])))
    return images.repeat(scale, axis=-3).repeat(scale, axis=-2)


def plot_trajectory(
    workdir: str,
    out: str,
    *,
    method: str = "ddim",
    steps: int = 50,
    num: int | None = None,
    frames: int = 8,
    seed: int = 0,
    which: options.ParamsChoice = "ema",
    checkpoint_step: int | None = None,
) -> str:
    """Draws a checkpoint's reverse process from noise to sample, predicted x0 beside x_t.

    Images: one row per example; one column per recorded step, each an ``x_t | x0_hat`` pair,
    and a last column with the sample. 2-D data: a row of scatter plots of x_t over time and a
    row of the predicted x0, with the data underneath. Example ``i`` starts from the noise that
    ``sample.py`` gives example ``i`` with the same seed.

    Args:
      workdir: a training run's directory.
      out: PNG path to write.
      method: ``ddpm``, ``ddim`` or ``dpm_solver++``.
      steps: sampler steps (model evaluations).
      num: examples (rows); default 8 for images, 1000 points for 2-D data.
      frames: about this many recorded steps (columns).
      seed: seeds the noise.
      which: ``"ema"`` or ``"raw"`` parameters.
      checkpoint_step: the checkpoint to read; None for the newest.

    Returns:
      ``out``.

    Raises:
      ArgumentError: a bad ``method``, ``steps``, ``num``, ``frames`` or ``which``.
      FileNotFoundError, CheckpointError: as :func:`~diffusion_jax.evaluation.runs.restore_run`.
    """
    check_method(method)
    if frames < 1:
        raise options.ArgumentError("frames", f"{{name}} must be >= 1, got {frames}.")
    # A handful of examples: one device, no resharding of the whole loop.
    run = restore_run(
        workdir,
        which=which,
        checkpoint_step=checkpoint_step,
        mesh=sharding.make_mesh(jax.local_devices()[:1]),
    )
    steps = resolve_steps(run, steps)
    is_image = run.info.kind == "image"
    num = (8 if is_image else 1000) if num is None else num
    if num < 1:
        raise options.ArgumentError("num", f"{{name}} must be >= 1, got {num}.")
    labels = cycled_labels(run.config, run.info, num)
    d = run.config.diffusion
    trajectory = samplers.sample(
        run.model_fn,
        run.params,
        run.schedule,
        jax.random.key(seed),
        (num, *run.data_shape),
        method=method,
        num_steps=steps,
        parameterization=d.parameterization,
        variance=d.variance,
        clip_x0=bool(d.clip_x0) and is_image,
        model_kwargs=None if labels is None else {"y": labels},
        return_trajectory=True,
        trajectory_every=-(-steps // frames),
    )
    xs, pred_x0s, samples, timesteps = jax.device_get(
        (trajectory.xs, trajectory.pred_x0s, trajectory.samples, trajectory.timesteps)
    )
    title = (
        f"Reverse process of {os.path.basename(os.path.abspath(workdir))} ({which} params, "
        f"step {run.step}): {method}, {steps} steps"
    )
    if not is_image:
        return _plot_point_trajectory(xs, pred_x0s, samples, timesteps, run, out, title)

    tiles_x = _upscale(to_uint8(xs), 32)  # [K, N, h, w, C]
    tiles_p = _upscale(to_uint8(pred_x0s), 32)
    tiles_s = _upscale(to_uint8(samples), 32)  # [N, h, w, C]
    count, _, height, width, channels = tiles_x.shape
    pair_gap, group_gap, row_gap = 2, 10, 4
    group = 2 * width + pair_gap
    total_width = count * (group + group_gap) + width
    # Grey gaps: tiles stay apart whether their backgrounds are black or white.
    mosaic = np.full((num * (height + row_gap) - row_gap, total_width, channels), 128, np.uint8)
    for row in range(num):
        top = row * (height + row_gap)
        for k in range(count):
            left = k * (group + group_gap)
            mosaic[top : top + height, left : left + width] = tiles_x[k, row]
            right = left + width + pair_gap
            mosaic[top : top + height, right : right + width] = tiles_p[k, row]
        left = count * (group + group_gap)
        mosaic[top : top + height, left : left + width] = tiles_s[row]

    plt = pyplot()
    fig_width = max(6.0, total_width / 80 + 1.0)
    fig, ax = plt.subplots(figsize=(fig_width, mosaic.shape[0] / 80 + 1.6))
    ax.imshow(
        mosaic[..., 0] if channels == 1 else mosaic, cmap="gray", vmin=0, vmax=255,
        interpolation="nearest",
    )  # fmt: skip
    centres = [k * (group + group_gap) + width / 2 for k in range(count)]
    pred_centres = [c + width + pair_gap for c in centres]
    sample_centre = count * (group + group_gap) + width / 2
    ax.set_xticks(
        [*centres, *pred_centres, sample_centre],
        [r"$x_t$"] * count + [r"$\hat x_0$"] * count + ["sample"],
        fontsize=8,
    )
    top_axis = ax.secondary_xaxis("top")
    top_axis.set_xticks(
        [c + (width + pair_gap) / 2 for c in centres], [f"t={int(t)}" for t in timesteps]
    )
    top_axis.tick_params(labelsize=8, length=0)
    ax.set_yticks([row * (height + row_gap) + height / 2 for row in range(num)], range(num))
    ax.tick_params(length=0)
    for spine in ax.spines.values():
        spine.set_visible(False)
    top_axis.spines["top"].set_visible(False)
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    return save_figure(fig, out)


def _plot_point_trajectory(xs, pred_x0s, samples, timesteps, run, out, title) -> str:
    """Two rows of scatter plots (x_t, predicted x0) over time for 2-D data."""
    plt = pyplot()
    reference = toy.reference_points(run.config.data.name)
    count = xs.shape[0]
    fig, axes = plt.subplots(
        2, count + 1, figsize=(2.2 * (count + 1), 5.2), squeeze=False, sharex=True, sharey=True
    )
    extent = 3.0 if reference is None else max(3.0, float(np.abs(reference).max()))
    panels = [(xs, r"$x_t$"), (pred_x0s, r"$\hat x_0$")]
    for row, (points, name) in enumerate(panels):
        for col in range(count + 1):
            ax = axes[row, col]
            shown = samples if col == count else points[col]
            if reference is not None:
                ax.scatter(reference[:, 0], reference[:, 1], s=1, c="tab:gray", alpha=0.2)
            ax.scatter(shown[:, 0], shown[:, 1], s=2, c="tab:red", alpha=0.6)
            ax.set_xlim(-1.1 * extent, 1.1 * extent)
            ax.set_ylim(-1.1 * extent, 1.1 * extent)
            ax.set_aspect("equal")
            ax.set_xticks([])
            ax.set_yticks([])
            label = "sample" if col == count else f"{name}, t={int(timesteps[col])}"
            ax.set_title(label, fontsize=9)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return save_figure(fig, out)


def _finite_series(records: list[dict], key: str) -> tuple[np.ndarray, np.ndarray]:
    """(steps, values) of the records holding a finite ``key`` (NaN is logged as a string)."""
    steps, values = [], []
    for record in records:
        if key in record:
            try:
                value = float(record[key])
            except (TypeError, ValueError):
                continue
            if np.isfinite(value):
                steps.append(record["step"])
                values.append(value)
    return np.asarray(steps), np.asarray(values)


def plot_loss(workdir: str, out: str) -> str:
    """Draws the training curves of ``workdir/metrics.jsonl``.

    Left: the logged training loss, its mean over each logging window (``loss_mean``) and the
    held-out ``eval_loss``, against the step, log-scaled. Right: the learning rate.

    Args:
      workdir: a training run's directory.
      out: PNG path to write.

    Returns:
      ``out``.

    Raises:
      FileNotFoundError: no such workdir, no ``metrics.jsonl`` in it, or no training losses
        in it.
    """
    if not os.path.isdir(workdir):
        raise FileNotFoundError(f"No such workdir {os.path.abspath(workdir)}: check the path.")
    path = os.path.join(workdir, metrics.METRICS_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"No {path}: the run has not logged a step yet.")
    records = metrics.read_metrics(workdir)
    steps, loss = _finite_series(records, "loss")
    if not len(steps):
        raise FileNotFoundError(f"No training losses in {os.path.join(workdir, 'metrics.jsonl')}.")
    plt = pyplot()
    fig, (ax, ax_lr) = plt.subplots(1, 2, figsize=(12, 4.2), gridspec_kw={"width_ratios": [2, 1]})
    ax.plot(steps, loss, lw=0.8, alpha=0.5, c="tab:blue", label="loss (logged step)")
    mean_steps, mean_loss = _finite_series(records, "loss_mean")
    if len(mean_steps):
        ax.plot(mean_steps, mean_loss, lw=1.8, c="tab:blue", label="loss_mean (window)")
    eval_steps, eval_loss = _finite_series(records, "eval_loss")
    if len(eval_steps):
        ax.plot(eval_steps, eval_loss, "o-", ms=5, c="tab:orange", label="eval_loss (held out)")
    ax.set(yscale="log", xlabel="step", ylabel="loss", title="Training loss")
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    lr_steps, lr = _finite_series(records, "learning_rate")
    if len(lr_steps):
        ax_lr.plot(lr_steps, lr, c="tab:green")
    ax_lr.set(xlabel="step", title="Learning rate")
    ax_lr.ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))
    ax_lr.grid(alpha=0.3)
    fig.suptitle(f"{os.path.basename(os.path.abspath(workdir))}: {len(records)} records")
    fig.tight_layout()
    return save_figure(fig, out)


def plot_samples(
    workdir: str,
    out: str,
    *,
    num: int | None = None,
    method: str = "ddim",
    steps: int = 50,
    seed: int = 0,
    which: options.ParamsChoice = "ema",
    checkpoint_step: int | None = None,
) -> str:
    """Draws a checkpoint's samples: a grid of images, or 2-D samples over the data.

    The samples are those of ``sample.py`` with the same seed, method and steps.

    Args:
      workdir: a training run's directory.
      out: PNG path to write.
      num: samples to draw; default 64 images or 1000 points.
      method: ``ddpm``, ``ddim`` or ``dpm_solver++``.
      steps: sampler steps (model evaluations).
      seed: seeds the noise.
      which: ``"ema"`` or ``"raw"`` parameters.
      checkpoint_step: the checkpoint to read; None for the newest.

    Returns:
      ``out``.

    Raises:
      ArgumentError: a bad ``method``, ``steps``, ``num`` or ``which``.
      FileNotFoundError, CheckpointError: as :func:`~diffusion_jax.evaluation.runs.restore_run`.
    """
    check_method(method)
    run = restore_run(workdir, which=which, checkpoint_step=checkpoint_step)
    steps = resolve_steps(run, steps)
    is_image = run.info.kind == "image"
    num = (64 if is_image else 1000) if num is None else num
    if num < 1:
        raise options.ArgumentError("num", f"{{name}} must be >= 1, got {num}.")
    samples = generate_from_run(
        run,
        num=num,
        batch_size=min(num, 256),
        seed=seed,
        method=method,
        num_steps=steps,
        labels=cycled_labels(run.config, run.info, num),
        progress=False,
    )
    title = (
        f"{num} samples of {os.path.basename(os.path.abspath(workdir))}\n({which} params, "
        f"step {run.step}; {method}, {steps} steps)"
    )
    if not is_image:
        return plot_points(samples, out, toy.reference_points(run.config.data.name), title=title)
    # Grey gaps: tiles stay apart whether their backgrounds are black or white.
    grid = image_grid(_upscale(to_uint8(samples), 32), pad=3, fill=128)
    plt = pyplot()
    width = max(5.0, grid.shape[1] / 80)
    fig, ax = plt.subplots(figsize=(width, width * grid.shape[0] / grid.shape[1] + 0.6))
    ax.imshow(
        grid[..., 0] if grid.shape[-1] == 1 else grid, cmap="gray", vmin=0, vmax=255,
        interpolation="nearest",
    )  # fmt: skip
    ax.set_axis_off()
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    return save_figure(fig, out)
