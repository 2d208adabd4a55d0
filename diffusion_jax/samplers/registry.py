"""The sampling methods by name: one entry per module, and the only list of them.

A new method is a module defining a :class:`~diffusion_jax.samplers.base.Method`, its entry in
:data:`BUILT_IN` below, and its name in :data:`diffusion_jax.options.SamplerMethod` (the
vocabulary every entry point checks; a test keeps the two equal). :func:`register` adds a
method at run time, e.g. in a test.
"""

from __future__ import annotations

from diffusion_jax import options
from diffusion_jax.samplers import ddim, ddpm, dpm_solver, edm
from diffusion_jax.samplers.base import Method

__all__ = ["BUILT_IN", "get", "methods", "names", "register", "unregister"]

BUILT_IN: tuple[Method, ...] = (ddpm.METHOD, ddim.METHOD, dpm_solver.METHOD, edm.HEUN, edm.EULER)

_METHODS: dict[str, Method] = {}


def register(method: Method) -> Method:
    """Adds ``method`` under ``method.name`` and returns it.

    Raises:
      ValueError: the argument is not a :class:`Method`, or its name is taken.

    Example:
      >>> register(Method("x0_jump", plan=..., update=...))
    """
    if not isinstance(method, Method):
        raise ValueError(f"register() takes a samplers.base.Method, got {type(method).__name__}.")
    if method.name in _METHODS:
        raise ValueError(f"A sampling method named {method.name!r} is already registered.")
    _METHODS[method.name] = method
    return method


def unregister(name: str) -> Method:
    """Removes and returns the method registered under ``name``."""
    return _METHODS.pop(name)


def names() -> tuple[str, ...]:
    """The registered methods' names, in registration order."""
    return tuple(_METHODS)


def methods() -> tuple[Method, ...]:
    """The registered methods, in registration order."""
    return tuple(_METHODS.values())


def get(name: str) -> Method:
    """The method ``name``, which must be in the options' vocabulary and registered.

    Raises:
      ValueError: an unknown name (``Unknown method ...; expected one of ...``), or a name of
        the vocabulary that no module registers.

    Example:
      >>> get("ddim").takes_eta
      True
    """
    options.check("method", name)
    if name not in _METHODS:
        raise ValueError(
            f"method {name!r} is allowed by diffusion_jax.options but no sampler module "
            f"registers it; registered: {names()}."
        )
    return _METHODS[name]


for _method in BUILT_IN:
    register(_method)
