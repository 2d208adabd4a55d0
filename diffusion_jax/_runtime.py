"""Process and compiler settings (private): the XLA:CPU options of the library's jits, and the
host-process settings of the command-line tools.

* :func:`jit` is ``jax.jit`` with per-executable compiler options. On the CPU it turns off
  XLA's YNNPACK "library fusions", which run slower than XLA's own CPU kernels on most U-Nets
  here (``benchmarks/README.md``, "XLA:CPU library fusions"); the trainer keeps them for wide
  nets (``library_fusions=True``; ``train.config.cpu_library_fusions``). The option is set per
  compiled function, never process-wide, and only when the default backend is the CPU: GPU and
  TPU compile exactly as XLA chooses. ``XLA_FLAGS`` naming
  ``xla_cpu_experimental_ynn_fusion_type``, or ``DIFFUSION_JAX_XLA_DEFAULTS=1``, keeps XLA's
  defaults. A user's own ``jax.jit`` around library functions decides the options of that
  program: use ``diffusion_jax.jit`` in its place to compile them the same way. A program run
  once (``run_once=True``: the trainer's initial state) is compiled without XLA:CPU's backend
  optimisations, which take most of its compile time and never pay back over one run (the
  values are bit-identical; ``benchmarks/README.md``, "Start-up").
* :func:`keep_freed_memory` (``train.py`` and ``sample.py`` only: they own their process) stops
  glibc from handing freed heap pages back to the kernel after every compiled step
  (``benchmarks/README.md``, "Keeping freed memory in the heap").
* :func:`quiet_library_logs` drops orbax's and TFDS's INFO lines from the CLIs' logs.
* :func:`use_compilation_cache` (the command-line tools) turns on JAX's persistent compilation
  cache, so a second run loads its compiled steps and samplers from disk instead of compiling
  them again: in ``$XDG_CACHE_HOME/diffusion_jax/jax`` (``~/.cache/diffusion_jax/jax``), or the
  directory ``DIFFUSION_JAX_COMPILATION_CACHE`` (or a CLI's ``--compilation_cache``) names;
  ``off`` turns it off.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging
import os
import tempfile
from collections.abc import Callable
from typing import Any

import jax

__all__ = [
    "COMPILATION_CACHE_ENV",
    "CPU_COMPILER_OPTIONS",
    "CPU_RUN_ONCE_OPTIONS",
    "KEEP_DEFAULTS_ENV",
    "compilation_cache_dir",
    "compiler_options",
    "jit",
    "keep_defaults",
    "keep_freed_memory",
    "quiet_library_logs",
    "use_compilation_cache",
]

# Empty value = no YNNPACK library fusions (the flag is a repeated enum of fusion kinds).
CPU_COMPILER_OPTIONS: dict[str, str] = {"xla_cpu_experimental_ynn_fusion_type": ""}
# For a program run once: LLVM's optimisation passes dominate its compile time on the CPU.
CPU_RUN_ONCE_OPTIONS: dict[str, str] = {"xla_backend_optimization_level": "0"}
KEEP_DEFAULTS_ENV = "DIFFUSION_JAX_XLA_DEFAULTS"


def keep_defaults() -> bool:
    """True when the environment sets ``DIFFUSION_JAX_XLA_DEFAULTS`` (to anything but ``0``):
    no tuning of XLA or of the host process by this library or its command-line tools."""
    return os.environ.get(KEEP_DEFAULTS_ENV, "") not in ("", "0")


def compiler_options(
    backend: str | None = None, library_fusions: bool = False, run_once: bool = False
) -> dict[str, str] | None:
    """The compiler options the library compiles with on ``backend`` (default: JAX's default
    backend), or None for XLA's defaults (always so with ``library_fusions=True`` and
    ``run_once=False``). ``run_once=True`` (a program called once) adds
    :data:`CPU_RUN_ONCE_OPTIONS`.

    Calling it without ``backend`` initialises JAX's backends, so call it when compiling, not
    at import time.

    Example:
      >>> compiler_options("gpu") is None
      True
    """
    if keep_defaults():
        return None
    wanted = {} if library_fusions else dict(CPU_COMPILER_OPTIONS)
    if run_once:
        wanted.update(CPU_RUN_ONCE_OPTIONS)
    user_flags = os.environ.get("XLA_FLAGS", "")
    options = {name: value for name, value in wanted.items() if name not in user_flags}
    if not options or (backend or jax.default_backend()) != "cpu":
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

    def __init__(
        self,
        fun: Callable[..., Any],
        library_fusions: bool,
        jit_kwargs: dict[str, Any],
        run_once: bool = False,
    ):
        functools.update_wrapper(self, fun)
        self._fun = fun
        self._library_fusions = library_fusions
        self._run_once = run_once
        self._jit_kwargs = jit_kwargs
        self._jitted = None
        self._nested = None

    @property
    def jitted(self):
        """The underlying top-level ``jax.jit`` object (with the options)."""
        if self._jitted is None:
            self._jitted = jax.jit(
                self._fun,
                compiler_options=compiler_options(
                    library_fusions=self._library_fusions, run_once=self._run_once
                ),
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


def jit(
    fun: Callable[..., Any] | None = None,
    *,
    library_fusions: bool = False,
    run_once: bool = False,
    **jit_kwargs: Any,
):
    """``jax.jit`` with the library's :func:`compiler_options`; usable as a decorator, with or
    without keyword arguments (``static_argnames``, shardings, ``donate_argnums``, ...).
    ``library_fusions=True`` keeps XLA's defaults (the trainer's choice for wide U-Nets:
    :func:`diffusion_jax.train.config.cpu_library_fusions`). ``run_once=True`` compiles a
    program called once (an initial state) without XLA:CPU's backend optimisations: a faster
    compile, the same values.

    Example:
      >>> double = jit(lambda x: 2 * x)
      >>> int(double(21))
      42
    """
    if "compiler_options" in jit_kwargs:
        raise TypeError("diffusion_jax.jit sets compiler_options itself; use jax.jit")
    if fun is None:
        return functools.partial(
            jit, library_fusions=library_fusions, run_once=run_once, **jit_kwargs
        )
    return _Jit(fun, library_fusions, jit_kwargs, run_once)


# glibc mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_TOP_PAD = -2
TRIM_THRESHOLD_BYTES = 2**31 - 1  # free memory kept at the top of the heap (mallopt's max)
TOP_PAD_BYTES = 256 << 20  # extra memory asked of the kernel each time the heap grows
_USER_ENV = ("MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_", "MALLOC_MMAP_THRESHOLD_")


def keep_freed_memory() -> bool:
    """Raises glibc's heap trim threshold and top pad for this process (``mallopt``).

    Returns:
      True if applied; False on a C library without ``mallopt`` (macOS, musl), or when the
      environment already sets glibc's ``MALLOC_*_`` tunables (the user's choice wins), or when
      ``DIFFUSION_JAX_XLA_DEFAULTS`` asks for every default.
    """
    if any(name in os.environ for name in _USER_ENV):
        return False
    if keep_defaults():
        return False
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return bool(
        mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES) and mallopt(_M_TOP_PAD, TOP_PAD_BYTES)
    )


_CHATTY = ("orbax", "tensorflow_datasets", "xla_bridge")


class _DropChattyInfo(logging.Filter):
    """Drops INFO records from libraries that log every save, restore and dataset open."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING or not any(
            name in record.pathname for name in _CHATTY
        )


def quiet_library_logs() -> None:
    """Keeps a CLI's own log lines readable: orbax's and TFDS's INFO lines are dropped."""
    chatty = _DropChattyInfo()
    for handler in logging.getLogger().handlers:
        handler.addFilter(chatty)
    logging.getLogger("absl").addFilter(chatty)


COMPILATION_CACHE_ENV = "DIFFUSION_JAX_COMPILATION_CACHE"
_CACHE_OFF = ("off", "none", "0", "false", "no")
# Programs that compile faster than this are not written (reading one back costs about as
# much); every program of a run that takes a second or more on the CPU is.
CACHE_MIN_COMPILE_SECS = 0.5


def compilation_cache_dir(setting: str | None = None) -> str | None:
    """Where the command-line tools keep JAX's persistent compilation cache, or None for no
    cache.

    Args:
      setting: a directory, or ``off``; None (a CLI flag left unset) reads the environment
        variable ``DIFFUSION_JAX_COMPILATION_CACHE`` (same values), then JAX's own
        ``jax_compilation_cache_dir`` (``JAX_COMPILATION_CACHE_DIR``), then the default
        ``$XDG_CACHE_HOME/diffusion_jax/jax`` (``~/.cache/diffusion_jax/jax`` without
        ``XDG_CACHE_HOME``).

    Example:
      >>> compilation_cache_dir("off") is None
      True
    """
    if setting is None or not setting.strip():
        setting = os.environ.get(COMPILATION_CACHE_ENV, "").strip()
    if not setting:
        setting = jax.config.jax_compilation_cache_dir or ""
    if setting.lower() in _CACHE_OFF:
        return None
    if setting:
        return os.path.abspath(os.path.expanduser(setting))
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "diffusion_jax", "jax")


def _writable_dir(path: str) -> str | None:
    """None if ``path`` is (or can be made) a directory this process can write a file in, else
    why not."""
    try:
        os.makedirs(path, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write-test-"):
            pass
    except OSError as error:
        return error.strerror or type(error).__name__
    return None


def use_compilation_cache(setting: str | None = None) -> str | None:
    """Turns on JAX's persistent compilation cache for this process (a command-line tool's:
    call it before anything compiles).

    Programs that compile in :data:`CACHE_MIN_COMPILE_SECS` or more are written there and read
    back by any later process that compiles the same program (same shapes, options, JAX and
    backend), so a second run skips their compilation. Entries are never evicted: delete the
    directory to reclaim its space. ``off`` turns off any persistent cache, also one set through
    JAX's own ``JAX_COMPILATION_CACHE_DIR``. A directory that cannot be created or written is
    one warning, and the run goes on without a cache.

    Args:
      setting: see :func:`compilation_cache_dir` (a directory, ``off``, or None).

    Returns:
      The cache directory in use, or None.
    """
    path = compilation_cache_dir(setting)
    problem = None if path is None else _writable_dir(path)
    if path is None or problem is not None:
        jax.config.update("jax_enable_compilation_cache", False)
    if path is None:
        return None
    if problem is not None:
        logging.warning(
            "Compilation cache off: cannot write to %s (%s). Set %s (or --compilation_cache) to "
            "another directory, or to 'off'.",
            path,
            problem,
            COMPILATION_CACHE_ENV,
        )
        return None
    jax.config.update("jax_compilation_cache_dir", path)
    if "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS" not in os.environ:  # the user's wins
        jax.config.update("jax_persistent_cache_min_compile_time_secs", CACHE_MIN_COMPILE_SECS)
    logging.info("Compilation cache: %s", path)
    return path
