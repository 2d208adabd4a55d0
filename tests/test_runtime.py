"""diffusion_jax._runtime.jit: the per-executable XLA:CPU options of the library's jits."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax import _runtime

OPTION = "xla_cpu_experimental_ynn_fusion_type"


def _conv_loss(x, w):
    y = jax.lax.conv_general_dilated(
        x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
    )
    return jnp.sum(jnp.tanh(y) * jnp.arange(y.shape[-1]))


def _conv_args():
    kx, kw = jax.random.split(jax.random.key(0))
    return jax.random.normal(kx, (4, 8, 8, 16)), 0.1 * jax.random.normal(kw, (3, 3, 16, 16))


def test_options_on_cpu_only(monkeypatch):
    monkeypatch.delenv(_runtime.KEEP_DEFAULTS_ENV, raising=False)
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
    assert _runtime.compiler_options("cpu") == {OPTION: ""}
    assert _runtime.compiler_options("gpu") is None
    assert _runtime.compiler_options("tpu") is None
    assert _runtime.compiler_options() == {OPTION: ""}  # the test backend is the CPU


def test_user_choice_wins(monkeypatch):
    monkeypatch.setenv("XLA_FLAGS", f"--{OPTION}=individual_dot")
    assert _runtime.compiler_options("cpu") is None
    monkeypatch.setenv("XLA_FLAGS", "")
    monkeypatch.setenv(_runtime.KEEP_DEFAULTS_ENV, "1")
    assert _runtime.compiler_options("cpu") is None
    monkeypatch.setenv(_runtime.KEEP_DEFAULTS_ENV, "0")
    assert _runtime.compiler_options("cpu") == {OPTION: ""}


def test_jit_compiles_without_library_fusions(monkeypatch):
    monkeypatch.delenv(_runtime.KEEP_DEFAULTS_ENV, raising=False)
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
    grad = jax.grad(_conv_loss, argnums=(0, 1))
    args = _conv_args()
    ours = _runtime.jit(grad)
    assert "__ynn_fusion" not in ours.lower(*args).compile().as_text()
    # Same values as XLA's defaults, to float32 rounding of a 144-term contraction.
    expected = jax.jit(grad)(*args)
    for got, want in zip(ours(*args), expected, strict=True):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)


def test_jit_is_lazy_and_passes_jit_arguments_through():
    calls = []

    @_runtime.jit(static_argnames="power")
    def f(x, power):
        calls.append(power)
        return x**power

    assert f._jitted is None  # nothing compiled, no backend touched, until the first call
    assert float(f(jnp.float32(3.0), power=2)) == 9.0
    assert float(f(jnp.float32(3.0), power=2)) == 9.0
    assert float(f(jnp.float32(2.0), power=3)) == 8.0
    assert calls == [2, 3]  # traced once per static value
    assert f._cache_size() == 2  # attributes of the jitted function pass through
    assert f.__name__ == "f"


def test_jit_refuses_its_own_option():
    with pytest.raises(TypeError, match="compiler_options"):
        _runtime.jit(lambda x: x, compiler_options={})


def test_jit_inside_another_trace_runs_as_a_plain_jit():
    inner = _runtime.jit(lambda x: jnp.sin(x) * 2)
    outer = jax.jit(lambda x: inner(x) + 1)  # JAX refuses compiler options on a nested jit
    x = jnp.linspace(0.0, 1.0, 5)
    np.testing.assert_allclose(outer(x), np.sin(np.linspace(0.0, 1.0, 5)) * 2 + 1, rtol=1e-6)
    np.testing.assert_allclose(jax.vmap(inner)(x), np.sin(np.linspace(0.0, 1.0, 5)) * 2, rtol=1e-6)
    np.testing.assert_allclose(jax.grad(lambda x: inner(x).sum())(x), 2 * np.cos(x), rtol=1e-6)


def test_jit_propagates_other_errors():
    bad = _runtime.jit(lambda x: jnp.reshape(x, (7,)))
    with pytest.raises(TypeError):
        bad(jnp.zeros(5))


def test_library_fusions_keep_xla_defaults(monkeypatch):
    monkeypatch.delenv(_runtime.KEEP_DEFAULTS_ENV, raising=False)
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
    assert _runtime.compiler_options("cpu", library_fusions=True) is None
    wide = _runtime.jit(jax.grad(_conv_loss, argnums=(0, 1)), library_fusions=True)
    assert wide._library_fusions
    assert wide.lower(*_conv_args()).compile().as_text() == (
        jax.jit(jax.grad(_conv_loss, argnums=(0, 1))).lower(*_conv_args()).compile().as_text()
    )


@pytest.mark.parametrize(
    ("choice", "ch", "expected"),
    [
        ("auto", 32, False),
        ("auto", 64, False),
        ("auto", 128, True),
        ("on", 32, True),
        ("off", 128, False),
    ],
)
def test_trainer_choice_of_library_fusions(choice, ch, expected):
    from diffusion_jax.train import config as config_lib

    config = config_lib.default_config()
    config.model.ch = ch
    config.train.cpu_library_fusions = choice
    config_lib.validate_config(config)
    assert config_lib.cpu_library_fusions(config) is expected


def test_trainer_choice_is_validated():
    from diffusion_jax.train import config as config_lib

    config = config_lib.default_config()
    config.train.cpu_library_fusions = "yes"
    with pytest.raises(ValueError, match="cpu_library_fusions"):
        config_lib.validate_config(config)
