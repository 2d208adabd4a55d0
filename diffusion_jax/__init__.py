"""diffusion_jax: a functional JAX/Flax library for denoising diffusion models.

The layers, each importing only from those above it in this list:

* the pure core, which takes any ``model_fn(params, x_t, t, **model_kwargs)`` and never imports
  Flax: ``options`` (the vocabulary of string options), ``schedules``, ``timesteps``,
  ``diffusion``, ``losses``, ``samplers``;
* ``models`` (Flax denoisers) and ``data`` (TFDS/grain input pipelines);
* ``plots``: pictures of arrays and of the core;
* ``train``: the training tool (``train.py``);
* ``evaluation``: restoring, sampling (``sample.py``) and scoring trained runs;
* the command lines: ``train.py``, ``sample.py`` and the packages' ``__main__`` modules.

:func:`jit` is ``jax.jit`` with the XLA:CPU options the library's own jits use.
"""

from diffusion_jax._runtime import jit

__all__ = ["jit"]
__version__ = "0.1.0"
