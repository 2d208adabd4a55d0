"""The trainer end to end: real loops on tiny models and data, resume, faults, devices.

Mechanics run on a swiss-roll MLP (milliseconds a step); one test runs the U-Net on digits.
Trained workdirs are shared between tests through module-scoped fixtures.
"""

from __future__ import annotations

import json
import os
import shutil

import jax
import numpy as np
import pytest
import trainer_helpers as h

from diffusion_jax import data as data_lib
from diffusion_jax import options, train
from diffusion_jax.train import checkpoint
from diffusion_jax.train import config as config_lib
from diffusion_jax.train import loop as train_loop
from diffusion_jax.train import metrics as metrics_lib
from diffusion_jax.train import step as train_step


@pytest.fixture(scope="module")
def swiss_workdir(tmp_path_factory):
    """A finished 40-step swiss-roll run (checkpoints at 20 and 40)."""
    workdir = tmp_path_factory.mktemp("swiss") / "run"
    train.train_and_evaluate(h.swissroll(), str(workdir))
    return workdir


def test_swissroll_run_writes_everything(swiss_workdir):
    records = metrics_lib.read_metrics(str(swiss_workdir))
    train_steps = [r["step"] for r in records if "loss" in r]
    assert train_steps == list(range(5, 41, 5))
    for record in records:
        if "loss" in record:
            assert np.isfinite(record["loss"]) and record["steps_per_sec"] > 0
            assert {"learning_rate", "grad_norm", "images_per_sec", "update_skipped"} <= set(record)
    assert [r["step"] for r in records if "eval_loss" in r] == [20, 40]
    assert sorted(os.listdir(swiss_workdir / "checkpoints")) == ["20", "40"]
    assert (swiss_workdir / "samples" / "step_0000040.png").stat().st_size > 1000
    assert any(name.startswith("events") for name in os.listdir(swiss_workdir / "tensorboard"))
    saved = json.loads((swiss_workdir / "config.json").read_text())
    assert saved["data"]["name"] == "swissroll"


def test_resume_continues_and_truncates_metrics(swiss_workdir, tmp_path):
    workdir = tmp_path / "run"
    shutil.copytree(swiss_workdir, workdir)
    # A line logged after the last checkpoint by a run that then died must not survive.
    with open(workdir / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"step": 45, "loss": 123.0}) + "\n")
        f.write('{"step": 50, "lo')  # torn by the kill
    metrics_lib.truncate_metrics(str(workdir), 40)
    assert max(h.losses_by_step(workdir)) == 40
    state = train.train_and_evaluate(h.swissroll(train__num_steps=50), str(workdir))
    assert int(state.step) == 50
    steps = [r["step"] for r in metrics_lib.read_metrics(str(workdir)) if "loss" in r]
    assert steps == sorted(set(steps)) and steps[-1] == 50


def test_changed_config_is_refused_unless_allowed(swiss_workdir, tmp_path):
    workdir = tmp_path / "run"
    shutil.copytree(swiss_workdir, workdir)
    with pytest.raises(options.ArgumentError, match=r"optim\.lr") as caught:
        train.train_and_evaluate(h.swissroll(optim__lr=5e-3), str(workdir))
    # The library names its argument; train.py renders it as its flag.
    assert caught.value.argument == "allow_config_change"
    assert "Pass allow_config_change=True" in str(caught.value) and "--" not in str(caught.value)
    state = train.train_and_evaluate(
        h.swissroll(optim__lr=5e-3, train__num_steps=45), str(workdir), allow_config_change=True
    )
    assert int(state.step) == 45


def test_corrupt_newest_checkpoint_falls_back(swiss_workdir, tmp_path, caplog):
    workdir = tmp_path / "run"
    shutil.copytree(swiss_workdir, workdir)
    state_dir = workdir / "checkpoints" / "40" / "state"
    for root, _, files in os.walk(state_dir):
        for name in files:
            path = os.path.join(root, name)
            if os.path.getsize(path) > 64 and "_METADATA" not in name:
                with open(path, "r+b") as f:
                    f.seek(os.path.getsize(path) // 2)
                    f.write(b"\x00garbage\x00" * 4)
    state = train.train_and_evaluate(h.swissroll(), str(workdir))
    assert int(state.step) == 40  # resumed from 20, trained 20 more
    reference = h.final_params(swiss_workdir)
    h.assert_trees_equal(jax.tree.map(np.asarray, state.params), reference)


def _inject_nan(monkeypatch, bad_steps):
    """Makes the training iterator yield NaN points at the given (1-based) steps."""
    real = data_lib.create_iterator

    def create_iterator(name, *, split, **kwargs):
        iterator = real(name, split=split, **kwargs)
        if split != "train":
            return iterator
        counter = {"step": 0}

        class Poisoned:
            def __next__(self):
                batch = dict(next(iterator))
                counter["step"] += 1
                if counter["step"] in bad_steps:
                    batch["x"] = np.full_like(batch["x"], np.nan)
                return batch

            def __iter__(self):
                return self

            def get_state(self):
                return iterator.get_state()

            def set_state(self, state):
                counter["step"] = 0
                iterator.set_state(state)

        return Poisoned()

    monkeypatch.setattr(train_loop.data, "create_iterator", create_iterator)


def test_nan_update_is_skipped_and_counted(monkeypatch, tmp_path):
    _inject_nan(monkeypatch, bad_steps={7})
    workdir = tmp_path / "run"
    state = train.train_and_evaluate(
        h.swissroll(train__num_steps=10, train__log_every=1), str(workdir)
    )
    records = {r["step"]: r for r in metrics_lib.read_metrics(str(workdir)) if "loss" in r}
    assert records[7]["update_skipped"] == 1 and records[6]["update_skipped"] == 0
    assert records[7]["loss"] == "nan"
    assert records[10]["nonfinite_total"] == 1 and records[10]["nonfinite_consecutive"] == 0
    for leaf in jax.tree.leaves((state.params, state.ema_params)):
        assert np.all(np.isfinite(np.asarray(leaf)))


def test_persistent_nans_stop_the_run_and_are_never_saved(monkeypatch, tmp_path):
    _inject_nan(monkeypatch, bad_steps=set(range(4, 100)))
    workdir = tmp_path / "run"
    config = h.swissroll(
        train__num_steps=30, train__checkpoint_every=2, train__max_nonfinite_steps=5
    )
    with pytest.raises(train.NonFiniteError, match="5 consecutive steps"):
        train.train_and_evaluate(config, str(workdir))
    manager = checkpoint.CheckpointManager(str(workdir / "checkpoints"))
    assert manager.latest_step() is not None and manager.latest_step() <= 8
    for step in manager.all_steps():
        params = checkpoint.restore_params(str(workdir / "checkpoints"), None, step=step)
        assert all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves(params))
    manager.close()


def test_one_and_eight_devices_give_the_same_losses(tmp_path):
    config = h.swissroll(train__num_steps=10, train__log_every=1, train__eval_every=0)
    one = train.train_and_evaluate(config, str(tmp_path / "one"), devices=jax.devices()[:1])
    eight = train.train_and_evaluate(config, str(tmp_path / "eight"))
    assert len(jax.devices()) == 8
    losses_one, losses_eight = (
        h.losses_by_step(tmp_path / "one"),
        h.losses_by_step(tmp_path / "eight"),
    )
    assert sorted(losses_one) == list(range(1, 11))
    # Same global batch and draws; only the order of float reductions differs.
    np.testing.assert_allclose(
        [losses_one[s] for s in range(1, 11)], [losses_eight[s] for s in range(1, 11)], rtol=2e-5
    )
    for a, b in zip(jax.tree.leaves(one.params), jax.tree.leaves(eight.params), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)


def test_gradient_accumulation_counts_optimiser_steps(tmp_path):
    config = h.swissroll(train__num_steps=6, optim__accumulate_steps=2, train__eval_every=0)
    state = train.train_and_evaluate(config, str(tmp_path / "run"))
    import optax

    assert int(optax.tree_utils.tree_get(state.opt_state, "gradient_step")) == 6
    assert int(state.step) == 6


def test_vlb_with_loss_aware_timesteps_runs(tmp_path):
    config = h.swissroll(
        train__num_steps=6,
        diffusion__loss_type="vlb",
        diffusion__timestep_sampler="loss_second_moment",
        train__eval_every=0,
    )
    state = train.train_and_evaluate(config, str(tmp_path / "run"))
    counts, history = np.asarray(state.loss_counts), np.asarray(state.loss_history)
    assert 0 < counts.sum() <= 6 * 64 and counts.max() <= train_step.HISTORY
    # Every recorded loss sits in its row's first `count` slots, and nothing else does.
    assert ((history != 0).sum(axis=1) == counts).all()


def test_loss_history_and_importance_probabilities():
    num_timesteps = 4
    state = train_step.TrainState(
        step=0,
        params={},
        ema_params={},
        opt_state=(),
        loss_history=jax.numpy.zeros((num_timesteps, train_step.HISTORY)),
        loss_counts=jax.numpy.zeros((num_timesteps,), jax.numpy.int32),
    )
    np.testing.assert_allclose(train_step._timestep_probs(state), np.full(4, 0.25))
    rng = np.random.default_rng(0)
    history = np.zeros((num_timesteps, train_step.HISTORY))
    counts = np.zeros(num_timesteps, int)
    for _ in range(8):
        t = rng.integers(0, num_timesteps, 16)
        loss = rng.uniform(0.5, 2.0, 16) * (t + 1)
        state = train_step._record_losses(state, jax.numpy.asarray(t), jax.numpy.asarray(loss))
        for ti, li in zip(t, loss, strict=True):  # reference: keep the last HISTORY losses
            if counts[ti] < train_step.HISTORY:
                history[ti, counts[ti]] = li
                counts[ti] += 1
            else:
                history[ti] = np.append(history[ti, 1:], li)
    np.testing.assert_allclose(np.asarray(state.loss_history), history, rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(state.loss_counts), counts)
    assert counts.min() == train_step.HISTORY
    weights = np.sqrt((history**2).mean(axis=1))
    expected = weights / weights.sum() * (1 - 1e-3) + 1e-3 / num_timesteps
    np.testing.assert_allclose(train_step._timestep_probs(state), expected, rtol=1e-5)


def test_init_from_starts_from_another_runs_params(swiss_workdir, tmp_path):
    config = h.swissroll(
        train__init_from=str(swiss_workdir),
        train__num_steps=1,
        optim__lr=1e-30,
        optim__warmup_steps=0,
    )
    state = train.train_and_evaluate(config, str(tmp_path / "finetune"))
    source = h.final_params(swiss_workdir)
    h.assert_trees_equal(jax.tree.map(np.asarray, state.params), source)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"diffusion__schedule": "cubic"}, "diffusion.schedule"),
        ({"diffusion__loss_type": "hybrid"}, "learned_range"),
        ({"optim__lr": -1.0}, "optim.lr"),
        ({"optim__ema_decay": 1.5}, "ema_decay"),
        ({"train__sample_steps": 500}, "sample_steps"),
        ({"data__batch_size": 60}, "multiple of the number of devices"),
        ({"diffusion__p_uncond": 0.1}, "class_conditional"),
        ({"model__name": "transformer"}, "model.name"),
    ],
)
def test_bad_config_values_fail_before_training(overrides, message, tmp_path):
    with pytest.raises(ValueError, match=message):
        train.train_and_evaluate(h.swissroll(**overrides), str(tmp_path / "run"))
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_unknown_config_key_is_rejected():
    config = h.swissroll()
    config.train.num_stepz = 3
    with pytest.raises(ValueError, match=r"train\.num_stepz"):
        config_lib.validate_config(config)


def test_missing_dataset_fails_at_once(tmp_path):
    config = h.swissroll(data__name="cifar10", data__data_dir=str(tmp_path / "empty"))
    with pytest.raises(FileNotFoundError, match="prepare cifar10"):
        train.train_and_evaluate(config, str(tmp_path / "run"))


def test_bfloat16_compute_keeps_float32_state(tmp_path):
    config = h.swissroll(train__num_steps=5, train__compute_dtype="bfloat16", train__eval_every=0)
    state = train.train_and_evaluate(config, str(tmp_path / "run"))
    dtypes = {leaf.dtype for leaf in jax.tree.leaves((state.params, state.ema_params))}
    assert dtypes == {np.dtype("float32")}
    losses = h.losses_by_step(tmp_path / "run")
    assert all(np.isfinite(v) for v in losses.values())


def test_resume_onto_a_different_number_of_devices(swiss_workdir, tmp_path):
    workdir = tmp_path / "run"
    shutil.copytree(swiss_workdir, workdir)  # saved from 8 devices
    state = train.train_and_evaluate(
        h.swissroll(train__num_steps=45), str(workdir), devices=jax.devices()[:1]
    )
    assert int(state.step) == 45
    assert {d for leaf in jax.tree.leaves(state.params) for d in leaf.devices()} == {
        jax.devices()[0]
    }
