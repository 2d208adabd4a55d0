"""diffusion_jax._runtime.keep_freed_memory: the command-line tools' glibc heap settings."""

import platform
import subprocess
import sys

import pytest

from diffusion_jax import _runtime

glibc = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="needs glibc's mallopt")


@glibc
def test_applies_in_a_fresh_process():
    # In a subprocess, so that the test process keeps glibc's defaults.
    code = "from diffusion_jax import _runtime; print(_runtime.keep_freed_memory())"
    env = {"PATH": "/usr/bin:/bin"}
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True
    )
    assert out.stdout.strip() == "True"


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("MALLOC_TRIM_THRESHOLD_", "1000000"),
        ("MALLOC_MMAP_THRESHOLD_", "131072"),
        ("DIFFUSION_JAX_XLA_DEFAULTS", "1"),
    ],
)
def test_user_settings_win(monkeypatch, name, value):
    monkeypatch.setenv(name, value)
    assert _runtime.keep_freed_memory() is False


def test_limits_fit_mallopt():
    assert 0 < _runtime.TRIM_THRESHOLD_BYTES <= 2**31 - 1
    assert 0 < _runtime.TOP_PAD_BYTES <= 2**31 - 1
