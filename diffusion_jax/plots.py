"""The pictures people look at, one function per figure, written as PNG with matplotlib.

Command line: ``python -m diffusion_jax.plots NAME --out FILE.png`` with NAME one of

- ``schedules``: beta_t, alphas_cumprod and log-SNR of every schedule;
- ``noising [--dataset digits]``: one dataset image noised at several t under each schedule
  (``--dataset synthetic`` draws a built-in test picture instead);
- ``trajectory --workdir DIR [--method ddim --steps 50 --num 8]``: a checkpoint's reverse
  process from noise to sample, the predicted x0 beside each x_t (2-D data: scatter plots);
- ``loss --workdir DIR``: the training curves of ``metrics.jsonl``;
- ``samples --workdir DIR [--num 64]``: a sample grid (2-D data: samples over the data).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

import numpy as np

from diffusion_jax import schedules as schedules_lib

__all__ = [
    "dataset_image",
    "image_grid",
    "main",
    "plot_loss",
    "plot_noising",
    "plot_points",
    "plot_samples",
    "plot_schedules",
    "plot_trajectory",
    "save_image_grid",
    "synthetic_image",
]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, out: str) -> str:
    directory = os.path.dirname(os.path.abspath(out))
    os.makedirs(directory, exist_ok=True)
    fig.savefig(out, dpi=100)
    _pyplot().close(fig)
    return out


def plot_schedules(
    out: str,
    names: Sequence[str] = tuple(schedules_lib.SCHEDULES),
    num_timesteps: int = 1000,
) -> str:
    """Draws beta_t, alphas_cumprod and log-SNR against t for each schedule.

    Args:
      out: PNG path to write.
      names: schedules to draw.
      num_timesteps: T.

    Returns:
      ``out``.
    """
    plt = _pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    t = np.arange(num_timesteps)
    for name in names:
        sched = schedules_lib.get_schedule(name, num_timesteps)
        axes[0].plot(t, np.asarray(sched.betas), label=name)
        axes[1].plot(t, np.asarray(sched.alphas_cumprod), label=name)
        axes[2].plot(t, np.asarray(sched.log_snr), label=name)
    axes[0].set(title=r"$\beta_t$", xlabel="t", yscale="log")
    axes[1].set(title=r"$\bar\alpha_t$", xlabel="t")
    axes[2].set(title=r"log-SNR $\log(\bar\alpha_t / (1-\bar\alpha_t))$", xlabel="t")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(f"Noise schedules, T = {num_timesteps}")
    fig.tight_layout()
    return _save(fig, out)


def synthetic_image(size: int = 64) -> np.ndarray:
    """A deterministic test picture in [-1, 1], ``[size, size, 3]``: rings over a gradient."""
    coords = np.linspace(-1.0, 1.0, size)
    yy, xx = np.meshgrid(coords, coords, indexing="ij")
    radius = np.sqrt(xx**2 + yy**2)
    red = np.cos(radius * 12.0)
    green = xx
    blue = np.where(np.abs(yy) < 0.25, 1.0, -1.0)
    return np.stack([red, green, blue], axis=-1).astype(np.float32)


def dataset_image(
    name: str = "digits", index: int = 0, split: str = "train", data_dir: str | None = None
) -> np.ndarray:
    """One image of a dataset, scaled to [-1, 1] as the model sees it.

    Args:
      name: an image dataset (``digits`` is prepared offline on first use).
      index: which example of the split.
      split: the split to read.
      data_dir: TFDS data directory; default ``$TFDS_DATA_DIR`` or ``~/tensorflow_datasets``.

    Returns:
      float32 ``[H, W, C]`` in [-1, 1].

    Raises:
      ValueError: a dataset of 2-D points, or an index outside the split.
    """
    from diffusion_jax import data

    info, source = data.open_split(name, split=split, data_dir=data_dir)
    if info.kind != "image":
        raise ValueError(f"Dataset {name!r} holds {info.kind} data, not images.")
    if not 0 <= index < len(source):
        raise ValueError(f"index must lie in [0, {len(source) - 1}], got {index}.")
    image = np.asarray(source.read(np.array([index]))["image"][0], np.float32)
    return image / 127.5 - 1.0


def plot_noising(
    out: str,
    image: np.ndarray | None = None,
    names: Sequence[str] = tuple(schedules_lib.SCHEDULES),
    timesteps: Sequence[int] = (0, 50, 100, 200, 400, 600, 800, 999),
    num_timesteps: int = 1000,
    seed: int = 0,
) -> str:
    """Draws one image noised by q(x_t | x_0) at several t (columns) under each schedule (rows).

    Args:
      out: PNG path to write.
      image: ``[H, W, C]`` in [-1, 1] (C = 1 or 3), e.g. from :func:`dataset_image`; a
        synthetic picture by default.
      names: schedules, one row each.
      timesteps: the t of each column, in ``[0, T-1]``.
      num_timesteps: T.
      seed: seed of the noise, shared by every panel so rows differ only by the schedule.

    Returns:
      ``out``.
    """
    import jax.numpy as jnp

    from diffusion_jax import diffusion

    plt = _pyplot()
    image = synthetic_image() if image is None else np.asarray(image, np.float32)
    if image.ndim != 3 or image.shape[-1] not in (1, 3):
        raise ValueError(f"image must be [H, W, C] with C in (1, 3), got shape {image.shape}.")
    bad = [t for t in timesteps if not 0 <= t < num_timesteps]
    if bad:
        raise ValueError(f"timesteps must lie in [0, {num_timesteps - 1}], got {bad}.")
    noise = np.random.default_rng(seed).standard_normal(image.shape).astype(np.float32)
    batch = len(timesteps)
    x0 = jnp.broadcast_to(image, (batch, *image.shape))
    eps = jnp.broadcast_to(noise, (batch, *image.shape))
    t = jnp.asarray(timesteps, jnp.int32)
    fig, axes = plt.subplots(
        len(names), batch, figsize=(1.6 * batch, 1.7 * len(names)), squeeze=False
    )
    for row, name in enumerate(names):
        sched = schedules_lib.get_schedule(name, num_timesteps)
        noised = np.asarray(diffusion.q_sample(sched, x0, t, eps))
        for col in range(batch):
            ax = axes[row, col]
            pixels = np.clip((noised[col] + 1.0) / 2.0, 0.0, 1.0)
            ax.imshow(
                pixels[..., 0] if pixels.shape[-1] == 1 else pixels,
                cmap="gray",
                vmin=0.0,
                vmax=1.0,
                interpolation="nearest",
            )
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title(f"t = {timesteps[col]}", fontsize=9)
            if col == 0:
                ax.set_ylabel(name)
    fig.suptitle(r"Forward process $q(x_t \mid x_0)$ under each schedule")
    fig.tight_layout()
    return _save(fig, out)


def image_grid(
    images: np.ndarray, columns: int | None = None, pad: int = 1, fill: int = 255
) -> np.ndarray:
    """Tiles uint8 images ``[N, H, W, C]`` into one ``[rows*(H+pad)+pad, cols*(W+pad)+pad, C]``
    picture (about square by default), with ``pad`` pixels of value ``fill`` (white) between
    tiles."""
    images = np.asarray(images)
    if images.ndim != 4 or images.dtype != np.uint8:
        raise ValueError(f"images must be uint8 [N, H, W, C], got {images.dtype} {images.shape}.")
    num, height, width, channels = images.shape
    columns = columns or int(np.ceil(np.sqrt(num)))
    rows = int(np.ceil(num / columns))
    grid = np.full(
        (rows * (height + pad) + pad, columns * (width + pad) + pad, channels), fill, np.uint8
    )
    for index in range(num):
        r, c = divmod(index, columns)
        top, left = pad + r * (height + pad), pad + c * (width + pad)
        grid[top : top + height, left : left + width] = images[index]
    return grid


def save_image_grid(images: np.ndarray, out: str, scale: int | None = None) -> str:
    """Writes uint8 images ``[N, H, W, C]`` as one PNG grid, upscaled (nearest) so that small
    images stay visible: each tile is at least 64 pixels wide unless ``scale`` says otherwise.
    """
    from PIL import Image

    grid = image_grid(images)
    width = np.asarray(images).shape[2]
    scale = scale or max(1, int(np.ceil(64 / width)))
    if scale > 1:
        grid = grid.repeat(scale, axis=0).repeat(scale, axis=1)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid).save(out)
    return out


def plot_points(
    samples: np.ndarray, out: str, data: np.ndarray | None = None, title: str | None = None
) -> str:
    """Scatter plot of 2-D samples ``[N, 2]``, over the data ``[M, 2]`` when given.

    Args:
      samples: ``[N, 2]`` points.
      out: PNG path to write.
      data: ``[M, 2]`` reference points drawn underneath, or None.
      title: the figure's title (default: the number of samples).

    Returns:
      ``out``.
    """
    samples = np.asarray(samples)
    if samples.ndim != 2 or samples.shape[1] != 2:
        raise ValueError(f"samples must be [N, 2] points, got shape {samples.shape}.")
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 6))
    if data is not None:
        data = np.asarray(data)
        ax.scatter(data[:, 0], data[:, 1], s=3, alpha=0.3, c="tab:gray", label="data")
    ax.scatter(samples[:, 0], samples[:, 1], s=4, alpha=0.7, c="tab:red", label="samples")
    ax.set_aspect("equal")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper right")
    ax.set_title(title or f"{len(samples)} samples")
    fig.tight_layout()
    return _save(fig, out)


# ----------------------------------------------------------------------------- from a workdir


def _toy_reference(name: str) -> np.ndarray | None:
    from diffusion_jax.data import toy

    return toy.toy_split(name, "train")[0] if name in toy.TOY_DATASETS else None


def _run_labels(run, num: int) -> np.ndarray | None:
    """Labels 0, 1, 2, ... for a class-conditional model, else None."""
    if run.config.model.class_conditional and run.info.num_classes:
        return np.arange(num, dtype=np.int32) % run.info.num_classes
    return None


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
    which: str = "ema",
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
    """
    import jax

    from diffusion_jax import likelihood, samplers, sampling_lib, sharding

    if frames < 1:
        raise ValueError(f"frames must be >= 1, got {frames}.")
    # A handful of examples: one device, no resharding of the whole loop.
    run = likelihood.restore_run(
        workdir,
        which=which,
        checkpoint_step=checkpoint_step,
        mesh=sharding.make_mesh(jax.local_devices()[:1]),
    )
    is_image = run.info.kind == "image"
    num = (8 if is_image else 1000) if num is None else num
    if num < 1:
        raise ValueError(f"num must be >= 1, got {num}.")
    labels = _run_labels(run, num)
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

    to_uint8 = sampling_lib.to_uint8
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

    plt = _pyplot()
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
    return _save(fig, out)


def _plot_point_trajectory(xs, pred_x0s, samples, timesteps, run, out, title) -> str:
    """Two rows of scatter plots (x_t, predicted x0) over time for 2-D data."""
    plt = _pyplot()
    reference = _toy_reference(run.config.data.name)
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
    return _save(fig, out)


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
      FileNotFoundError: no training losses in ``metrics.jsonl``.
    """
    from diffusion_jax import metrics

    records = metrics.read_metrics(workdir)
    steps, loss = _finite_series(records, "loss")
    if not len(steps):
        raise FileNotFoundError(f"No training losses in {os.path.join(workdir, 'metrics.jsonl')}.")
    plt = _pyplot()
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
    return _save(fig, out)


def plot_samples(
    workdir: str,
    out: str,
    *,
    num: int | None = None,
    method: str = "ddim",
    steps: int = 50,
    seed: int = 0,
    which: str = "ema",
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
    """
    from diffusion_jax import likelihood, sampling_lib

    run = likelihood.restore_run(workdir, which=which, checkpoint_step=checkpoint_step)
    is_image = run.info.kind == "image"
    num = (64 if is_image else 1000) if num is None else num
    if num < 1:
        raise ValueError(f"num must be >= 1, got {num}.")
    samples = sampling_lib.generate(
        run.config,
        run.model,
        run.schedule,
        run.params,
        run.data_shape,
        num=num,
        batch_size=-(-min(num, 256) // run.mesh.size) * run.mesh.size,
        seed=seed,
        method=method,
        num_steps=steps,
        is_image=is_image,
        labels=_run_labels(run, num),
        mesh=run.mesh,
    )
    title = (
        f"{num} samples of {os.path.basename(os.path.abspath(workdir))}\n({which} params, "
        f"step {run.step}; {method}, {steps} steps)"
    )
    if not is_image:
        return plot_points(samples, out, _toy_reference(run.config.data.name), title=title)
    # Grey gaps: tiles stay apart whether their backgrounds are black or white.
    grid = image_grid(_upscale(sampling_lib.to_uint8(samples), 32), pad=3, fill=128)
    plt = _pyplot()
    width = max(5.0, grid.shape[1] / 80)
    fig, ax = plt.subplots(figsize=(width, width * grid.shape[0] / grid.shape[1] + 0.6))
    ax.imshow(
        grid[..., 0] if grid.shape[-1] == 1 else grid, cmap="gray", vmin=0, vmax=255,
        interpolation="nearest",
    )  # fmt: skip
    ax.set_axis_off()
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    return _save(fig, out)


WORKDIR_FIGURES = ("trajectory", "loss", "samples")


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry: ``python -m diffusion_jax.plots NAME --out FILE``."""
    parser = argparse.ArgumentParser(
        prog="python -m diffusion_jax.plots",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "name", choices=["schedules", "noising", *WORKDIR_FIGURES], help="which figure"
    )
    parser.add_argument("--out", required=True, help="PNG file to write")
    parser.add_argument("--num_timesteps", type=int, default=1000, help="schedules, noising")
    parser.add_argument(
        "--dataset", default="digits", help="noising: image dataset, or 'synthetic'"
    )
    parser.add_argument("--index", type=int, default=0, help="noising: which train image")
    parser.add_argument("--data_dir", default=None, help="noising: TFDS data_dir")
    parser.add_argument("--workdir", help="trajectory, loss, samples: the training run")
    parser.add_argument("--method", default="ddim", help="trajectory, samples: the sampler")
    parser.add_argument("--steps", type=int, default=50, help="trajectory, samples")
    parser.add_argument(
        "--num",
        type=int,
        default=None,
        help="trajectory: 8 images / 1000 points; samples: 64 / 1000",
    )
    parser.add_argument("--frames", type=int, default=8, help="trajectory: recorded steps")
    parser.add_argument("--seed", type=int, default=0, help="trajectory, samples")
    parser.add_argument("--params", choices=("ema", "raw"), default="ema")
    parser.add_argument("--checkpoint_step", type=int, default=None, help="default: newest")
    args = parser.parse_args(argv)
    if args.name in WORKDIR_FIGURES and not args.workdir:
        parser.error(f"{args.name} needs --workdir")
    sampling = dict(
        method=args.method,
        steps=args.steps,
        seed=args.seed,
        which=args.params,
        checkpoint_step=args.checkpoint_step,
    )
    if args.name == "schedules":
        path = plot_schedules(args.out, num_timesteps=args.num_timesteps)
    elif args.name == "noising":
        steps = np.linspace(0, args.num_timesteps - 1, 8).round().astype(int).tolist()
        image = None
        if args.dataset != "synthetic":
            image = dataset_image(args.dataset, args.index, data_dir=args.data_dir)
        path = plot_noising(
            args.out, image=image, num_timesteps=args.num_timesteps, timesteps=steps
        )
    elif args.name == "trajectory":
        path = plot_trajectory(args.workdir, args.out, num=args.num, frames=args.frames, **sampling)
    elif args.name == "loss":
        path = plot_loss(args.workdir, args.out)
    else:
        path = plot_samples(args.workdir, args.out, num=args.num, **sampling)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
