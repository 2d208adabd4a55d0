"""The trainer's config validation guards the schedule: it must reach noise (the prior term), and
zero terminal SNR needs v or x0 prediction. Runs saved before these fields keep their schedule."""

import numpy as np
import pytest

from configs import swissroll
from diffusion_jax import schedules
from diffusion_jax.train import config as config_lib


def test_a_schedule_that_does_not_reach_noise_is_refused_with_the_fix():
    config = swissroll.get_config()  # linear, T = 200
    config.diffusion.scale_to_num_timesteps = False  # DDPM's literal 1e-4..0.02 at T = 200
    with pytest.raises(ValueError) as error:
        config_lib.validate_config(config)
    message = str(error.value)
    assert "alpha_bar_T = 0.132" in message  # the literal range keeps 13% of the signal
    assert "config.diffusion.allow_prior_mismatch = True" in message
    assert "scale_to_num_timesteps" in message


def test_allow_prior_mismatch_lets_it_train_and_never_blocks_a_resume():
    config = swissroll.get_config()
    config.diffusion.scale_to_num_timesteps = False
    config.diffusion.allow_prior_mismatch = True
    config_lib.validate_config(config)
    saved = config_lib.identity_dict(config_lib.config_to_dict(config))
    assert "diffusion.allow_prior_mismatch" not in saved  # a run field: may change on resume


@pytest.mark.parametrize("parameterization, ok", [("eps", False), ("v", True), ("x0", True)])
def test_zero_terminal_snr_needs_v_or_x0(parameterization, ok):
    config = swissroll.get_config()
    config.diffusion.zero_terminal_snr = True
    config.diffusion.parameterization = parameterization
    if ok:
        config_lib.validate_config(config)
        assert config_lib.build_schedule(config).zero_terminal_snr
    else:
        with pytest.raises(ValueError, match=r"needs config\.diffusion\.parameterization 'v' or"):
            config_lib.validate_config(config)


def test_a_config_saved_before_the_new_fields_keeps_its_literal_schedule():
    config = swissroll.get_config()
    del config.diffusion["scale_to_num_timesteps"]
    del config.diffusion["zero_terminal_snr"]
    with pytest.warns(UserWarning, match="alpha_bar_T"):  # the library's own guard warns
        restored = config_lib.build_schedule(config)
    with pytest.warns(UserWarning, match="alpha_bar_T"):
        literal = schedules.get_schedule("linear", 200, scale_to_num_timesteps=False)
    np.testing.assert_array_equal(np.asarray(restored.betas), np.asarray(literal.betas))
    scaled = config_lib.build_schedule(swissroll.get_config())
    assert float(scaled.alphas_cumprod[-1]) < 1e-3 < float(restored.alphas_cumprod[-1])
