"""Every shipped config (``configs/*.py``) builds a schedule that ends near N(0, I).

Each ``get_config()`` is loaded and its ``config.diffusion`` fields are passed to
``diffusion_jax.schedules`` directly: the schedule must build without the prior warning of
``get_schedule`` and pass ``check_prior`` at unit data scale (L_T <= ``PRIOR_BPD_LIMIT``,
1e-3 bits/dim), and a zero-terminal-SNR schedule must come with v or x0 prediction. Fields
the trainer may add (``scale_to_num_timesteps``, ``zero_terminal_snr``) are read when present,
with the library's defaults otherwise.
"""

from __future__ import annotations

import importlib
import pathlib
import warnings

import pytest

from diffusion_jax import schedules

CONFIG_DIR = pathlib.Path(__file__).resolve().parent.parent / "configs"
CONFIG_NAMES = sorted(p.stem for p in CONFIG_DIR.glob("*.py") if p.stem != "__init__")


def test_every_config_is_listed():
    assert {"default", "digits", "swissroll", "cifar10"} <= set(CONFIG_NAMES)


@pytest.mark.parametrize("config_name", CONFIG_NAMES)
def test_config_schedule_passes_the_prior_guard(config_name):
    config = importlib.import_module(f"configs.{config_name}").get_config()
    diffusion = config.diffusion
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # the prior warning of get_schedule
        schedule = schedules.get_schedule(
            diffusion.schedule,
            diffusion.num_timesteps,
            scale_to_num_timesteps=diffusion.get("scale_to_num_timesteps", True),
            zero_terminal_snr=diffusion.get("zero_terminal_snr", False),
        )
    bpd = schedules.check_prior(schedule, data_scale=1.0)
    assert 0.0 <= bpd <= schedules.PRIOR_BPD_LIMIT
    schedules.check_parameterization(schedule, diffusion.parameterization)
