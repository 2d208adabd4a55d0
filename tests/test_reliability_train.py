"""Issue 15, the trainer's side: nothing lost, one clear line.

Anything knowable at step 0 fails at step 0 (in-process, through ``train_and_evaluate``, except
what only the CLI sees); one writer per workdir; a stopped run exits 128 + signal;
``metrics.jsonl`` stays ordered whatever the interruptions. The kills during a save and during
an evaluation are in ``test_train_processes.py``.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import threading
import time

import pytest
import trainer_helpers as h

from diffusion_jax import data as data_lib
from diffusion_jax import options, train
from diffusion_jax.train import lock as lock_lib
from diffusion_jax.train import metrics as metrics_lib
from diffusion_jax.train import preflight, sharding

# ---------------------------------------------------------------- refused before the first step


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"optim__b1": 1.0}, r"optim\.b1 = 1\.0 .*\[0, 1\)"),
        ({"optim__b2": -0.1}, r"optim\.b2"),
        ({"optim__eps": 0.0}, r"optim\.eps = 0\.0 .*> 0"),
        ({"optim__lr": float("inf")}, r"optim\.lr = inf .*finite"),
        ({"optim__grad_clip": float("nan")}, r"optim\.grad_clip"),
        ({"data__eval_split": "tset"}, r"data\.eval_split = 'tset'.*splits \['test', 'train'\]"),
        ({"data__train_split": "trian"}, r"data\.train_split = 'trian'"),
        ({"data__batch_size": 4096}, r"data\.eval_split = 'test'.*fewer than one batch"),
        ({"model__name": "unet"}, r"model\.name = 'unet'.*takes images.*'mlp'"),
    ],
)
def test_swissroll_config_refused_at_step_0(overrides, message, tmp_path):
    with pytest.raises(ValueError, match=message):
        train.train_and_evaluate(h.swissroll(**overrides), str(tmp_path / "run"))
    assert not (tmp_path / "run" / "checkpoints").exists()
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"model__ch_mult": (1, 2, 2, 2, 2)}, r"model\.ch_mult .*divisible by 16.*8x8"),
        ({"model__attn_resolutions": (16,)}, r"attn_resolutions .*\[16\] are never reached"),
        ({"model__ch_mult": ()}, r"model\.ch_mult = \(\) .*not empty"),
        ({"model__num_groups": 6}, r"model\.num_groups = 6 .*GroupNorm"),
        ({"model__num_heads": 3}, r"model\.num_heads = 3"),
        ({"model__name": "mlp"}, r"model\.name = 'mlp'.*takes vectors.*'unet'"),
    ],
)
def test_digits_model_that_does_not_fit_the_data_is_refused(overrides, message, tmp_path):
    with pytest.raises(ValueError, match=message):
        train.train_and_evaluate(h.digits(**overrides), str(tmp_path / "run"))
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_folder_dataset_without_test_split_is_refused_with_both_ways_out(monkeypatch, tmp_path):
    """An image folder has only ``train``; the default held-out split is ``test``."""
    real = data_lib.get_dataset_info

    def folder_like(name, data_dir=None):
        info = real(name, data_dir=data_dir)
        return data_lib.DatasetInfo(info.name, info.kind, info.shape, None, {"train": 1500})

    monkeypatch.setattr(data_lib, "get_dataset_info", folder_like)
    with pytest.raises(ValueError) as raised:
        train.train_and_evaluate(h.digits(), str(tmp_path / "run"))
    message = str(raised.value)
    assert "data.eval_split = 'test'" in message and "['train']" in message
    assert "data.eval_split=train" in message and "train.eval_every=0" in message
    # With the held-out loss off, the same config passes the checks.
    preflight.check_data(h.digits(train__eval_every=0))


@pytest.mark.parametrize(
    ("workdir", "message"),
    [
        ("", "workdir is empty"),
        ("   ", "workdir is empty"),
        ("{file}", "is a file, not a directory"),
        ("{file}/run", "is not writable"),
    ],
)
def test_bad_workdir_is_refused(workdir, message, tmp_path):
    a_file = tmp_path / "a_file"
    a_file.write_text("not a directory")
    with pytest.raises(options.ArgumentError, match=message) as raised:
        train.train_and_evaluate(h.swissroll(), workdir.format(file=a_file))
    assert raised.value.argument == "workdir"
    assert "--workdir" in raised.value.for_flags({"workdir": "--workdir"})


@pytest.mark.parametrize(
    ("args", "argument", "message"),
    [
        ((None, 2, 0), "coordinator_address", "num_processes = 2 is given without"),
        ((None, None, 1), "coordinator_address", "process_id = 1 is given without"),
        (("127.0.0.1:1", None, 0), "num_processes", "must be the number of processes"),
        (("127.0.0.1:1", 2, 2), "process_id", r"\[0, 1\].*got 2"),
        (("127.0.0.1:1", 2, -1), "process_id", "got -1"),
        (("127.0.0.1:1", 2, None), "process_id", "got None"),
    ],
)
def test_multi_process_arguments_that_do_not_add_up(args, argument, message):
    with pytest.raises(options.ArgumentError, match=message) as raised:
        sharding.check_distributed_args(*args)
    assert raised.value.argument == argument
    sharding.check_distributed_args(None, None, None)  # one process
    sharding.check_distributed_args("127.0.0.1:1", 2, 1)


# -------------------------------------------------------------------------- the CLI's one line


def _error_line(result: subprocess.CompletedProcess) -> str:
    """The single ``error:`` line of a refused run (and no traceback)."""
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert result.returncode == 2, result.stderr[-3000:]
    assert len(errors) == 1, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    return errors[0]


def _broken_config(tmp_path) -> str:
    path = tmp_path / "broken.py"
    path.write_text("def get_config(:\n    pass\n")
    return str(path)


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (
            ["--config.train.num_stepz=3"],
            "no key 'train.num_stepz'; did you mean 'train.num_steps'",
        ),
        (["--config.train.num_steps=abc"], "--config.train.num_steps=abc"),
        (["--config={tmp}/no_such.py"], "no_such.py: no such config file"),
        (["--config={broken}"], "broken.py does not load (line 1"),
        (["--workdir="], "--workdir is empty"),
        (["--num_processes=2", "--process_id=0"], "without --coordinator_address"),
        (
            ["--coordinator_address=127.0.0.1:1", "--num_processes=2", "--process_id=2"],
            "--process_id must be this process's index in [0, 1]",
        ),
    ],
)
def test_cli_refusals_are_one_error_line_and_exit_2(argv, expected, tmp_path):
    argv = [a.format(tmp=tmp_path, broken=_broken_config(tmp_path)) for a in argv]
    command = h.train_command("swissroll.py", tmp_path / "run", argv)
    if any(a.startswith("--config=") for a in argv):  # replace the default --config
        command = [c for c in command if not c.startswith(f"--config={h.REPO}")]
    if "--workdir=" in argv:
        command.remove(f"--workdir={tmp_path / 'run'}")
    assert expected in _error_line(h.run(command, timeout=120))


def test_cli_verbose_adds_the_traceback(tmp_path):
    command = h.train_command("swissroll.py", tmp_path / "run", ["--config.train.num_stepz=3"])
    for extra, env in ((["--verbose"], None), ([], {"DIFFUSION_JAX_TRACEBACK": "1"})):
        environment = dict(h.subprocess_env(), **(env or {}))
        result = h.run(command + extra, env=environment, timeout=120)
        assert result.returncode == 2
        assert "Traceback" in result.stderr
        assert result.stderr.strip().splitlines()[-1].startswith("error: ")


# ----------------------------------------------------------------------------- one writer only


def test_lock_names_its_holder_and_is_released(tmp_path):
    with lock_lib.WorkdirLock(str(tmp_path)):
        holder = lock_lib.read_holder(str(tmp_path))
        assert holder["pid"] == os.getpid() and holder["host"]
        with pytest.raises(lock_lib.WorkdirLockedError, match=f"process {os.getpid()} on host"):
            lock_lib.WorkdirLock(str(tmp_path)).acquire()
        lock_lib.WorkdirLock(str(tmp_path), enabled=False).acquire()  # processes > 0
    with lock_lib.WorkdirLock(str(tmp_path)):  # released: free again
        pass
    assert lock_lib.read_holder(str(tmp_path)) == {}


def _popen_train(workdir, run: dict, **extra) -> subprocess.Popen:
    command = h.train_command("swissroll.py", workdir, h.flag_overrides(run, **extra))
    return subprocess.Popen(
        command, cwd=h.REPO, env=h.subprocess_env(), stderr=subprocess.PIPE, text=True
    )


def _wait_for_step(workdir, process, step: int, timeout: float = 240.0) -> None:
    deadline = time.monotonic() + timeout
    while max(h.losses_by_step(workdir), default=0) < step:
        if process.poll() is not None:
            raise AssertionError(f"run ended early:\n{process.stderr.read()[-3000:]}")
        assert time.monotonic() < deadline, f"step {step} not logged within {timeout} s"
        time.sleep(0.05)


LONG_RUN = dict(
    h.TINY_SWISSROLL,
    **{
        "train.num_steps": 300,
        "train.checkpoint_every": 50,
        "train.log_every": 10,
        "train.eval_every": 0,
        "train.num_samples": 8,
    },
)


def test_second_trainer_is_refused_and_the_first_loses_nothing(tmp_path):
    workdir = tmp_path / "run"
    first = _popen_train(workdir, LONG_RUN)
    _wait_for_step(workdir, first, 10)
    config = h.apply_overrides(h.swissroll(), LONG_RUN)
    with pytest.raises(lock_lib.WorkdirLockedError, match=f"process {first.pid} on host"):
        train.train_and_evaluate(config, str(workdir))
    _, stderr = first.communicate(timeout=300)
    assert first.returncode == 0, stderr[-3000:]
    steps = [r["step"] for r in metrics_lib.read_metrics(str(workdir))]
    assert steps == list(range(10, 301, 10))
    assert max(int(p) for p in os.listdir(workdir / "checkpoints") if p.isdigit()) == 300


# ------------------------------------------------------------------------ stopped on a signal


def test_ctrl_c_saves_then_exits_130(tmp_path):
    """(SIGTERM's 143: ``test_train_processes.test_sigterm_checkpoints_and_stops``.)"""
    signum = signal.SIGINT
    workdir = tmp_path / "run"
    process = _popen_train(workdir, LONG_RUN, train__num_steps=100_000)
    _wait_for_step(workdir, process, 20)
    process.send_signal(signum)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 128 + signum, stderr[-3000:]
    assert "checkpoint saved at step" in stderr and "error:" not in stderr
    latest = max(int(p) for p in os.listdir(workdir / "checkpoints") if p.isdigit())
    assert latest >= 20 and max(h.losses_by_step(workdir)) <= latest


def test_library_raises_preempted_after_saving(monkeypatch, tmp_path):
    """``train_and_evaluate`` raises :class:`train.Preempted` once the checkpoint is saved."""
    sent = []

    def send_sigterm_once(step, *args):
        if not sent:
            sent.append(step)
            os.kill(os.getpid(), signal.SIGTERM)
        return original(step, *args)

    from diffusion_jax.train import loop

    original = loop._log
    monkeypatch.setattr(loop, "_log", send_sigterm_once)
    config = h.swissroll(train__eval_every=0, train__checkpoint_every=0)
    with pytest.raises(train.Preempted) as raised:
        train.train_and_evaluate(config, str(tmp_path / "run"))
    assert raised.value.signum == signal.SIGTERM and raised.value.exit_status == 143
    assert raised.value.step == sent[0] == 5
    assert os.path.isdir(tmp_path / "run" / "checkpoints" / "5")
    # The read-ahead thread has ended, and the checkpoint holds the 5 batches consumed.
    assert not [t for t in threading.enumerate() if t.name == "diffusion_jax-prefetch"]
    saved = tmp_path / "run" / "checkpoints" / "5"
    data_state = [p.read_text() for p in saved.rglob("*") if "data_state" in str(p) and p.is_file()]
    assert any('"next_index":5' in text.replace(" ", "") for text in data_state), data_state


# ------------------------------------------------------------------------------- metrics.jsonl


def test_writer_refuses_records_out_of_order(tmp_path):
    with metrics_lib.MetricsWriter(str(tmp_path)) as writer:
        writer.write(5, {"loss": 1.0})
        writer.write(5, {"eval_loss": 2.0})  # another metric of the same step
        with pytest.raises(ValueError, match="step 5"):
            writer.write(5, {"loss": 1.0})
        with pytest.raises(ValueError, match="step 4"):
            writer.write(4, {"loss": 1.0})
    with metrics_lib.MetricsWriter(str(tmp_path)) as writer:  # knows the file's last step
        assert writer.recorded(5, "eval_loss")
        with pytest.raises(ValueError):
            writer.write(3, {"loss": 1.0})


def test_deleted_metrics_file_warns_and_is_recreated(tmp_path, caplog):
    with metrics_lib.MetricsWriter(str(tmp_path)) as writer:
        writer.write(1, {"loss": 1.0})
        os.remove(tmp_path / "metrics.jsonl")
        with caplog.at_level("WARNING"):
            writer.write(2, {"loss": 2.0})
    assert "deleted or replaced" in caplog.text
    assert metrics_lib.read_metrics(str(tmp_path)) == [{"step": 2, "loss": 2.0}]


def test_metrics_file_deleted_during_a_run_is_recreated(monkeypatch, tmp_path, caplog):
    from diffusion_jax.train import loop

    original = loop._log

    def delete_at_step_20(step, num_steps, values, writer, progress):
        if step == 20:
            os.remove(writer.path)
        return original(step, num_steps, values, writer, progress)

    monkeypatch.setattr(loop, "_log", delete_at_step_20)
    with caplog.at_level("WARNING"):
        train.train_and_evaluate(h.swissroll(), str(tmp_path / "run"))
    assert "metrics.jsonl was deleted or replaced" in caplog.text
    steps = [r["step"] for r in metrics_lib.read_metrics(str(tmp_path / "run"))]
    assert steps == [20, 20, 25, 30, 35, 40, 40]  # the log and eval records from step 20 on


def _without_timings(workdir) -> list[dict]:
    """The records without the timings, nor ``loss_mean``: after a resume from a SIGTERM's
    checkpoint between log steps, the first window's mean covers only the steps since."""
    timings = {"steps_per_sec", "images_per_sec", "loss_mean"}
    return [
        {k: v for k, v in r.items() if k not in timings} for r in metrics_lib.read_metrics(workdir)
    ]


def test_kills_keep_metrics_ordered_and_a_stale_lock_blocks_nothing(tmp_path):
    """Kills at random moments (SIGKILL after the first checkpoint, then SIGTERM of the resumed
    run), then a resume to the end: the records are those of an uninterrupted run, in order,
    each once. A SIGKILLed run leaves its pid in the lock file, and the next run starts all the
    same. The killed runs read up to 8 batches ahead (``data.prefetch``), the uninterrupted one
    none: the losses, ``eval_loss`` and parameters are the same bit for bit, so each
    checkpoint held the position of the batches consumed, not of those read ahead."""
    workdir = tmp_path / "run"
    run = dict(LONG_RUN, **{"train.num_steps": 400, "train.eval_every": 50})
    reference = str(tmp_path / "reference")
    config = h.apply_overrides(h.swissroll(), dict(run, **{"data.prefetch": 0}))
    train.train_and_evaluate(config, reference)
    rng = random.Random(15)
    for signum in (signal.SIGKILL, signal.SIGTERM):
        process = _popen_train(workdir, run, data__prefetch=8)
        # SIGKILL once the step-50 checkpoint is saved (step 60 logged), so that it resumes.
        _wait_for_step(workdir, process, max(60, 1 + max(h.losses_by_step(workdir), default=0)))
        time.sleep(rng.uniform(0.0, 0.5))
        process.send_signal(signum)
        _, stderr = process.communicate(timeout=120)
        assert process.returncode in (-signal.SIGKILL, 143), stderr[-3000:]
        if signum == signal.SIGKILL:
            assert lock_lib.read_holder(str(workdir))["pid"] == process.pid  # stale
    assert max(h.losses_by_step(workdir)) < 400, "the kills came too late to test anything"
    train.train_and_evaluate(h.apply_overrides(h.swissroll(), run), str(workdir))
    records = metrics_lib.read_metrics(str(workdir))
    logged = {(s, False) for s in range(10, 401, 10)}
    evaluated = {(s, True) for s in range(50, 401, 50)}
    assert [(r["step"], "eval_loss" in r) for r in records] == sorted(logged | evaluated)
    with open(workdir / "metrics.jsonl") as f:
        assert all(json.loads(line) for line in f)  # no torn line left
    assert _without_timings(str(workdir)) == _without_timings(reference)
    h.assert_trees_equal(h.final_params(workdir), h.final_params(reference))
    h.assert_trees_equal(h.final_params(workdir, "ema"), h.final_params(reference, "ema"))


def test_full_disk_stops_the_run_and_loses_nothing_saved(monkeypatch, tmp_path):
    """A write failing with ENOSPC stops the run with the OSError (train.py: one ``error:``
    line); the checkpoints already written stand, and the run resumes from them."""
    import errno

    original = metrics_lib.MetricsWriter.write

    def full_at_step_30(self, step, values):
        if step == 30:
            raise OSError(errno.ENOSPC, "No space left on device")
        return original(self, step, values)

    workdir = str(tmp_path / "run")
    monkeypatch.setattr(metrics_lib.MetricsWriter, "write", full_at_step_30)
    with pytest.raises(OSError, match="No space left"):
        train.train_and_evaluate(h.swissroll(), workdir)
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["20"]
    monkeypatch.setattr(metrics_lib.MetricsWriter, "write", original)
    assert int(train.train_and_evaluate(h.swissroll(), workdir).step) == 40
    steps = [r["step"] for r in metrics_lib.read_metrics(workdir)]
    assert steps == [5, 10, 15, 20, 20, 25, 30, 35, 40, 40]
