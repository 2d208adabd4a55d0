"""Tests of image folders as datasets: built from PIL images, read through the same pipeline."""

import os

import numpy as np
import pytest
from PIL import Image

from diffusion_jax import data
from diffusion_jax.data import image_folder

# Each class's images are filled with that class's grey level, so a batch shows its labels.
_CLASS_LEVELS = {"apples": 40, "pears": 160}


def _write_png(path, pixels):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(pixels).save(path)


@pytest.fixture
def class_folder(tmp_path):
    """root/apples/*.png (3 images, one nested deeper) and root/pears/*.png (4 images)."""
    root = tmp_path / "fruit"
    for name, count in (("apples", 3), ("pears", 4)):
        for i in range(count):
            pixels = np.full((6, 5, 3), _CLASS_LEVELS[name], np.uint8)
            pixels[0, 0] = i  # Distinct images.
            nested = "deeper/" if (name, i) == ("apples", 2) else ""
            _write_png(str(root / name / f"{nested}{i}.png"), pixels)
    (root / "pears" / "notes.txt").write_text("not an image")
    return str(root)


def test_class_folder_end_to_end(class_folder, tmp_path):
    data_dir = str(tmp_path / "tfds")
    info = data.get_dataset_info(f"folder:{class_folder}", data_dir=data_dir)
    assert info.name == f"folder:{class_folder}"
    assert (info.kind, info.shape, info.num_classes) == ("image", (6, 5, 3), 2)
    assert dict(info.splits) == {"train": 7}

    batches = list(
        data.create_iterator(
            f"folder:{class_folder}",
            split="train",
            batch_size=7,
            data_dir=data_dir,
            num_epochs=1,
            process_index=0,
            process_count=1,
        )
    )
    assert len(batches) == 1
    images, labels = batches[0]["image"], batches[0]["label"]
    assert images.shape == (7, 6, 5, 3) and images.dtype == np.uint8
    assert sorted(labels.tolist()) == [0, 0, 0, 1, 1, 1, 1]  # apples = 0, pears = 1 (sorted).
    levels = np.array(list(_CLASS_LEVELS.values()))
    np.testing.assert_array_equal(images[:, 3, 3, 0], levels[labels])


def test_flat_grayscale_folder_of_mixed_sizes(tmp_path):
    root = tmp_path / "flat"
    rng = np.random.default_rng(0)
    for i, shape in enumerate([(8, 8), (10, 12), (12, 10), (9, 9)]):
        _write_png(str(root / f"{i}.png"), rng.integers(0, 256, shape, dtype=np.uint8))
    name, data_dir = f"folder:{root}", str(tmp_path / "tfds")
    info = data.get_dataset_info(name, data_dir=data_dir)
    assert (info.shape, info.num_classes) == ((None, None, 1), None)
    with pytest.raises(ValueError, match="image_size"):
        data.create_iterator(name, split="train", batch_size=2, data_dir=data_dir, process_count=1)
    batch = next(
        data.create_iterator(
            name,
            split="train",
            batch_size=4,
            data_dir=data_dir,
            image_size=8,
            random_flip=True,
            process_index=0,
            process_count=1,
        )
    )
    assert set(batch) == {"image"}
    assert batch["image"].shape == (4, 8, 8, 1) and batch["image"].dtype == np.uint8


def test_changed_folder_is_prepared_again(class_folder, tmp_path):
    data_dir = str(tmp_path / "tfds")
    before = image_folder.list_folder(class_folder).slug
    data.get_dataset_info(f"folder:{class_folder}", data_dir=data_dir)
    _write_png(os.path.join(class_folder, "pears", "new.png"), np.zeros((6, 5, 3), np.uint8))
    assert image_folder.list_folder(class_folder).slug != before
    info = data.get_dataset_info(f"folder:{class_folder}", data_dir=data_dir)
    assert dict(info.splits) == {"train": 8}


def test_folder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        image_folder.list_folder(str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no images"):
        image_folder.list_folder(str(tmp_path / "empty"))
    _write_png(str(tmp_path / "mixed" / "top.png"), np.zeros((2, 2), np.uint8))
    _write_png(str(tmp_path / "mixed" / "cls" / "a.png"), np.zeros((2, 2), np.uint8))
    with pytest.raises(ValueError, match="mixes"):
        image_folder.list_folder(str(tmp_path / "mixed"))
