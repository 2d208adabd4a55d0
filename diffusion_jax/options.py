"""The vocabulary of options, defined once: a ``Literal`` type and a table of allowed values each.

The core (schedules, diffusion, losses, samplers), the trainer's config validation and the
command-line tools all check a string option through :func:`check`, so every entry point names
the same allowed values, and a type checker sees them in signatures.

Example:
  >>> check("parameterization", "v")
  'v'
  >>> try:
  ...     check("timestep_spacing", "even")
  ... except ValueError as error:
  ...     print(error)
  Unknown timestep_spacing 'even'; expected one of ('linspace', 'leading', 'trailing', 'quadratic').
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal, get_args

__all__ = [
    "ALLOWED",
    "FORMULATIONS",
    "LOSS_TYPES",
    "PARAMETERIZATIONS",
    "PARAMS_CHOICES",
    "SAMPLER_METHODS",
    "SCHEDULE_NAMES",
    "SPACINGS",
    "TIMESTEP_SAMPLERS",
    "VARIANCES",
    "ArgumentError",
    "Formulation",
    "LossType",
    "Parameterization",
    "ParamsChoice",
    "SamplerMethod",
    "ScheduleName",
    "Spacing",
    "TimestepSampler",
    "Variance",
    "check",
]

# What the network predicts: the noise, the clean data, or v = sqrt(abar) eps - sqrt(1-abar) x0.
Parameterization = Literal["eps", "x0", "v"]
# The reverse process's variance: beta_t, the posterior's beta-tilde_t, or learned between them.
Variance = Literal["fixed_small", "fixed_large", "learned_range"]
# The training objective: eps/x0/v MSE, MSE plus the bound for the variance, or the bound alone.
LossType = Literal["simple", "hybrid", "vlb"]
# The samplers of :mod:`diffusion_jax.samplers` (one module each behind its registry).
SamplerMethod = Literal["ddpm", "ddim", "dpm_solver++", "heun", "euler"]
# How a sampler picks its timestep subsequence (:func:`diffusion_jax.timesteps.timesteps_for`).
Spacing = Literal["linspace", "leading", "trailing", "quadratic"]
# The named noise schedules (:func:`diffusion_jax.schedules.get_schedule`).
ScheduleName = Literal["linear", "quadratic", "sigmoid", "cosine"]
# How training draws t: uniformly, or improved DDPM's loss-second-moment importance sampling.
TimestepSampler = Literal["uniform", "loss_second_moment"]
# Which parameters of a trained run to use: the EMA or the raw (trained) ones.
ParamsChoice = Literal["ema", "raw"]
# How a network is trained: DDPM's timesteps and targets, or EDM's preconditioned denoiser.
Formulation = Literal["ddpm", "edm"]

PARAMETERIZATIONS: tuple[str, ...] = get_args(Parameterization)
VARIANCES: tuple[str, ...] = get_args(Variance)
LOSS_TYPES: tuple[str, ...] = get_args(LossType)
SAMPLER_METHODS: tuple[str, ...] = get_args(SamplerMethod)
SPACINGS: tuple[str, ...] = get_args(Spacing)
SCHEDULE_NAMES: tuple[str, ...] = get_args(ScheduleName)
TIMESTEP_SAMPLERS: tuple[str, ...] = get_args(TimestepSampler)
PARAMS_CHOICES: tuple[str, ...] = get_args(ParamsChoice)
FORMULATIONS: tuple[str, ...] = get_args(Formulation)

# Option name -> allowed values; the name is the keyword argument the core takes.
ALLOWED: dict[str, tuple[str, ...]] = {
    "parameterization": PARAMETERIZATIONS,
    "variance": VARIANCES,
    "loss_type": LOSS_TYPES,
    "method": SAMPLER_METHODS,
    "timestep_spacing": SPACINGS,
    "schedule": SCHEDULE_NAMES,
    "timestep_sampler": TIMESTEP_SAMPLERS,
    "params": PARAMS_CHOICES,
    "formulation": FORMULATIONS,
}


class ArgumentError(ValueError):
    """A ValueError about one argument of a library function, worded so that a command-line tool
    can name its own flag in place of the argument.

    ``str(error)`` names the argument as the library knows it; :meth:`for_flags` renders the
    same message with a CLI's flag names.

    Example:
      >>> error = ArgumentError("num_steps", "{name} must lie in [1, 50], got 0.")
      >>> str(error)
      'num_steps must lie in [1, 50], got 0.'
      >>> error.for_flags({"num_steps": "--steps"})
      '--steps must lie in [1, 50], got 0.'
    """

    def __init__(self, argument: str, template: str, **values: object):
        """``template`` names the argument ``{name}``; ``values`` fill its other fields as they
        are (a path or a user's text with braces in it needs no escaping)."""
        self.argument = argument
        self.template = template
        self.values = values
        super().__init__(template.format(**values, name=argument))

    def for_flags(self, flags: Mapping[str, str]) -> str:
        """The message with the argument renamed by ``flags`` (argument name -> flag)."""
        return self.template.format(**self.values, name=flags.get(self.argument, self.argument))


def check(name: str, value: object, *, label: str | None = None) -> str:
    """Returns ``value`` if it is an allowed value of option ``name``; else a ValueError.

    Args:
      name: a key of :data:`ALLOWED`.
      value: the value given.
      label: how the error names the option (default ``name``), e.g. a config field
        ``"config.diffusion.variance"``; command-line tools pass their flag.

    Raises:
      ArgumentError: ``Unknown <label> <value>; expected one of <allowed>.``
    """
    allowed = ALLOWED[name]
    if not isinstance(value, str) or value not in allowed:
        raise ArgumentError(
            label or name,
            "Unknown {name} {value}; expected one of {allowed}.",
            value=repr(value),
            allowed=allowed,
        )
    return value
