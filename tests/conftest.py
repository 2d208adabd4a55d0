"""Test-session set-up shared by every test module.

Runs before any test imports JAX: it exposes eight fake CPU devices (so multi-device code is
exercised on this machine, and the ``with_pmap`` variant of ``chex.variants`` splits a batch
over them, see ``reference.call_variant``) and turns on JAX's persistent compilation cache so
that a second run of the suite skips most XLA compilation.
"""

import os

os.environ.setdefault("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in os.environ["XLA_FLAGS"]:
    os.environ["XLA_FLAGS"] += " --xla_force_host_platform_device_count=8"
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# TFDS must never try the network in tests.
os.environ.setdefault(
    "TFDS_DATA_DIR", os.path.join(os.path.expanduser("~"), ".cache", "diffusion_jax_tests", "tfds")
)

import jax

_CACHE_DIR = os.environ.get(
    "DIFFUSION_JAX_TEST_CACHE",
    os.path.join(os.path.expanduser("~"), ".cache", "diffusion_jax_tests"),
)
jax.config.update("jax_compilation_cache_dir", os.path.join(_CACHE_DIR, "jax"))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)

from hypothesis import settings  # noqa: E402

settings.register_profile("ci", max_examples=25, deadline=None, derandomize=True)
settings.load_profile("ci")
