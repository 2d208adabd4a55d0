"""Shared pieces of the trainer tests: tiny configs, subprocess runs, reading runs back."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import chex
import jax
import jax.numpy as jnp
import numpy as np

from configs import digits as digits_config
from configs import swissroll as swissroll_config
from diffusion_jax.train import checkpoint, metrics
from diffusion_jax.train import config as config_lib

REPO = pathlib.Path(__file__).resolve().parents[1]

# A swiss-roll MLP small enough that a step is a few milliseconds on one CPU core.
TINY_SWISSROLL = {
    "data.batch_size": 64,
    "diffusion.num_timesteps": 50,
    "model.ch": 32,
    "model.num_res_blocks": 2,
    "optim.warmup_steps": 5,
    "train.num_steps": 40,
    "train.log_every": 5,
    "train.checkpoint_every": 20,
    "train.eval_every": 20,
    "train.eval_batches": 1,
    "train.sample_every": 0,
    "train.num_samples": 64,
    "train.sample_method": "ddim",
    "train.sample_steps": 10,
    "train.progress_bar": False,
}

# A U-Net of about 40k parameters on the 8x8 digits.
TINY_DIGITS = {
    "data.batch_size": 32,
    "diffusion.num_timesteps": 100,
    "model.ch": 16,
    "model.ch_mult": (1, 2),
    "model.num_res_blocks": 1,
    "model.attn_resolutions": (4,),
    "model.num_groups": 8,
    "optim.warmup_steps": 2,
    "train.num_steps": 6,
    "train.log_every": 2,
    "train.checkpoint_every": 3,
    "train.eval_every": 3,
    "train.eval_batches": 1,
    "train.sample_every": 0,
    "train.num_samples": 8,
    "train.sample_method": "ddim",
    "train.sample_steps": 5,
    "train.progress_bar": False,
}


def apply_overrides(config, overrides: dict):
    """Sets dotted keys of ``config``; returns it."""
    for dotted, value in overrides.items():
        node = config
        *parents, leaf = dotted.split(".")
        for name in parents:
            node = node[name]
        node[leaf] = value
    return config


def swissroll(**extra):
    """The tiny swiss-roll config with ``extra`` dotted overrides (``a__b=v`` for ``a.b``)."""
    overrides = dict(TINY_SWISSROLL)
    overrides.update({k.replace("__", "."): v for k, v in extra.items()})
    return apply_overrides(swissroll_config.get_config(), overrides)


def digits(**extra):
    """The tiny digits config with ``extra`` dotted overrides (``a__b=v`` for ``a.b``)."""
    overrides = dict(TINY_DIGITS)
    overrides.update({k.replace("__", "."): v for k, v in extra.items()})
    return apply_overrides(digits_config.get_config(), overrides)


def random_digits_workdir(workdir: pathlib.Path, seed: int) -> pathlib.Path:
    """A workdir whose one checkpoint (step 0) holds the digits U-Net with random parameters
    (N(0, 0.1^2), from ``seed``) as both raw and EMA params: scored like a trained one, where
    training, or even compiling ``init``, would only add time."""
    config = digits()
    model = config_lib.build_model(config, (8, 8, 1), 10)
    x, t = jnp.zeros((1, 8, 8, 1)), jnp.zeros((1,), jnp.int32)
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), x, t)["params"])
    rng = np.random.default_rng(seed)
    params = jax.tree.map(lambda a: 0.1 * rng.normal(size=a.shape).astype(a.dtype), shapes)
    with checkpoint.CheckpointManager(str(workdir / "checkpoints")) as manager:
        state = {"params": params, "ema_params": params}
        manager.save(0, state, config=config_lib.config_to_dict(config), force=True)
    return workdir


def flag_overrides(base: dict, **extra) -> list[str]:
    """Command-line ``--config.a.b=v`` flags for ``train.py``."""
    values = dict(base)
    values.update({k.replace("__", "."): v for k, v in extra.items()})
    flags = []
    for key, value in values.items():
        if isinstance(value, tuple):
            value = "(" + ",".join(str(v) for v in value) + ("," if len(value) == 1 else "") + ")"
        flags.append(f"--config.{key}={value}")
    return flags


def subprocess_env(devices: int | None = None) -> dict[str, str]:
    """The environment for a child ``train.py``/``sample.py``: same caches, no TTY tricks."""
    env = dict(os.environ)
    if devices is not None:
        env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    import jax

    env["JAX_COMPILATION_CACHE_DIR"] = jax.config.jax_compilation_cache_dir or ""
    env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0.2"
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def train_command(config_file: str, workdir, flags: list[str]) -> list[str]:
    """argv of a ``train.py`` run."""
    return [
        sys.executable,
        str(REPO / "train.py"),
        f"--config={REPO / 'configs' / config_file}",
        f"--workdir={workdir}",
        *flags,
    ]


def run(command: list[str], env=None, timeout: float = 300) -> subprocess.CompletedProcess:
    """Runs a command from the repository root; returns its completed process."""
    return subprocess.run(
        command,
        cwd=REPO,
        env=env or subprocess_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def losses_by_step(workdir) -> dict[int, float]:
    """The logged training loss of each logged step."""
    return {r["step"]: r["loss"] for r in metrics.read_metrics(str(workdir)) if "loss" in r}


def final_params(workdir, which: str = "raw"):
    """A run's latest saved parameters, as numpy."""
    params = checkpoint.restore_params(os.path.join(workdir, "checkpoints"), None, which=which)
    import jax

    return jax.tree.map(np.asarray, params)


def assert_trees_equal(a, b):
    """Exact equality of two pytrees of arrays: the same structure, and every leaf the same
    shape, dtype and values."""
    chex.assert_trees_all_equal(a, b, strict=True)


# Run by ``killed_train_command``: train.py, SIGKILLing itself in the middle of a chosen action.
_KILL_SCRIPT = """
import os, runpy, signal, sys
from diffusion_jax.train import checkpoint, loop
where, kill_step = sys.argv[1], int(sys.argv[2])
sys.argv = sys.argv[3:]  # train.py and its flags

def die():
    os.kill(os.getpid(), signal.SIGKILL)

if where == "save":  # orbax has taken the arrays and is writing them in its thread
    original_save = checkpoint.CheckpointManager.save
    def save(self, step, *args, **kwargs):
        saved = original_save(self, step, *args, **kwargs)
        if step == kill_step:
            die()
        return saved
    checkpoint.CheckpointManager.save = save
elif where == "eval":  # the step's checkpoint has been started, its evaluation has not ended
    original_evaluate = loop._evaluate
    def evaluate(step, *args):
        if step == kill_step:
            die()
        return original_evaluate(step, *args)
    loop._evaluate = evaluate
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def killed_train_command(config_file: str, workdir, flags: list[str], where: str, step: int):
    """argv of a ``train.py`` run that SIGKILLs itself at ``step``: just after starting that
    step's checkpoint save (``where="save"``) or as its evaluation begins (``"eval"``)."""
    command = train_command(config_file, workdir, flags)
    return [command[0], "-c", _KILL_SCRIPT, where, str(step), *command[1:]]
