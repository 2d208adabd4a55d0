"""diffusion_jax.train.checkpoint: round trips, resharding, corruption, refusal, retention."""

import glob
import json
import logging
import os
import shutil
from unittest import mock

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding, PartitionSpec, SingleDeviceSharding

from diffusion_jax.train import checkpoint_codec
from diffusion_jax.train.checkpoint import (
    CheckpointError,
    CheckpointManager,
    Restored,
    read_config,
    restore_params,
    restore_params_with_config,
)

# A read that fails leaves orbax's other pending reads to finish on a closed event loop; Python
# reports those as unraisable exceptions. They are harmless (the failure itself is raised).
pytestmark = pytest.mark.filterwarnings(
    "ignore:(?s).*Event loop is closed:pytest.PytestUnraisableExceptionWarning"
)

# --------------------------------------------------------------------------- helpers


def _mesh():
    return jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))


def _one_device(leaf=None):
    """The first device's sharding (for any ``leaf``)."""
    del leaf
    return SingleDeviceSharding(jax.devices()[0])


def _state(seed: int = 0) -> dict:
    """A tiny trainer-like state: int step, params, EMA, adam state, uint32 PRNG key data."""
    keys = jax.random.split(jax.random.key(seed), 3)
    params = {
        "dense": {
            "kernel": jax.random.normal(keys[0], (3, 4)),
            "bias": jax.random.normal(keys[1], (4,)),
        }
    }
    ema = jax.tree.map(lambda x: 0.5 * x, params)
    tx = optax.apply_if_finite(optax.chain(optax.clip_by_global_norm(1.0), optax.adam(1e-3)), 3)
    opt_state = tx.init(params)
    # Make the moments non-zero so that a mix-up between steps shows.
    opt_state = jax.tree.map(
        lambda x: x + 1 if jnp.issubdtype(x.dtype, jnp.floating) else x, opt_state
    )
    return {
        "step": jnp.int32(10 * seed + 7),
        "params": params,
        "ema_params": ema,
        "opt_state": opt_state,
        "per_example": jnp.arange(8 * 2, dtype=jnp.float32).reshape(8, 2) + seed,
        "rng": jax.random.key_data(keys[2]),  # [2] uint32
    }


def _place(tree, sharding):
    return jax.device_put(tree, sharding)


def _abstract(tree, sharding_fn):
    """ShapeDtypeStructs of ``tree`` with ``sharding_fn(x)`` as each leaf's sharding."""
    return jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding_fn(x)), tree
    )


def _host_bits(leaf):
    """A leaf as a host array (a PRNG key as its key data, with the impl in the dtype)."""
    if jnp.issubdtype(leaf.dtype, jax.dtypes.prng_key):
        return np.asarray(jax.random.key_data(leaf)), str(leaf.dtype)
    return np.asarray(leaf), str(leaf.dtype)


def _same_bits(actual, expected) -> bool:
    (a, a_dtype), (e, e_dtype) = _host_bits(actual), _host_bits(expected)
    return a_dtype == e_dtype and a.shape == e.shape and a.tobytes() == e.tobytes()


def _bits_differ(actual, expected) -> str:
    (a, a_dtype), (e, e_dtype) = _host_bits(actual), _host_bits(expected)
    return f"{a_dtype}{a.shape} {a.ravel()[:4]} != {e_dtype}{e.shape} {e.ravel()[:4]}"


def _assert_bitwise_equal(actual, expected):
    """The same tree, and every leaf the same dtype, shape and bytes (so -0.0 != 0.0)."""
    chex.assert_trees_all_equal_comparator(_same_bits, _bits_differ, actual, expected)


def _save_steps(directory, steps, **kwargs):
    """Saves _state(step) at each step (synchronously); returns the states."""
    states = {}
    with CheckpointManager(directory, max_to_keep=10, async_save=False, **kwargs) as manager:
        for step in steps:
            states[step] = _state(step)
            manager.save(step, states[step], data_state={"pos": step}, config={"lr": 0.1})
    return states


def _array_files(directory, step):
    # OCDBT data files: the per-process ones and the merged root's (small arrays are inlined in
    # its b-tree nodes).
    state_dir = os.path.join(directory, str(step), "state")
    files = glob.glob(os.path.join(state_dir, "d", "*"))
    files += glob.glob(os.path.join(state_dir, "ocdbt.process_*", "d", "*"))
    assert files, os.listdir(os.path.join(directory, str(step), "state"))
    return files


def _delete(directory, step):
    for path in _array_files(directory, step):
        os.remove(path)


def _truncate(directory, step):
    for path in _array_files(directory, step):
        with open(path, "rb") as f:
            data = f.read()
        with open(path, "wb") as f:
            f.write(data[: len(data) // 2])


def _garble(directory, step):
    for path in _array_files(directory, step):
        with open(path, "rb") as f:
            data = bytearray(f.read())
        for i in range(len(data) // 3, len(data)):
            data[i] ^= 0x5A
        with open(path, "wb") as f:
            f.write(bytes(data))


def _garble_metadata(directory, step):
    with open(os.path.join(directory, str(step), "state", "_METADATA"), "w") as f:
        f.write("{not json")


def _swap_arrays(directory, step):
    """Silent corruption: well-formed array files holding other values than were saved.

    The arrays of ``step`` are replaced by those of a valid checkpoint of another state of the
    same shapes, so they read without error; only the digests saved with the step can tell.
    """
    other = os.path.join(os.path.dirname(directory), "other")
    with CheckpointManager(other, async_save=False) as manager:
        manager.save(step, _state(99))
    state_dir = os.path.join(directory, str(step), "state")
    kept = os.path.join(directory, str(step), "_METADATA.kept")
    shutil.move(os.path.join(state_dir, "_METADATA"), kept)  # the tree and its digests
    shutil.rmtree(state_dir)
    shutil.copytree(os.path.join(other, str(step), "state"), state_dir)
    shutil.move(kept, os.path.join(state_dir, "_METADATA"))


CORRUPTIONS = {
    "deleted": _delete,
    "truncated": _truncate,
    "garbled": _garble,
    "bad_metadata": _garble_metadata,
    "swapped_arrays": _swap_arrays,
}


# --------------------------------------------------------------------------- round trips


def test_async_save_then_restore_is_bit_for_bit(tmp_path):
    directory = str(tmp_path / "ckpt")
    mesh = _mesh()
    replicated = NamedSharding(mesh, PartitionSpec())
    states = {step: _place(_state(step), replicated) for step in (1, 2)}
    states[2]["typed_key"] = jax.device_put(jax.random.key(5), replicated)
    states[1]["typed_key"] = jax.device_put(jax.random.key(4), replicated)
    with CheckpointManager(directory) as manager:  # async by default
        for step, state in states.items():
            assert manager.save(step, state, data_state={"epoch": step}, config={"seed": 0})
        manager.wait_until_finished()
        assert manager.all_steps() == [1, 2]
        assert manager.latest_step() == 2
        restored = manager.restore(_abstract(states[2], lambda x: replicated))
    assert isinstance(restored, Restored)
    assert restored.step == 2 and isinstance(restored.step, int)
    _assert_bitwise_equal(restored.state, states[2])
    assert restored.state["rng"].dtype == jnp.uint32
    assert restored.state["step"].dtype == jnp.int32 and int(restored.state["step"]) == 27
    assert restored.data_state == {"epoch": 2} and restored.config == {"seed": 0}
    for leaf in jax.tree.leaves(restored.state):
        assert leaf.sharding.is_equivalent_to(replicated, leaf.ndim)

    # A fresh manager (a resumed process) sees the same; an explicit older step also restores.
    with CheckpointManager(directory) as manager:
        older = manager.restore(_abstract(states[1], lambda x: replicated), step=1)
    assert older.step == 1
    _assert_bitwise_equal(older.state, states[1])


@pytest.mark.parametrize("direction", ["8_to_1", "1_to_8"])
def test_restore_onto_another_device_count(tmp_path, direction):
    mesh = _mesh()
    replicated = NamedSharding(mesh, PartitionSpec())
    by_rows = NamedSharding(mesh, PartitionSpec("data"))

    def eight(x):  # replicated, except the [8, 2] leaf split over the mesh
        return by_rows if x.shape[:1] == (8,) else replicated

    state = _state(3)
    if direction == "8_to_1":
        save_sharding, restore_sharding = eight, _one_device
    else:
        save_sharding, restore_sharding = _one_device, eight
    on_devices = jax.tree.map(lambda x: jax.device_put(x, save_sharding(x)), state)
    directory = str(tmp_path / "ckpt")
    with CheckpointManager(directory, async_save=False) as manager:
        manager.save(5, on_devices)
    with CheckpointManager(directory) as manager:
        restored = manager.restore(_abstract(state, restore_sharding))
    _assert_bitwise_equal(restored.state, state)
    for leaf in jax.tree.leaves(restored.state):
        assert leaf.sharding.is_equivalent_to(restore_sharding(leaf), leaf.ndim)


DATA_STATES = [
    None,
    "iterator-state-as-a-string",
    b"\x00\xffopaque iterator bytes",
    {
        "epoch": 3,
        "position": {"shard": [0, 5, 9], "seed": 123456789012},
        "name": "digits/train",
        "unicode": "ünïcödé ✓",
        "rate": 0.125,
        "done": False,
        "none": None,
        "blob": b"\x01\x02\x03",
        "pair": (1, "two", b"3"),
        "nested": [{"a": (1.5, None)}, [], {}],
    },
]


@pytest.mark.parametrize("data_state", DATA_STATES, ids=["none", "str", "bytes", "nested"])
def test_data_state_and_config_round_trip_exactly(tmp_path, data_state):
    directory = str(tmp_path / "ckpt")
    config = {
        "model": {"channel_mults": (1, 2, 2), "dropout": 0.1, "name": "unet"},
        "train": {"num_steps": 1000, "init_from": "", "ema": [0.999, None]},
        "seed": np.int64(7),  # NumPy scalars come back as Python scalars
    }
    state = {"x": jnp.ones(2)}
    with CheckpointManager(directory, async_save=False) as manager:
        manager.save(1, state, data_state=data_state, config=config)
        manager.save(2, state)  # neither: both come back as None
    expected_config = {**config, "seed": 7}
    with CheckpointManager(directory) as manager:
        restored = manager.restore(_abstract(state, _one_device), step=1)
        assert restored.data_state == data_state
        assert type(restored.data_state) is type(data_state)
        assert restored.config == expected_config
        assert restored.config["model"]["channel_mults"] == (1, 2, 2)
        assert type(restored.config["seed"]) is int
        if isinstance(data_state, dict):
            assert restored.data_state["pair"] == (1, "two", b"3")
        assert manager.read_config(1) == expected_config
        assert manager.read_config() is None  # step 2 was saved without a config
        assert manager.restore(_abstract(state, _one_device)).data_state is None


@pytest.mark.parametrize(
    "data_state, error",
    [({1: "int key"}, TypeError), ({"x": object()}, TypeError), ({"__tuple__": 1}, ValueError)],
)
def test_unserialisable_json_is_refused_before_saving(tmp_path, data_state, error):
    directory = str(tmp_path / "ckpt")
    with CheckpointManager(directory, async_save=False) as manager:
        with pytest.raises(error, match="data_state"):
            manager.save(1, {"x": jnp.ones(2)}, data_state=data_state)
        assert manager.all_steps() == []


# --------------------------------------------------------------------------- refusal, retention


@pytest.mark.parametrize("bad", [jnp.nan, jnp.inf, -jnp.inf])
def test_non_finite_state_is_never_saved(tmp_path, bad):
    directory = str(tmp_path / "ckpt")
    state = _state(0)
    state["ema_params"]["dense"]["bias"] = state["ema_params"]["dense"]["bias"].at[2].set(bad)
    state["opt_state"] = jax.tree.map(
        lambda x: x.astype(jnp.bfloat16) * bad if x.ndim else x, {"mu": jnp.ones(2)}
    )
    with CheckpointManager(directory) as manager:
        with pytest.raises(ValueError, match=r"non-finite.*ema_params/dense/bias.*opt_state/mu"):
            manager.save(3, state)
        manager.wait_until_finished()
        assert manager.all_steps() == []
        # A finite state then saves normally.
        assert manager.save(3, _state(0))
        manager.wait_until_finished()
        assert manager.all_steps() == [3]


def test_max_to_keep_is_honoured(tmp_path):
    directory = str(tmp_path / "ckpt")
    with CheckpointManager(directory, max_to_keep=2) as manager:
        for step in (1, 2, 3, 4):
            manager.save(step, {"x": jnp.full(2, step, jnp.float32)})
        manager.wait_until_finished()
        assert manager.all_steps() == [3, 4]
    assert sorted(int(n) for n in os.listdir(directory) if n.isdigit()) == [3, 4]
    with pytest.raises(ValueError, match="max_to_keep"):
        CheckpointManager(directory, max_to_keep=0)


def test_half_written_save_is_invisible_and_cleaned_by_the_next_writer(tmp_path):
    directory = str(tmp_path / "ckpt")
    states = _save_steps(directory, [1])
    # What a save killed before orbax's final rename leaves behind.
    leftover = os.path.join(directory, "2.orbax-checkpoint-tmp-1700000000000000")
    shutil.copytree(os.path.join(directory, "1"), leftover)
    os.remove(os.path.join(leftover, "commit_success.txt"))
    with CheckpointManager(directory) as manager:  # a reader, e.g. sample.py during training
        assert manager.all_steps() == [1]
        assert manager.restore(_abstract(states[1], _one_device)).step == 1
    assert os.path.isdir(leftover)  # a reader must not delete what may be a save in flight
    with CheckpointManager(directory) as manager:  # the resumed writer
        manager.save(2, states[1])
        manager.wait_until_finished()
        assert manager.all_steps() == [1, 2]
    assert not os.path.exists(leftover)


# --------------------------------------------------------------------------- corruption


@pytest.mark.parametrize("corrupt", list(CORRUPTIONS.values()), ids=list(CORRUPTIONS))
def test_corrupt_newest_falls_back_to_previous(tmp_path, caplog, corrupt):
    directory = str(tmp_path / "ckpt")
    states = _save_steps(directory, [1, 2, 3])
    corrupt(directory, 3)
    abstract = _abstract(states[3], _one_device)
    with caplog.at_level(logging.WARNING, logger="diffusion_jax.train.checkpoint"):
        with CheckpointManager(directory, max_to_keep=10) as manager:
            restored = manager.restore(abstract)
            assert restored.step == 2
            _assert_bitwise_equal(restored.state, states[2])
            assert restored.data_state == {"pos": 2}
            # The corrupt step is moved aside, so the resumed run can save step 3 again.
            assert manager.all_steps() == [1, 2]
            assert os.path.isdir(os.path.join(directory, "corrupt", "3"))
            assert manager.save(3, states[3])
            manager.wait_until_finished()
            _assert_bitwise_equal(manager.restore(abstract).state, states[3])
    assert os.path.join(directory, "3") in caplog.text


def test_all_corrupt_raises_naming_paths(tmp_path):
    directory = str(tmp_path / "ckpt")
    states = _save_steps(directory, [1, 2])
    _truncate(directory, 2)
    _delete(directory, 1)
    with CheckpointManager(directory) as manager:
        with pytest.raises(CheckpointError) as info:
            manager.restore(_abstract(states[2], _one_device))
    message = str(info.value)
    assert directory in message and "[2, 1]" in message
    assert os.path.join(directory, "2") in message and os.path.join(directory, "1") in message
    with pytest.raises(CheckpointError, match="No readable checkpoint"):
        restore_params(directory, None)


def test_explicit_corrupt_step_raises_without_fallback(tmp_path):
    directory = str(tmp_path / "ckpt")
    states = _save_steps(directory, [1, 2])
    _garble(directory, 2)
    with CheckpointManager(directory) as manager:
        with pytest.raises(CheckpointError, match=r"tried steps \[2\]"):
            manager.restore(_abstract(states[2], _one_device), step=2)
        assert manager.all_steps() == [1, 2]  # nothing moved


def test_no_checkpoint_is_a_clear_error(tmp_path):
    directory = str(tmp_path / "empty")
    with CheckpointManager(directory) as manager:
        assert manager.latest_step() is None and manager.all_steps() == []
        with pytest.raises(CheckpointError, match="No checkpoint found"):
            manager.restore({"x": jax.ShapeDtypeStruct((2,), jnp.float32, sharding=_one_device())})
        with pytest.raises(CheckpointError, match="No checkpoint found"):
            manager.read_config()
    with pytest.raises(CheckpointError, match="does not exist"):
        restore_params(str(tmp_path / "missing"), None)


# --------------------------------------------------------------------------- restore_params


def test_restore_params_restores_one_subtree(tmp_path):
    directory = str(tmp_path / "ckpt")
    mesh = _mesh()
    replicated = NamedSharding(mesh, PartitionSpec())
    states = _save_steps(directory, [1, 2])
    expected = states[2]["ema_params"]

    # With an abstract target (sharded over 8 devices).
    abstract = _abstract(expected, lambda x: replicated)
    ema = restore_params(directory, abstract)
    _assert_bitwise_equal(ema, expected)
    assert all(
        leaf.sharding.is_equivalent_to(replicated, leaf.ndim) for leaf in jax.tree.leaves(ema)
    )

    # Without one: saved shapes and dtypes, on one device.
    ema = restore_params(directory, None)
    _assert_bitwise_equal(ema, expected)
    assert all(leaf.sharding.device_set == {jax.devices()[0]} for leaf in jax.tree.leaves(ema))

    # The raw params of an older step, and a deliberate cast (not mistaken for corruption).
    params = restore_params(directory, None, which="raw", step=1)
    _assert_bitwise_equal(params, states[1]["params"])
    as_bf16 = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, jnp.bfloat16, sharding=_one_device()), expected
    )
    cast = restore_params(directory, as_bf16)
    _assert_bitwise_equal(cast, jax.tree.map(lambda x: x.astype(jnp.bfloat16), expected))

    with pytest.raises(
        ValueError, match=r"Unknown params 'nope'; expected one of \('ema', 'raw'\)"
    ):
        restore_params(directory, None, which="nope")


@pytest.mark.parametrize("corrupt", [_truncate, _swap_arrays], ids=["truncated", "swapped"])
def test_restore_params_falls_back_on_corrupt_newest(tmp_path, caplog, corrupt):
    directory = str(tmp_path / "ckpt")
    states = _save_steps(directory, [1, 2])
    corrupt(directory, 2)
    with caplog.at_level(logging.WARNING, logger="diffusion_jax.train.checkpoint"):
        ema = restore_params(directory, None)
    _assert_bitwise_equal(ema, states[1]["ema_params"])
    assert os.path.join(directory, "2") in caplog.text
    assert os.path.isdir(os.path.join(directory, "2"))  # a reader moves nothing


# --------------------------------------------------------------------------- JSON items


def _rewrite_item(directory, step, name, edit):
    """Rewrites the JSON item ``name`` of ``step`` as ``edit(stored JSON object)``."""
    path = os.path.join(directory, str(step), name, "metadata")
    with open(path) as f:
        stored = json.load(f)
    with open(path, "w") as f:
        json.dump(edit(stored), f)


JSON_EDITS = {
    # Valid JSON of the stored form with other values (the digest no longer matches).
    "data_state_values": ("data_state", lambda item: {**item, "value": {"pos": 7}}),
    "config_values": ("config", lambda item: {**item, "value": {"lr": 0.5}}),
    # Another structure altogether.
    "data_state_structure": ("data_state", lambda item: [1, 2, 3]),
    "config_structure": ("config", lambda item: {"value": [1, 2], "sha256": item["sha256"]}),
    # An old-format item (no digest) whose config is not an object.
    "config_not_object": ("config", lambda item: {"value": "lr=0.5"}),
}


@pytest.mark.parametrize("edit", list(JSON_EDITS.values()), ids=list(JSON_EDITS))
def test_edited_json_item_of_newest_falls_back_for_every_reader(tmp_path, caplog, edit):
    name, change = edit
    directory = str(tmp_path / "ckpt")
    states = _save_steps(directory, [1, 2])
    _rewrite_item(directory, 2, name, change)
    newest = os.path.join(directory, "2")
    with caplog.at_level(logging.WARNING, logger="diffusion_jax.train.checkpoint"):
        # The readers (sampling, evaluation) first: they move nothing.
        step, params = restore_params_with_config(directory, lambda config: None)
        assert step == 1
        _assert_bitwise_equal(params, states[1]["ema_params"])
        assert read_config(directory) == {"lr": 0.1}
        with CheckpointManager(directory) as manager:
            assert manager.read_config() == {"lr": 0.1}
        assert newest in caplog.text and "using step 1" in caplog.text
        caplog.clear()
        # The trainer's restore.
        with CheckpointManager(directory) as manager:
            restored = manager.restore(_abstract(states[2], _one_device))
        assert (restored.step, restored.data_state, restored.config) == (1, {"pos": 1}, {"lr": 0.1})
        assert newest in caplog.text
        assert os.path.isdir(os.path.join(directory, "corrupt", "2"))


def test_json_items_without_digests_still_load(tmp_path):
    directory = str(tmp_path / "ckpt")
    states = _save_steps(directory, [1])
    for name in ("data_state", "config"):
        _rewrite_item(directory, 1, name, lambda item: {"value": item["value"]})
    with CheckpointManager(directory) as manager:
        restored = manager.restore(_abstract(states[1], _one_device))
        assert (restored.step, restored.data_state, restored.config) == (1, {"pos": 1}, {"lr": 0.1})
        assert manager.read_config() == {"lr": 0.1}


def test_a_step_the_check_refuses_falls_back(tmp_path, caplog):
    """The trainer passes the data pipeline's set_state: a position it refuses is skipped."""
    directory = str(tmp_path / "ckpt")
    states = _save_steps(directory, [1, 2])

    def check(restored):
        if restored.data_state["pos"] == 2:
            raise KeyError("the pipeline cannot use this position")

    with caplog.at_level(logging.WARNING, logger="diffusion_jax.train.checkpoint"):
        with CheckpointManager(directory) as manager:
            assert manager.restore(_abstract(states[2], _one_device), check=check).step == 1
    assert "cannot use this position" in caplog.text


def test_an_unusable_config_falls_back_but_a_bad_request_is_its_own_error(tmp_path, caplog):
    directory = str(tmp_path / "ckpt")
    _save_steps(directory, [1, 2])

    def newest_unusable(config):
        if config is None:
            raise AttributeError("config.model is missing")
        return None

    _rewrite_item(directory, 2, "config", lambda item: {"value": None})  # old format, no model
    with caplog.at_level(logging.WARNING, logger="diffusion_jax.train.checkpoint"):
        assert restore_params_with_config(directory, newest_unusable)[0] == 1
    assert "config.model is missing" in caplog.text

    def refuse(config):
        raise FileNotFoundError("no such data_dir")

    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="diffusion_jax.train.checkpoint"):
        with pytest.raises(FileNotFoundError, match="no such data_dir"):
            restore_params_with_config(directory, refuse)
    assert "unreadable" not in caplog.text  # no step is blamed for the caller's error


def test_readers_do_not_log_orbax_read_only_notice(tmp_path, caplog):
    directory = str(tmp_path / "ckpt")
    _save_steps(directory, [1])
    with caplog.at_level(logging.INFO):
        restore_params(directory, None)
    assert "read only" not in caplog.text


# --------------------------------------------------------------------------- failed writes


@pytest.mark.parametrize("when", ["save", "wait"])
def test_a_failed_write_says_the_saved_checkpoints_are_intact(tmp_path, when):
    directory = str(tmp_path / "ckpt")
    states = _save_steps(directory, [1])
    full_disk = OSError(28, "No space left on device")
    with CheckpointManager(directory) as manager:
        manager.save(2, _state(2))  # the first save of a writer reopens its orbax manager
        manager.wait_until_finished()
        orbax_manager = manager._manager
        if when == "save":
            with mock.patch.object(orbax_manager, "save", side_effect=full_disk):
                with pytest.raises(CheckpointError) as error:
                    manager.save(3, _state(3))
        else:
            manager.save(3, _state(3))
            with mock.patch.object(orbax_manager, "wait_until_finished", side_effect=full_disk):
                with pytest.raises(CheckpointError) as error:
                    manager.wait_until_finished()
    message = str(error.value)
    assert "No space left on device" in message and "intact" in message
    assert "(steps [1, 2])" in message or "(steps [1, 2, 3])" in message
    # The earlier checkpoint still restores, bit for bit.
    with CheckpointManager(directory) as reader:
        restored = reader.restore(_abstract(states[1], _one_device), step=1)
    _assert_bitwise_equal(restored.state, states[1])


def test_host_digests_equal_the_device_programs():
    """Leaves held whole are hashed with NumPy (a jitted program over a state's ~1,400 leaves
    took a minute to compile); the digest and finiteness must be those of the device path,
    which arrays spread over several processes still take, for every dtype a state holds."""
    x = np.random.default_rng(0).normal(size=(37, 5)).astype(np.float32)
    leaves = {
        "f32": jnp.asarray(x), "bf16": jnp.asarray(x, jnp.bfloat16),
        "f16": jnp.asarray(x, jnp.float16), "i32": jnp.arange(50, dtype=jnp.int32),
        "u8": jnp.arange(7, dtype=jnp.uint8), "i8": jnp.arange(-4, 4, dtype=jnp.int8),
        "u32": jnp.asarray([2**32 - 1, 5], jnp.uint32), "bool": jnp.array([True, False]),
        "key": jax.random.key(3), "complex": jnp.asarray(x[:, :2]) + 1j,
        "nan": jnp.asarray([1.0, np.nan]), "inf_bf16": jnp.asarray([np.inf], jnp.bfloat16),
        "numpy": x, "scalar": jnp.float32(2.5), "empty": jnp.zeros((0, 3)),
    }  # fmt: skip
    on_host = checkpoint_codec.leaf_digests(leaves)
    on_device = jax.device_get(checkpoint_codec._inspect_leaves(list(leaves.values())))
    for (name, leaf), (finite, digest) in zip(leaves.items(), on_device, strict=True):
        assert on_host[name] == (str(leaf.dtype), bool(finite), int(digest)), name
    assert not on_host["nan"][1] and not on_host["inf_bf16"][1] and on_host["f32"][1]
    # One changed bit changes the digest.
    flipped = x.copy()
    flipped.view(np.uint32)[3, 2] ^= 1 << 7
    assert checkpoint_codec.leaf_digests({"a": flipped}) != checkpoint_codec.leaf_digests({"a": x})
