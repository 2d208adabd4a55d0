"""The trainer's small parts, without training: when periodic work is due, the log window,
the stop flag and the refusal to resume with another config."""

from __future__ import annotations

import os
import signal

import numpy as np
import pytest

from diffusion_jax import options
from diffusion_jax.train import config as config_lib
from diffusion_jax.train import monitor, periodic, preemption, resume


def _due(every, total, **kwargs):
    return [step for step in range(0, total + 1) if periodic.itstime(step, every, total, **kwargs)]


def test_itstime_every_n_steps():
    assert _due(5, 20) == [0, 5, 10, 15, 20]  # step 0 (no step done) is a multiple too
    assert _due(5, 22) == [0, 5, 10, 15, 20]
    assert _due(1, 3) == [0, 1, 2, 3]


def test_itstime_zero_means_never():
    assert _due(0, 10) == []
    assert _due(0, 10, first=True, last=True) == []


def test_itstime_last_step():
    assert _due(5, 22, last=True) == [0, 5, 10, 15, 20, 22]
    assert _due(5, 20, last=True) == [0, 5, 10, 15, 20]  # due once, not twice
    assert _due(50, 7, last=True) == [0, 7]  # a period longer than the run
    assert not periodic.itstime(23, 5, 22, last=True)  # past the end is not the last step


def test_itstime_first_step():
    assert _due(5, 12, first=True) == [0, 1, 5, 10]
    assert _due(1, 3, first=True) == [0, 1, 2, 3]


def test_itstime_rejects_a_negative_period():
    with pytest.raises(ValueError, match="every_n_steps"):
        periodic.itstime(3, -1, 10)


class _Clock:
    """A clock that reads the given times in order."""

    def __init__(self, *times):
        self._times = iter(times)

    def __call__(self):
        return next(self._times)


def _out(loss, nonfinite=0, **extra):
    return {"loss": np.float32(loss), "nonfinite_consecutive": np.int32(nonfinite), **extra}


def test_log_window_rates_and_mean_loss():
    # Clock reads: start (10 s); flush (14 s) and restart (14.5 s); flush (15.5 s) and restart.
    window = monitor.LogWindow(
        100, batch_size=8, max_nonfinite_steps=3, clock=_Clock(10, 14, 14.5, 15.5, 15.5)
    )
    for step, loss in zip(range(101, 105), [1.0, 2.0, 3.0, 6.0], strict=True):
        window.add(step, _out(loss, grad_norm=np.float32(0.5)))
    values = window.flush()
    assert values == {
        "loss": 6.0,
        "nonfinite_consecutive": 0.0,
        "grad_norm": 0.5,
        "loss_mean": 3.0,
        "steps_per_sec": 1.0,  # 4 steps in 4 s
        "images_per_sec": 8.0,
    }
    assert all(type(v) is float for v in values.values())
    window.add(105, _out(0.5))  # the next window holds only the steps since the flush
    values = window.flush()
    assert values["loss_mean"] == 0.5 and values["steps_per_sec"] == 1.0


def test_log_window_needs_a_step():
    window = monitor.LogWindow(0, batch_size=8, max_nonfinite_steps=3)
    with pytest.raises(ValueError, match="at least one step"):
        window.flush()


def test_log_window_checks_nonfinite_counts_one_step_late():
    window = monitor.LogWindow(0, batch_size=8, max_nonfinite_steps=3, clock=_Clock(0, 1, 1))
    window.add(1, _out(np.nan, nonfinite=2))
    window.add(2, _out(np.nan, nonfinite=3))  # reads step 1's count: 2 < 3
    with pytest.raises(monitor.NonFiniteError, match="3 consecutive steps up to step 2"):
        window.add(3, _out(1.0, nonfinite=0))  # reads step 2's count
    window = monitor.LogWindow(0, batch_size=8, max_nonfinite_steps=3, clock=_Clock(0, 1, 1))
    window.add(1, _out(np.nan, nonfinite=3))
    with pytest.raises(monitor.NonFiniteError, match="max_nonfinite_steps = 3"):
        window.flush()  # a log line checks its own step at once


def test_stop_flag_records_sigterm_and_restores_the_handler():
    before = signal.getsignal(signal.SIGTERM)
    with preemption.StopFlag() as stop:
        assert stop.signal is None
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.signal == signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) is before


def test_stop_flag_second_ctrl_c_interrupts():
    with preemption.StopFlag() as stop:
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.signal == signal.SIGINT
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)


def test_changed_config_error_names_the_argument():
    before = config_lib.default_config()
    before.optim.lr = 1e-3
    saved = config_lib.config_to_dict(before)
    now = config_lib.default_config()
    now.optim.lr = 5e-3
    now.train.num_steps = 7  # a run field: may change
    resume.check_config_unchanged(saved, saved, "/w")
    resume.check_config_unchanged(None, config_lib.config_to_dict(now), "/w")
    with pytest.raises(options.ArgumentError) as caught:
        resume.check_config_unchanged(saved, config_lib.config_to_dict(now), "/w")
    error = caught.value
    assert error.argument == "allow_config_change"
    assert "['optim.lr'] differ (saved [0.001], now [0.005])" in str(error)
    assert "num_steps" not in str(error)
    assert "Pass allow_config_change=True to resume anyway" in str(error)
    assert "--" not in str(error)
    flagged = error.for_flags({"allow_config_change": "--allow_config_change"})
    assert "Pass --allow_config_change=True to resume anyway" in flagged


def test_changed_config_error_survives_braces_in_values():
    saved = config_lib.config_to_dict(config_lib.default_config())
    now = config_lib.default_config()
    now.data.name = "folder:/data/{odd}"
    with pytest.raises(options.ArgumentError) as caught:
        resume.check_config_unchanged(saved, config_lib.config_to_dict(now), "/w/{run}")
    assert "folder:/data/{odd}" in str(caught.value) and "/w/{run}" in str(caught.value)
    assert "/w/{run}" in caught.value.for_flags({"allow_config_change": "--allow_config_change"})
