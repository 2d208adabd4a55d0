"""Start-up: the command-line tools' persistent compilation cache (where it is, how it is
turned off, an unwritable directory) and the initial state compiled as a program run once."""

import os

import jax
import numpy as np
import pytest
import trainer_helpers as h

from diffusion_jax import _runtime
from diffusion_jax.train import config as config_lib
from diffusion_jax.train import sharding
from diffusion_jax.train import step as step_lib

# A run that compiles little: two steps of the tiny swiss-roll MLP, no evaluation, no grid.
QUICK = h.flag_overrides(
    h.TINY_SWISSROLL,
    train__num_steps=2,
    train__eval_every=0,
    train__checkpoint_every=0,
    train__num_samples=0,
)


@pytest.fixture
def no_jax_cache_dir():
    """JAX's own cache directory unset for the test (the suite's conftest sets one)."""
    saved = jax.config.jax_compilation_cache_dir
    jax.config.update("jax_compilation_cache_dir", None)
    yield
    jax.config.update("jax_compilation_cache_dir", saved)


def test_cache_dir_default_follows_xdg(monkeypatch, tmp_path, no_jax_cache_dir):
    monkeypatch.delenv(_runtime.COMPILATION_CACHE_ENV, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert _runtime.compilation_cache_dir() == str(tmp_path / "xdg" / "diffusion_jax" / "jax")
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    expected = tmp_path / "home" / ".cache" / "diffusion_jax" / "jax"
    assert _runtime.compilation_cache_dir() == str(expected)


def test_cache_dir_precedence(monkeypatch, tmp_path):
    """A flag beats the environment variable, which beats JAX's own setting (the conftest's)."""
    monkeypatch.delenv(_runtime.COMPILATION_CACHE_ENV, raising=False)
    assert _runtime.compilation_cache_dir() == jax.config.jax_compilation_cache_dir
    monkeypatch.setenv(_runtime.COMPILATION_CACHE_ENV, str(tmp_path / "env"))
    assert _runtime.compilation_cache_dir() == str(tmp_path / "env")
    assert _runtime.compilation_cache_dir(str(tmp_path / "flag")) == str(tmp_path / "flag")
    assert _runtime.compilation_cache_dir("off") is None
    assert _runtime.compilation_cache_dir("OFF") is None
    monkeypatch.setenv(_runtime.COMPILATION_CACHE_ENV, "off")
    assert _runtime.compilation_cache_dir() is None
    assert _runtime.compilation_cache_dir(str(tmp_path / "flag")) == str(tmp_path / "flag")


def test_train_py_writes_its_programs_to_the_cache_flag(tmp_path):
    """``--compilation_cache=DIR`` writes the run's compiled programs to DIR (and not to the
    directory JAX's own variable names)."""
    jax_dir = tmp_path / "jax_env_cache"
    jax_dir.mkdir()
    ours = tmp_path / "cache"
    env = dict(h.subprocess_env(), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
    env["JAX_COMPILATION_CACHE_DIR"] = str(jax_dir)
    env.pop(_runtime.COMPILATION_CACHE_ENV, None)
    command = h.train_command(
        "swissroll.py", tmp_path / "run", [*QUICK, f"--compilation_cache={ours}"]
    )
    result = h.run(command, env=env, timeout=240)
    assert result.returncode == 0, result.stderr[-2000:]
    entries = sorted(n for n in os.listdir(ours) if n.endswith("-cache"))
    assert any(name.startswith("jit_train_step") for name in entries), entries
    assert any(name.startswith("jit_init_fn") for name in entries), entries
    assert os.listdir(jax_dir) == []


@pytest.fixture
def config_updates(monkeypatch):
    """The ``jax.config.update`` calls of the test, recorded instead of made (this process's
    cache is the suite's)."""
    calls = {}

    def record(name, value):
        calls[name] = value

    monkeypatch.setattr(_runtime.jax.config, "update", record)
    return calls


def test_off_turns_every_persistent_cache_off(config_updates, monkeypatch):
    monkeypatch.setenv(_runtime.COMPILATION_CACHE_ENV, "off")
    assert _runtime.use_compilation_cache() is None
    assert config_updates == {"jax_enable_compilation_cache": False}


def test_unwritable_cache_warns_once_and_goes_on(config_updates, tmp_path, caplog):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    with caplog.at_level("WARNING"):
        assert _runtime.use_compilation_cache(str(blocker / "jax")) is None
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and "cannot write to" in warnings[0], warnings
    assert config_updates == {"jax_enable_compilation_cache": False}


def test_writable_cache_is_set(config_updates, tmp_path, monkeypatch):
    monkeypatch.delenv("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", raising=False)
    assert _runtime.use_compilation_cache(str(tmp_path / "new" / "jax")) == str(
        tmp_path / "new" / "jax"
    )
    assert os.path.isdir(tmp_path / "new" / "jax")
    assert os.listdir(tmp_path / "new" / "jax") == []  # the write test leaves nothing
    assert config_updates == {
        "jax_compilation_cache_dir": str(tmp_path / "new" / "jax"),
        "jax_persistent_cache_min_compile_time_secs": _runtime.CACHE_MIN_COMPILE_SECS,
    }


def test_init_run_once_gives_the_optimised_values():
    """The initial state compiled without XLA:CPU's backend optimisations (``run_once``) is
    bit-identical to the one compiled with them (checked on the digits U-Net by hand:
    ``benchmarks/README.md``, "Start-up")."""
    config = h.swissroll()  # a U-Net's optimised init compiles for 20 s even at 8 channels
    data_shape = (2,)
    model = config_lib.build_model(config, data_shape, None)
    tx, _ = config_lib.build_optimizer(config)
    mesh = sharding.make_mesh(jax.devices()[:1])
    init, _, _ = step_lib.create_train_state(config, model, tx, data_shape, mesh)
    assert _runtime.compiler_options("cpu", run_once=True) is not None
    quick = init()
    optimised = jax.jit(init.__wrapped__)()
    for a, b in zip(jax.tree.leaves(quick), jax.tree.leaves(optimised), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
