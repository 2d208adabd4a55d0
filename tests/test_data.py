"""Tests of the input pipeline on the embedded digits dataset, offline.

digits is prepared once per session into a pytest temporary directory and then read through
exactly the path of every TFDS dataset: tfds.data_source (ArrayRecord) -> grain batches.
"""

import json
import os
import socket
import subprocess
import sys
import threading

import chex
import grain
import numpy as np
import pytest
import tensorflow_datasets as tfds

from diffusion_jax import data
from diffusion_jax.data import __main__ as cli
from diffusion_jax.data import digits, sources

# Generous: guards against a hang (e.g. download retries), not a timing assertion.
_HANG_GUARD_SECONDS = 120


@pytest.fixture(scope="session")
def digits_dir(tmp_path_factory):
    """A TFDS data_dir holding the prepared digits dataset."""
    data_dir = str(tmp_path_factory.mktemp("tfds"))
    data.prepare("digits", data_dir=data_dir)
    return data_dir


def _iterator(digits_dir, **kwargs):
    settings = dict(
        split="train", batch_size=100, data_dir=digits_dir, seed=0, process_index=0, process_count=1
    )
    settings.update(kwargs)
    return data.create_iterator("digits", **settings)


def _take(iterator, count):
    return [next(iterator) for _ in range(count)]


def _assert_batches_equal(batches_a, batches_b):
    """The same number of batches, each with the same keys, shapes, dtypes and values."""
    chex.assert_trees_all_equal(batches_a, batches_b, strict=True)


def _concatenate(blocks):
    """The per-process blocks of one global batch, joined key by key."""
    return {key: np.concatenate([block[key] for block in blocks]) for key in blocks[0]}


def _rows(images, labels):
    """One sortable row per example, to compare multisets of examples."""
    flat = np.concatenate([images.reshape(len(images), -1), labels[:, None]], axis=1)
    return flat[np.lexsort(flat.T[::-1])]


def test_digits_split_is_fixed_and_disjoint():
    splits = digits.split_indices()
    assert (len(splits["train"]), len(splits["test"])) == (1500, 297)
    union = np.concatenate([splits["train"], splits["test"]])
    np.testing.assert_array_equal(np.sort(union), np.arange(1797))
    np.testing.assert_array_equal(digits.split_indices()["test"], splits["test"])


def test_digits_uint8_encoding():
    images, labels = digits.load_digits_uint8()
    assert images.shape == (1797, 8, 8, 1) and images.dtype == np.uint8
    from sklearn.datasets import load_digits

    raw = load_digits().images
    np.testing.assert_array_equal(images[..., 0], np.round(raw * 255 / 16).astype(np.uint8))
    assert images.min() == 0 and images.max() == 255
    assert set(np.unique(labels)) == set(range(10))


def test_digits_info(digits_dir):
    info = data.get_dataset_info("digits", data_dir=digits_dir)
    assert info.kind == "image"
    assert info.shape == (8, 8, 1)
    assert info.num_classes == 10
    assert dict(info.splits) == {"train": 1500, "test": 297}
    assert info.data_dir == os.path.abspath(digits_dir)
    assert "bits/dim" in info.notes
    assert info.element_shape() == (8, 8, 1)
    assert info.element_shape(image_size=32) == (32, 32, 1)
    # Prepared as ArrayRecord, so tfds.data_source reads it without TensorFlow.
    source = tfds.data_source("digits", split="test", data_dir=digits_dir, download=False)
    assert len(source) == 297


def test_digits_end_to_end_batches(digits_dir):
    batch = next(_iterator(digits_dir, batch_size=64))
    assert set(batch) == {"image", "label"}
    assert batch["image"].shape == (64, 8, 8, 1) and batch["image"].dtype == np.uint8
    assert batch["label"].shape == (64,) and batch["label"].dtype == np.int32
    assert batch["label"].min() >= 0 and batch["label"].max() <= 9
    # Pixels are round(v * 255 / 16) for v in 0..16: never scaled on the _runtime.
    allowed = np.round(np.arange(17) * 255 / 16).astype(np.uint8)
    assert np.isin(batch["image"], allowed).all()
    assert "tensorflow" not in sys.modules


def test_one_epoch_covers_the_split(digits_dir):
    # 1500 = 3 x 500: one epoch is exactly the split, each example once.
    batches = list(_iterator(digits_dir, batch_size=500, num_epochs=1))
    assert len(batches) == 3
    images = np.concatenate([b["image"] for b in batches])
    labels = np.concatenate([b["label"] for b in batches])
    _, source = data.open_split("digits", split="train", data_dir=digits_dir)
    everything = source.read(np.arange(len(source)))
    np.testing.assert_array_equal(
        _rows(images, labels), _rows(np.stack(everything["image"]), everything["label"])
    )


def test_epoch_remainder_is_dropped(digits_dir):
    iterator = _iterator(digits_dir, batch_size=400, num_epochs=2)
    assert iterator.steps_per_epoch == 3
    assert len(list(iterator)) == 6


def test_same_seed_same_batches_other_seed_other_order(digits_dir):
    first = _take(_iterator(digits_dir, seed=3, random_flip=True), 3)
    again = _take(_iterator(digits_dir, seed=3, random_flip=True), 3)
    _assert_batches_equal(first, again)
    other = next(_iterator(digits_dir, seed=4, random_flip=True))
    assert not np.array_equal(first[0]["label"], other["label"])


def test_each_epoch_is_reshuffled_and_no_shuffle_keeps_order(digits_dir):
    epochs = list(_iterator(digits_dir, batch_size=1500, num_epochs=2))
    assert not np.array_equal(epochs[0]["label"], epochs[1]["label"])
    fixed = list(_iterator(digits_dir, batch_size=1500, num_epochs=2, shuffle=False))
    _assert_batches_equal(fixed[:1], fixed[1:])


@pytest.mark.parametrize("process_count", [2, 4])
def test_processes_read_disjoint_blocks_of_the_same_global_batch(digits_dir, process_count):
    settings = dict(batch_size=100, num_epochs=1, image_size=12, random_flip=True, seed=7)
    single = list(_iterator(digits_dir, **settings))
    per_process = [
        list(_iterator(digits_dir, process_index=p, process_count=process_count, **settings))
        for p in range(process_count)
    ]
    assert all(len(batches) == len(single) == 15 for batches in per_process)
    for step, global_batch in enumerate(single):
        blocks = [batches[step] for batches in per_process]
        assert all(block["image"].shape == (100 // process_count, 12, 12, 1) for block in blocks)
        # Together the processes yield exactly the single-process global batch, flips included.
        chex.assert_trees_all_equal(_concatenate(blocks), global_batch, strict=True)


def test_two_processes_together_cover_the_epoch(digits_dir):
    per_process = [
        list(_iterator(digits_dir, batch_size=500, num_epochs=1, process_index=p, process_count=2))
        for p in range(2)
    ]
    images = np.concatenate([b["image"] for batches in per_process for b in batches])
    labels = np.concatenate([b["label"] for batches in per_process for b in batches])
    _, source = data.open_split("digits", split="train", data_dir=digits_dir)
    everything = source.read(np.arange(len(source)))
    np.testing.assert_array_equal(
        _rows(images, labels), _rows(np.stack(everything["image"]), everything["label"])
    )


@pytest.mark.parametrize("consumed", [2, 5])  # 5 crosses the boundary of the 3-batch epochs.
def test_restored_state_yields_the_same_next_batches(digits_dir, consumed):
    settings = dict(batch_size=500, random_flip=True, seed=11)
    uninterrupted = _iterator(digits_dir, **settings)
    _take(uninterrupted, consumed)
    state = json.loads(json.dumps(uninterrupted.get_state()))
    assert state["grain"]["next_index"] == consumed
    expected = _take(uninterrupted, 4)

    resumed = _iterator(digits_dir, **settings)
    resumed.set_state(state)
    _assert_batches_equal(_take(resumed, 4), expected)


def test_restoring_a_finished_finite_iterator_stops(digits_dir):
    iterator = _iterator(digits_dir, batch_size=500, num_epochs=1)
    _take(iterator, 3)
    resumed = _iterator(digits_dir, batch_size=500, num_epochs=1)
    resumed.set_state(iterator.get_state())
    with pytest.raises(StopIteration):
        next(resumed)


def test_state_of_another_stream_is_rejected(digits_dir):
    state = _iterator(digits_dir, seed=1).get_state()
    with pytest.raises(ValueError, match="another input stream"):
        _iterator(digits_dir, seed=2).set_state(state)


@pytest.mark.parametrize(
    "edit, match",
    [
        (lambda state: ["not", "a", "state"], "Not an iterator state"),
        (lambda state: {"position": 3}, "Not an iterator state"),
        (lambda state: {**state, "grain": "garbage"}, "grain refused the saved iterator position"),
    ],
    ids=["list", "other_keys", "bad_grain_state"],
)
def test_a_damaged_state_is_a_value_error(digits_dir, edit, match):
    """The trainer's restore treats a ValueError here as an unreadable checkpoint."""
    iterator = _iterator(digits_dir, seed=1)
    with pytest.raises(ValueError, match=match):
        iterator.set_state(edit(iterator.get_state()))


def test_state_works_with_grains_orbax_handler(digits_dir, tmp_path):
    from grain.checkpoint import CheckpointHandler

    iterator = _iterator(digits_dir)
    assert isinstance(iterator, grain.DatasetIterator)
    _take(iterator, 2)
    CheckpointHandler().save(tmp_path, iterator)
    expected = next(iterator)
    resumed = CheckpointHandler().restore(tmp_path, _iterator(digits_dir))
    _assert_batches_equal([next(resumed)], [expected])


def test_process_defaults_come_from_jax(digits_dir):
    import jax

    iterator = data.create_iterator("digits", split="test", batch_size=8, data_dir=digits_dir)
    assert jax.process_count() == 1
    assert next(iterator)["image"].shape == (8, 8, 8, 1)


def test_argument_validation(digits_dir):
    with pytest.raises(ValueError, match="multiple of process_count"):
        _iterator(digits_dir, batch_size=10, process_count=3, process_index=0)
    with pytest.raises(ValueError, match="larger than split"):
        _iterator(digits_dir, batch_size=2000)
    with pytest.raises(ValueError, match="no split"):
        _iterator(digits_dir, split="validation")
    with pytest.raises(ValueError, match="process_index"):
        _iterator(digits_dir, process_index=2, process_count=2)


def test_tfds_split_slices_are_supported(digits_dir):
    info, source = data.open_split("digits", split="train[:10%]", data_dir=digits_dir)
    assert len(source) == 150 and info.splits["train"] == 1500


def test_resize_and_center_crop():
    tall = np.zeros((100, 10, 3), np.uint8)
    tall[30:70] = 200  # Only the middle rows are bright: the centre crop must see only them.
    crop = data.resize_and_center_crop(tall, 10)
    assert crop.shape == (10, 10, 3) and crop.dtype == np.uint8
    assert (crop == 200).all()
    gray = np.full((4, 6, 1), 7, np.uint8)  # Upscaled and cropped; a constant stays constant.
    np.testing.assert_array_equal(data.resize_and_center_crop(gray, 8), np.full((8, 8, 1), 7))
    wide = np.full((40, 60, 3), 90, np.uint8)
    assert data.resize_and_center_crop(wide, 16).shape == (16, 16, 3)


def test_labels_are_validated_on_the_host():
    np.testing.assert_array_equal(data.check_labels(np.array([0, 9]), 10, "x"), [0, 9])
    with pytest.raises(ValueError, match=r"outside 0\.\.9"):
        data.check_labels(np.array([3, 10]), 10, "digits")
    with pytest.raises(ValueError, match="outside"):
        data.check_labels(np.array([-1]), 10, "digits")


@pytest.fixture
def no_network(monkeypatch):
    """Makes every socket connection fail loudly and records the attempts."""
    attempts = []

    def refuse(*args, **kwargs):
        attempts.append(args)
        raise OSError("network access attempted in an offline test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    return attempts


def _run_with_hang_guard(function):
    """Runs ``function`` in a thread; returns what it raised (fails if it hangs)."""
    outcome = {}

    def target():
        try:
            function()
        except BaseException as error:  # Handed back to the test thread.
            outcome["error"] = error

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(_HANG_GUARD_SECONDS)
    assert not thread.is_alive(), "hung: it is probably retrying a download"
    return outcome.get("error")


@pytest.mark.parametrize("call", ["info", "iterator"])
def test_unprepared_dataset_fails_at_once_without_network(tmp_path, no_network, call):
    data_dir = str(tmp_path / "empty")
    if call == "info":
        error = _run_with_hang_guard(lambda: data.get_dataset_info("cifar10", data_dir=data_dir))
    else:
        error = _run_with_hang_guard(
            lambda: data.create_iterator(
                "cifar10",
                split="train",
                batch_size=8,
                data_dir=data_dir,
                process_count=1,
                process_index=0,
            )
        )
    assert isinstance(error, data.DatasetNotPreparedError), error
    message = str(error)
    assert "'cifar10'" in message
    assert data_dir in message
    assert f"python -m diffusion_jax.data prepare cifar10 --data_dir {data_dir}" in message
    assert no_network == []


def test_prepare_without_tensorflow_explains_and_stays_offline(tmp_path, no_network, monkeypatch):
    monkeypatch.setattr(sources, "tensorflow_available", lambda: False)
    error = _run_with_hang_guard(lambda: data.prepare("mnist", data_dir=str(tmp_path)))
    assert isinstance(error, RuntimeError) and "TensorFlow" in str(error), error
    assert no_network == []


def test_unknown_dataset_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="Unknown dataset 'not_a_dataset'"):
        data.get_dataset_info("not_a_dataset", data_dir=str(tmp_path))


def test_info_cli_exit_codes(digits_dir, tmp_path, capsys):
    assert cli.main(["info", "digits", "--data_dir", digits_dir]) == 0
    printed = capsys.readouterr().out
    assert "train: 1500 examples" in printed and "(8, 8, 1)" in printed

    assert cli.main(["info", "mnist", "--data_dir", str(tmp_path)]) == 1
    assert f"prepare mnist --data_dir {tmp_path}" in capsys.readouterr().err
    # info never prepares, not even the embedded dataset.
    assert cli.main(["info", "digits", "--data_dir", str(tmp_path)]) == 1
    assert not (tmp_path / "digits").exists() or not any((tmp_path / "digits").rglob("*.json"))

    assert cli.main(["info", "not_a_dataset", "--data_dir", str(tmp_path)]) == 2
    assert cli.main(["info", "moons"]) == 0


def test_cli_runs_as_a_module(digits_dir, tmp_path):
    command = [sys.executable, "-m", "diffusion_jax.data", "info"]
    missing = subprocess.run(
        [*command, "cifar10", "--data_dir", str(tmp_path)], capture_output=True, text=True
    )
    assert missing.returncode == 1
    assert f"python -m diffusion_jax.data prepare cifar10 --data_dir {tmp_path}" in missing.stderr
    prepared = subprocess.run(
        [*command, "digits", "--data_dir", digits_dir], capture_output=True, text=True
    )
    assert prepared.returncode == 0, prepared.stderr
    assert "test: 297 examples" in prepared.stdout
