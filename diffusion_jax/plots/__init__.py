"""Pictures of arrays and of the core: schedules, noising, image grids, 2-D scatter plots.

``python -m diffusion_jax.plots NAME --out FILE.png`` draws them, and the figures of a training
run (its loss curves, reverse trajectory and samples); see :mod:`diffusion_jax.plots.__main__`.
"""

from diffusion_jax.plots.figures import (
    dataset_image,
    image_grid,
    plot_noising,
    plot_points,
    plot_schedules,
    pyplot,
    save_figure,
    save_image_grid,
    synthetic_image,
)

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
