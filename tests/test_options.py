"""Tests of ``diffusion_jax.options``: one vocabulary of string options, checked in one place.

What is checked:
  * every table equals ``typing.get_args`` of its ``Literal``, ``ALLOWED`` maps each option
    name to its table, and the core modules re-export the same tables;
  * ``check`` returns an allowed value, and otherwise raises ``ArgumentError`` (a
    ``ValueError``) whose message names the label (the option's name by default), the bad
    value and every allowed value;
  * ``ArgumentError.for_flags`` renames the argument for a command line, and braces in a bad
    value reach the message as they are (the message is a format template);
  * each core entry point rejects an unknown option through ``check``: the same error type
    and, word for word, the same message.
"""

from __future__ import annotations

import typing

import jax
import jax.numpy as jnp
import pytest

from diffusion_jax import diffusion, losses, options, schedules, timesteps

# Option name (the keyword the core takes), its Literal type, its table.
VOCABULARY = [
    ("parameterization", options.Parameterization, options.PARAMETERIZATIONS),
    ("variance", options.Variance, options.VARIANCES),
    ("loss_type", options.LossType, options.LOSS_TYPES),
    ("method", options.SamplerMethod, options.SAMPLER_METHODS),
    ("timestep_spacing", options.Spacing, options.SPACINGS),
    ("schedule", options.ScheduleName, options.SCHEDULE_NAMES),
    ("timestep_sampler", options.TimestepSampler, options.TIMESTEP_SAMPLERS),
    ("params", options.ParamsChoice, options.PARAMS_CHOICES),
    ("formulation", options.Formulation, options.FORMULATIONS),
]
VARIANCES_TEXT = "('fixed_small', 'fixed_large', 'learned_range')"


def message_of(name: str, value, **kwargs) -> str:
    """The message ``options.check`` gives for ``value``."""
    with pytest.raises(options.ArgumentError) as error:
        options.check(name, value, **kwargs)
    return str(error.value)


# ---------------------------------------------------------------------------- the tables


@pytest.mark.parametrize(("name", "literal", "table"), VOCABULARY, ids=[v[0] for v in VOCABULARY])
def test_table_is_the_literals_args(name, literal, table):
    assert table == typing.get_args(literal)
    assert options.ALLOWED[name] is table
    assert len(set(table)) == len(table) and all(isinstance(v, str) for v in table)


def test_allowed_names_every_option():
    assert set(options.ALLOWED) == {name for name, _, _ in VOCABULARY}


def test_core_modules_reexport_the_tables():
    assert diffusion.PARAMETERIZATIONS is options.PARAMETERIZATIONS
    assert diffusion.VARIANCES is options.VARIANCES
    assert losses.LOSS_TYPES is options.LOSS_TYPES
    assert timesteps.SPACINGS is options.SPACINGS
    assert tuple(schedules.SCHEDULES) == options.SCHEDULE_NAMES


# ---------------------------------------------------------------------------- check


@pytest.mark.parametrize(("name", "literal", "table"), VOCABULARY, ids=[v[0] for v in VOCABULARY])
def test_check_returns_each_allowed_value(name, literal, table):
    del literal
    for value in table:
        assert options.check(name, value) == value


def test_check_names_the_value_and_every_allowed_value():
    with pytest.raises(options.ArgumentError) as error:
        options.check("variance", "learned")
    assert isinstance(error.value, ValueError)
    assert error.value.argument == "variance"
    want = f"Unknown variance 'learned'; expected one of {VARIANCES_TEXT}."
    assert str(error.value) == want


def test_check_names_the_label():
    label = "config.diffusion.variance"
    with pytest.raises(options.ArgumentError) as error:
        options.check("variance", "learned", label=label)
    assert error.value.argument == label
    assert str(error.value) == f"Unknown {label} 'learned'; expected one of {VARIANCES_TEXT}."


@pytest.mark.parametrize("value", [None, 1, b"eps", ("eps",), "EPS", " eps", ""])
def test_check_rejects_what_is_not_an_allowed_string(value):
    want = f"Unknown parameterization {value!r}; expected one of ('eps', 'x0', 'v')."
    assert message_of("parameterization", value) == want


def test_for_flags_renames_the_argument():
    with pytest.raises(options.ArgumentError) as error:
        options.check("variance", "learned")
    flagged = error.value.for_flags({"variance": "--variance", "loss_type": "--loss"})
    assert flagged == f"Unknown --variance 'learned'; expected one of {VARIANCES_TEXT}."
    # A mapping without the argument leaves the library's name.
    assert error.value.for_flags({"loss_type": "--loss"}) == str(error.value)
    assert error.value.for_flags({}) == str(error.value)


def test_for_flags_renames_a_label():
    with pytest.raises(options.ArgumentError) as error:
        options.check("params", "best", label="which")
    assert error.value.for_flags({"which": "--params"}).startswith("Unknown --params 'best';")


def test_argument_error_template():
    error = options.ArgumentError("num_steps", "{name} must lie in [1, 50], got 0.")
    assert isinstance(error, ValueError)
    assert str(error) == "num_steps must lie in [1, 50], got 0."
    assert error.for_flags({"num_steps": "--steps"}) == "--steps must lie in [1, 50], got 0."


@pytest.mark.parametrize("value", ["{name}", "{", "}", "}{", "{0}", "{{name}}", "{name!r:>{x}}"])
def test_braces_in_a_bad_value_reach_the_message_unchanged(value):
    with pytest.raises(options.ArgumentError) as error:
        options.check("variance", value)
    assert str(error.value) == f"Unknown variance {value!r}; expected one of {VARIANCES_TEXT}."
    flagged = error.value.for_flags({"variance": "--variance"})
    assert flagged == f"Unknown --variance {value!r}; expected one of {VARIANCES_TEXT}."


# ---------------------------------------------------------------------------- entry points


def _small_case():
    schedule = schedules.get_schedule("linear", 10)
    x = jnp.zeros((2, 3))
    t = jnp.zeros((2,), jnp.int32)
    return schedule, x, t


def _get_schedule():
    schedules.get_schedule("cosinus", 10)


def _p_mean_variance():
    schedule, x, t = _small_case()
    diffusion.p_mean_variance(schedule, x, x, t, parameterization="epsilon")


def _split_model_output():
    _, x, _ = _small_case()
    diffusion.split_model_output(x, x, variance="learned")


def _training_loss():
    schedule, x, _ = _small_case()
    losses.training_loss(
        lambda params, x_t, t: x_t, None, schedule, x, jax.random.key(0), loss_type="l2"
    )


def _timesteps_for():
    timesteps.timesteps_for(10, 5, "even")


def _predict_x0():
    schedule, x, t = _small_case()
    diffusion.predict_x0(schedule, x, x, t, "score")


ENTRY_POINTS = [
    ("schedule", "cosinus", _get_schedule),
    ("parameterization", "epsilon", _p_mean_variance),
    ("variance", "learned", _split_model_output),
    ("loss_type", "l2", _training_loss),
    ("timestep_spacing", "even", _timesteps_for),
    ("parameterization", "score", _predict_x0),
]


@pytest.mark.parametrize(
    ("name", "value", "call"), ENTRY_POINTS, ids=[call.__name__[1:] for *_, call in ENTRY_POINTS]
)
def test_entry_point_rejects_an_unknown_option_through_check(name, value, call):
    with pytest.raises(options.ArgumentError) as error:
        call()
    assert error.value.argument == name
    assert str(error.value) == message_of(name, value)
    assert repr(value) in str(error.value)
    for allowed in options.ALLOWED[name]:
        assert repr(allowed) in str(error.value)
