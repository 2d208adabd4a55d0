"""Per-executable XLA options for the library's own compiled functions.

XLA:CPU (jaxlib 0.10) hands convolutions, batched dots and some reductions to YNNPACK
"library fusions" by default. On most U-Nets here those run slower than XLA's own CPU
kernels; measured on the 2-core CPU of ``benchmarks/README.md`` (section "XLA:CPU library
fusions"), with the same losses to float32 rounding, turning them off made:

* the forward pass (all of sampling) 30-40% faster at base width 32 and 64, and no slower at
  128 (the CIFAR-10 net);
* the train step 20-25% faster at width 32 and 64, but 20% *slower* at width 128, whose
  wide convolutions YNNPACK runs better. The trainer therefore keeps them for wide nets
  (``library_fusions=True`` below; ``configuration.cpu_library_fusions``).

The option is set per compiled function through ``jax.jit(..., compiler_options=...)``, never
process-wide, so code of the user's that shares the process keeps XLA's defaults. It applies
only when the default backend is the CPU (GPU and TPU compile exactly as before), and not at
all when:

* ``XLA_FLAGS`` already names ``xla_cpu_experimental_ynn_fusion_type`` (the user's choice
  wins), or
* the environment sets ``DIFFUSION_JAX_XLA_DEFAULTS=1`` (keep every XLA default).

A user's own ``jax.jit`` around the library's functions (say, ``samplers.sample`` inside a
larger jitted program) decides the options of that program: use :func:`jit` below in place of
``jax.jit``, or pass ``compiler_options=compiler_options()``.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from typing import Any

import jax

__all__ = ["CPU_COMPILER_OPTIONS", "KEEP_DEFAULTS_ENV", "compiler_options", "jit", "keep_defaults"]

# Empty value = no YNNPACK library fusions (the flag is a repeated enum of fusion kinds).
CPU_COMPILER_OPTIONS: dict[str, str] = {"xla_cpu_experimental_ynn_fusion_type": ""}
KEEP_DEFAULTS_ENV = "DIFFUSION_JAX_XLA_DEFAULTS"


def keep_defaults() -> bool:
    """True when the environment sets ``DIFFUSION_JAX_XLA_DEFAULTS`` (to anything but ``0``):
    no tuning of XLA or of the host process by this library or its command-line tools."""
    return os.environ.get(KEEP_DEFAULTS_ENV, "") not in ("", "0")


def compiler_options(
    backend: str | None = None, library_fusions: bool = False
) -> dict[str, str] | None:
    """The compiler options the library compiles with on ``backend`` (default: JAX's default
    backend), or None for XLA's defaults (always so with ``library_fusions=True``).

    Calling it without ``backend`` initialises JAX's backends, so call it when compiling, not
    at import time.

    Example:
      >>> compiler_options("gpu") is None
      True
    """
    if library_fusions or keep_defaults():
        return None
    user_flags = os.environ.get("XLA_FLAGS", "")
    options = {
        name: value for name, value in CPU_COMPILER_OPTIONS.items() if name not in user_flags
    }
    if (backend or jax.default_backend()) != "cpu" or not options:
        return None
    return options


class _Jit:
    """``jax.jit(fun, compiler_options=compiler_options(), **kwargs)``, built at its first use
    (the backend is known then, and importing a module that defines one stays free of side
    effects such as initialising the backends before ``jax.distributed.initialize``).

    Called inside another function being traced (a jit of the user's, ``vmap``, ``grad``), it
    runs as a plain ``jax.jit``: JAX accepts compiler options on top-level jits only, and the
    outer program's options apply to the whole of it.
    """

    def __init__(self, fun: Callable[..., Any], library_fusions: bool, jit_kwargs: dict[str, Any]):
        functools.update_wrapper(self, fun)
        self._fun = fun
        self._library_fusions = library_fusions
        self._jit_kwargs = jit_kwargs
        self._jitted = None
        self._nested = None

    @property
    def jitted(self):
        """The underlying top-level ``jax.jit`` object (with the options)."""
        if self._jitted is None:
            self._jitted = jax.jit(
                self._fun,
                compiler_options=compiler_options(library_fusions=self._library_fusions),
                **self._jit_kwargs,
            )
        return self._jitted

    def __call__(self, *args, **kwargs):
        try:
            return self.jitted(*args, **kwargs)
        except ValueError as error:
            if "top-level" not in str(error):
                raise
        if self._nested is None:
            self._nested = jax.jit(self._fun, **self._jit_kwargs)
        return self._nested(*args, **kwargs)

    def __getattr__(self, name: str):
        # Only reached for names the instance lacks: everything else of the jitted function
        # (lower, trace, eval_shape, _cache_size, ...) passes through. Before __init__ has run
        # (copy, pickle) there is nothing to pass through to.
        if name.startswith("__") or "_nested" not in vars(self):
            raise AttributeError(name)
        return getattr(self.jitted, name)


def jit(fun: Callable[..., Any] | None = None, *, library_fusions: bool = False, **jit_kwargs: Any):
    """``jax.jit`` with the library's :func:`compiler_options`; usable as a decorator, with or
    without keyword arguments (``static_argnames``, shardings, ``donate_argnums``, ...).
    ``library_fusions=True`` keeps XLA's defaults (the trainer's choice for wide U-Nets:
    :func:`diffusion_jax.configuration.cpu_library_fusions`).

    Example:
      >>> double = jit(lambda x: 2 * x)
      >>> int(double(21))
      42
    """
    if "compiler_options" in jit_kwargs:
        raise TypeError("diffusion_jax.compiler.jit sets compiler_options itself; use jax.jit")
    if fun is None:
        return functools.partial(jit, library_fusions=library_fusions, **jit_kwargs)
    return _Jit(fun, library_fusions, jit_kwargs)
