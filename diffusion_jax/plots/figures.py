"""Pictures of arrays and of the core, one function per figure, written as PNG with matplotlib.

The schedules, the forward noising of an image, image grids and 2-D scatter plots. They read
no training run (the figures of a run are in :mod:`diffusion_jax.evaluation.figures`), so the
trainer draws its sample grids with them.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import jax.numpy as jnp
import numpy as np

from diffusion_jax import data, diffusion, options
from diffusion_jax import schedules as schedules_lib

__all__ = [
    "dataset_image",
    "image_grid",
    "plot_noising",
    "plot_points",
    "plot_schedules",
    "pyplot",
    "save_figure",
    "save_image_grid",
    "synthetic_image",
]


def pyplot():
    """matplotlib.pyplot on the non-interactive Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, out: str) -> str:
    """Writes ``fig`` to ``out`` (creating its folder), closes it and returns ``out``."""
    directory = os.path.dirname(os.path.abspath(out))
    os.makedirs(directory, exist_ok=True)
    fig.savefig(out, dpi=100)
    pyplot().close(fig)
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
    plt = pyplot()
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
    return save_figure(fig, out)


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
      ArgumentError: ``index`` outside the split.
      ValueError: a dataset of 2-D points.
    """
    info, source = data.open_split(name, split=split, data_dir=data_dir)
    if info.kind != "image":
        raise ValueError(f"Dataset {name!r} holds {info.kind} data, not images.")
    if not 0 <= index < len(source):
        raise options.ArgumentError(
            "index", f"{{name}} must lie in [0, {len(source) - 1}], got {index}."
        )
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
    plt = pyplot()
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
    return save_figure(fig, out)


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
    plt = pyplot()
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
    return save_figure(fig, out)
