"""The trainer as separate processes: killed and resumed, preempted, and run as two
``jax.distributed`` processes. Split from test_train.py so the two halves run in parallel."""

from __future__ import annotations

import os
import signal
import subprocess
import time

import jax
import numpy as np
import pytest
import trainer_helpers as h

from diffusion_jax import train
from diffusion_jax.train import checkpoint, metrics

KILL_RUN = dict(
    h.TINY_SWISSROLL,
    **{
        "train.num_steps": 400,
        "train.checkpoint_every": 100,
        "train.log_every": 10,
        "train.eval_every": 100,
        "train.num_samples": 8,
    },
)


def _wait_for(path, process, timeout=240.0):
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        if process.poll() is not None:
            raise AssertionError(f"run ended before {path} appeared:\n{process.stderr.read()}")
        if time.monotonic() > deadline:
            process.kill()
            raise AssertionError(f"{path} did not appear within {timeout} s")
        time.sleep(0.05)


@pytest.fixture(scope="module")
def kill_reference(tmp_path_factory):
    """The uninterrupted run of ``KILL_RUN``: its workdir."""
    reference = tmp_path_factory.mktemp("reference") / "run"
    train.train_and_evaluate(h.apply_overrides(h.swissroll(), KILL_RUN), str(reference))
    return reference


def _records(workdir) -> list[dict]:
    """metrics.jsonl without the timings (they differ from run to run)."""
    timings = {"steps_per_sec", "images_per_sec"}
    return [
        {k: v for k, v in r.items() if k not in timings} for r in metrics.read_metrics(str(workdir))
    ]


@pytest.mark.parametrize("where", ["step", "save", "eval"])
def test_sigkill_then_resume_is_bit_exact(where, kill_reference, tmp_path):
    """SIGKILL between steps, just after a checkpoint save has started (orbax still writing),
    or as an evaluation begins (after its step's save): the resumed run's records, including
    each ``eval_loss``, and its parameters are bit for bit those of an uninterrupted run."""
    workdir = tmp_path / "killed"
    command = h.train_command("swissroll.py", workdir, h.flag_overrides(KILL_RUN))
    if where == "step":
        process = subprocess.Popen(
            command, cwd=h.REPO, env=h.subprocess_env(), stderr=subprocess.PIPE, text=True
        )
        _wait_for(workdir / "checkpoints" / "200", process)
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=60)
    else:
        flags = h.flag_overrides(KILL_RUN)
        killed = h.run(h.killed_train_command("swissroll.py", workdir, flags, where, 200))
        assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert max(h.losses_by_step(workdir)) < 400, "the kill came too late to test anything"

    resumed = h.run(command)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert _records(workdir) == _records(kill_reference)
    h.assert_trees_equal(h.final_params(workdir), h.final_params(kill_reference))
    h.assert_trees_equal(h.final_params(workdir, "ema"), h.final_params(kill_reference, "ema"))


def test_sigterm_checkpoints_and_stops(tmp_path):
    workdir = tmp_path / "run"
    flags = h.flag_overrides(KILL_RUN, **{"train.num_steps": 100_000, "train.checkpoint_every": 50})
    process = subprocess.Popen(
        h.train_command("swissroll.py", workdir, flags),
        cwd=h.REPO,
        env=h.subprocess_env(),
        stderr=subprocess.PIPE,
        text=True,
    )
    _wait_for(workdir / "checkpoints" / "50", process)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 128 + signal.SIGTERM, stderr[-3000:]
    assert "checkpoint saved at step" in stderr and "error:" not in stderr
    manager = checkpoint.CheckpointManager(str(workdir / "checkpoints"))
    latest = manager.latest_step()
    manager.close()
    assert 50 <= latest < 100_000
    assert max(h.losses_by_step(workdir)) <= latest


def test_cli_errors_name_flags_and_exit_2(tmp_path):
    """train.py turns the library's refusals into one ``error:`` line naming its own flags."""
    run = dict(h.TINY_SWISSROLL, **{"train.num_steps": 2, "train.checkpoint_every": 2})
    run["train.eval_every"] = 0
    workdir = tmp_path / "run"
    train.train_and_evaluate(h.apply_overrides(h.swissroll(), run), str(workdir))

    changed = h.run(h.train_command("swissroll.py", workdir, h.flag_overrides(run, optim__lr=5e-3)))
    assert changed.returncode == 2, changed.stderr[-3000:]
    errors = [line for line in changed.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "optim.lr" in errors[0], changed.stderr[-3000:]
    assert "Pass --allow_config_change=True to resume anyway" in errors[0]

    missing = tmp_path / "no_such_run"
    flags = h.flag_overrides(run, train__init_from=str(missing))
    no_checkpoint = h.run(h.train_command("swissroll.py", tmp_path / "new", flags))
    assert no_checkpoint.returncode == 2, no_checkpoint.stderr[-3000:]
    assert f"error: No checkpoint found in {missing}" in no_checkpoint.stderr


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_two_processes_train_like_one(tmp_path):
    """Two processes on localhost (jax.distributed over gloo, 2 CPU devices each) read their
    halves of each global batch and give the losses of a single-process run."""
    run = dict(h.TINY_SWISSROLL, **{"train.num_steps": 10, "train.log_every": 1})
    run["train.eval_every"] = 0
    reference = tmp_path / "reference"
    train.train_and_evaluate(h.apply_overrides(h.swissroll(), run), str(reference))

    workdir = tmp_path / "distributed"
    address = f"127.0.0.1:{_free_port()}"
    processes = []
    for process_id in range(2):
        command = h.train_command("swissroll.py", workdir, h.flag_overrides(run)) + [
            f"--coordinator_address={address}",
            "--num_processes=2",
            f"--process_id={process_id}",
        ]
        processes.append(
            subprocess.Popen(
                command,
                cwd=h.REPO,
                env=h.subprocess_env(devices=2),
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    for process in processes:
        try:
            _, stderr = process.communicate(timeout=300)
        except subprocess.TimeoutExpired:
            for p in processes:
                p.kill()
            raise
        assert process.returncode == 0, stderr[-3000:]
    distributed, single = h.losses_by_step(workdir), h.losses_by_step(reference)
    assert sorted(distributed) == list(range(1, 11))
    np.testing.assert_allclose(
        [distributed[s] for s in range(1, 11)], [single[s] for s in range(1, 11)], rtol=2e-5
    )
    for a, b in zip(
        jax.tree.leaves(h.final_params(workdir)),
        jax.tree.leaves(h.final_params(reference)),
        strict=True,
    ):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
