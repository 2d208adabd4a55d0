"""diffusion_jax: a functional JAX/Flax library for denoising diffusion models.

The pure core (``schedules``, ``diffusion``, ``losses``, ``samplers``) takes any
``model_fn(params, x_t, t, **model_kwargs)`` and never imports Flax; ``models``, ``data`` and
``train_lib`` make up the training tool built on it.
"""

__version__ = "0.1.0"
