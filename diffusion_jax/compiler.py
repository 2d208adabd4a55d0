"""Per-executable XLA options for the library's own compiled functions.

XLA:CPU (jaxlib 0.10) hands convolutions, batched dots and some reductions to YNNPACK
"library fusions" by default. On the U-Nets here those run slower than XLA's own CPU kernels:
turning them off made the train step 19-25% faster and the forward pass 30-40% faster on the
2-core CPU of ``benchmarks/README.md`` (section "XLA:CPU library fusions"), with the same
losses to float32 rounding. Newer jaxlibs have also miscompiled some of these fusions.

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

__all__ = ["CPU_COMPILER_OPTIONS", "KEEP_DEFAULTS_ENV", "compiler_options", "jit"]

# Empty value = no YNNPACK library fusions (the flag is a repeated enum of fusion kinds).
CPU_COMPILER_OPTIONS: dict[str, str] = {"xla_cpu_experimental_ynn_fusion_type": ""}
KEEP_DEFAULTS_ENV = "DIFFUSION_JAX_XLA_DEFAULTS"


def compiler_options(backend: str | None = None) -> dict[str, str] | None:
    """The compiler options the library compiles with on ``backend`` (default: JAX's default
    backend), or None for XLA's defaults.

    Calling it without ``backend`` initialises JAX's backends, so call it when compiling, not
    at import time.

    Example:
      >>> compiler_options("gpu") is None
      True
    """
    if os.environ.get(KEEP_DEFAULTS_ENV, "") not in ("", "0"):
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

    def __init__(self, fun: Callable[..., Any], jit_kwargs: dict[str, Any]):
        functools.update_wrapper(self, fun)
        self._fun = fun
        self._jit_kwargs = jit_kwargs
        self._jitted = None
        self._nested = None

    @property
    def jitted(self):
        """The underlying top-level ``jax.jit`` object (with the options)."""
        if self._jitted is None:
            self._jitted = jax.jit(
                self._fun, compiler_options=compiler_options(), **self._jit_kwargs
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
        # Everything else of the jitted function (lower, trace, eval_shape, ...) passes through.
        if name.startswith("__") or name in ("_fun", "_jit_kwargs", "_jitted", "_nested"):
            raise AttributeError(name)
        return getattr(self.jitted, name)


def jit(fun: Callable[..., Any] | None = None, **jit_kwargs: Any):
    """``jax.jit`` with the library's :func:`compiler_options`; usable as a decorator, with or
    without keyword arguments (``static_argnames``, shardings, ``donate_argnums``, ...).

    Example:
      >>> double = jit(lambda x: 2 * x)
      >>> int(double(21))
      42
    """
    if "compiler_options" in jit_kwargs:
        raise TypeError("diffusion_jax.compiler.jit sets compiler_options itself; use jax.jit")
    if fun is None:
        return functools.partial(jit, **jit_kwargs)
    return _Jit(fun, jit_kwargs)
