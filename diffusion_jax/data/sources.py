"""Dataset names -> `DatasetInfo` and random-access record sources, without TensorFlow.

Names:
  * a TFDS name (``mnist``, ``cifar10``, ``celeb_a``, ``imagenet_resized/32x32``, ...): read
    from ``data_dir`` through `tfds.data_source` (ArrayRecord). Never downloaded here: if it is
    not prepared, `DatasetNotPreparedError` says how to prepare it.
  * ``digits``: the embedded TFDS dataset of `diffusion_jax.data.digits`; prepared locally
    (no network, no TensorFlow) on first use.
  * ``folder:PATH``: an image folder (`diffusion_jax.data.image_folder`); prepared locally on
    first use.
  * ``swissroll``, ``moons``, ``8gaussians``, ``checkerboard``: generated 2-D sets
    (`diffusion_jax.data.toy`); nothing to prepare.

``data_dir`` defaults to TFDS's: ``$TFDS_DATA_DIR``, else ``~/tensorflow_datasets``.
"""

import dataclasses
import importlib.util
import os
from collections.abc import Mapping
from typing import Any, Protocol

import numpy as np
import tensorflow_datasets as tfds
from tensorflow_datasets.core import file_adapters

from diffusion_jax.data import digits, image_folder, toy

FOLDER_PREFIX = "folder:"
"""Prefix of image-folder dataset names: ``folder:/path/to/images``."""

LOCAL_DATASETS = (digits.NAME,)
"""TFDS datasets shipped in the package: prepared on first use, offline and without TF."""


class DatasetNotPreparedError(FileNotFoundError):
    """A dataset is not prepared in ``data_dir``; the message gives the command to prepare it."""


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    """What a dataset holds, as the pipeline yields it.

    Attributes:
      name: the dataset name (``"cifar10"``, ``"digits"``, ...; image folders as
        ``"folder:ABSOLUTE_PATH"``).
      kind: ``"image"`` (batches ``{"image": uint8 [B, H, W, C]}``) or ``"vector"`` (batches
        ``{"x": float32 [B, D]}``; these are not in [-1, 1], so sample with x0 clipping off).
      shape: one example's stored shape, ``(H, W, C)`` or ``(D,)``; H and W are None for image
        folders of mixed sizes (then pass ``image_size``). See `element_shape`.
      num_classes: number of classes when batches carry ``"label"`` (int32 in
        ``0..num_classes-1``), else None.
      splits: split name -> number of examples.
      data_dir: the TFDS data directory the dataset is read from (None for toy sets).
      notes: caveats to print next to results (e.g. digits' bits/dim are not comparable).
    """

    name: str
    kind: str
    shape: tuple[int | None, ...]
    num_classes: int | None
    splits: Mapping[str, int]
    data_dir: str | None = None
    notes: str = ""

    def element_shape(self, image_size: int | None = None) -> tuple[int, ...]:
        """Shape of one example as `create_iterator` yields it with this ``image_size``.

        Raises:
          ValueError: images of mixed sizes and no ``image_size``.
        """
        if self.kind != "image" or image_size is None:
            if None in self.shape:
                raise ValueError(
                    f"Dataset {self.name!r} holds images of different sizes {self.shape}: "
                    "pass image_size to resize and centre-crop them."
                )
            return tuple(self.shape)
        return (image_size, image_size, self.shape[-1])


class RecordSource(Protocol):
    """Random access to one split: what the pipeline reads batches from."""

    def __len__(self) -> int:
        """Number of examples in the split."""

    def read(self, indices: np.ndarray) -> dict[str, Any]:
        """Reads examples ``indices`` (int [B]).

        Returns a dict with ``"image"`` (uint8 [B, H, W, C] array, or a list of B uint8
        [H, W, C] arrays when sizes vary) or ``"x"`` (float32 [B, D]), and ``"label"`` (int
        [B]) when the dataset has labels.
        """


@dataclasses.dataclass(frozen=True)
class ArraySource:
    """A `RecordSource` over in-memory arrays (the toy sets)."""

    arrays: Mapping[str, np.ndarray]

    def __len__(self) -> int:
        return len(next(iter(self.arrays.values())))

    def read(self, indices: np.ndarray) -> dict[str, Any]:
        """Gathers rows ``indices`` of every array (see `RecordSource.read`)."""
        return {key: array[indices] for key, array in self.arrays.items()}


@dataclasses.dataclass(frozen=True)
class TfdsSource:
    """A `RecordSource` over a TFDS ArrayRecord data source (`tfds.data_source`)."""

    data_source: Any
    has_label: bool

    def __len__(self) -> int:
        return len(self.data_source)

    def read(self, indices: np.ndarray) -> dict[str, Any]:
        """Reads and decodes examples ``indices`` (see `RecordSource.read`)."""
        # __getitems__ reads the whole batch in one ArrayRecord call.
        examples = self.data_source.__getitems__([int(i) for i in indices])
        batch = {"image": [np.asarray(example["image"]) for example in examples]}
        if self.has_label:
            batch["label"] = np.asarray([example["label"] for example in examples])
        return batch


def resolve_data_dir(data_dir: str | os.PathLike | None) -> str:
    """Returns the TFDS data directory: ``data_dir`` or TFDS's default ($TFDS_DATA_DIR)."""
    if data_dir is None:
        data_dir = os.environ.get(
            "TFDS_DATA_DIR", os.path.join(os.path.expanduser("~"), "tensorflow_datasets")
        )
    return os.path.abspath(os.path.expanduser(os.fspath(data_dir)))


def prepare_command(name: str, data_dir: str | os.PathLike | None) -> str:
    """The shell command that prepares ``name`` into ``data_dir``."""
    return f"python -m diffusion_jax.data prepare {name} --data_dir {resolve_data_dir(data_dir)}"


def _unknown_dataset(name: str) -> ValueError:
    return ValueError(
        f"Unknown dataset {name!r}: not a TFDS dataset name (e.g. 'mnist', 'cifar10', "
        f"'celeb_a'), the embedded {LOCAL_DATASETS}, a toy set {toy.TOY_DATASETS}, or "
        f"'{FOLDER_PREFIX}/path/to/images'."
    )


def _tfds_builder(name: str, data_dir: str) -> tfds.core.DatasetBuilder:
    # tfds.builder only reads code and local files: it never downloads (GCS is disabled).
    try:
        return tfds.builder(name, data_dir=data_dir)
    except tfds.core.DatasetNotFoundError:
        raise _unknown_dataset(name) from None


def _not_prepared(
    name: str, data_dir: str, where: str, reason: str = ""
) -> DatasetNotPreparedError:
    message = (
        f"Dataset {name!r} is not prepared in data_dir {data_dir!r} (looked for {where})"
        f"{reason}. Prepare it once with:\n  {prepare_command(name, data_dir)}"
    )
    if not (name in LOCAL_DATASETS or name.startswith(FOLDER_PREFIX)):
        message += (
            "\n(preparing a dataset that must be downloaded needs TensorFlow, installed by "
            "`pip install 'diffusion_jax[tf]'`, and the internet)"
        )
    return DatasetNotPreparedError(message)


def _check_readable(name: str, builder: tfds.core.DatasetBuilder, data_dir: str) -> None:
    """Raises `DatasetNotPreparedError` unless ``builder``'s data are prepared as ArrayRecord."""
    if not builder.is_prepared():
        raise _not_prepared(name, data_dir, builder.data_path)
    formats = [builder.info.file_format, *builder.info.alternative_file_formats]
    if not set(formats) & file_adapters.FileFormat.with_random_access():
        raise _not_prepared(
            name,
            data_dir,
            builder.data_path,
            f": it is stored as {[str(f.value) for f in formats if f]}, which has no random "
            "access; delete that folder (or use another data_dir) and prepare it as ArrayRecord",
        )


def _info_from_builder(name: str, builder: tfds.core.DatasetBuilder, data_dir: str) -> DatasetInfo:
    features = builder.info.features
    image = features["image"] if "image" in features else None
    if image is None or image.np_dtype != np.uint8 or len(image.shape) != 3:
        raise ValueError(
            f"Dataset {name!r} has no uint8 [H, W, C] 'image' feature (its features: {features}); "
            "the pipeline reads image datasets only."
        )
    label = features["label"] if "label" in features else None
    num_classes = label.num_classes if isinstance(label, tfds.features.ClassLabel) else None
    notes = ""
    if name == digits.NAME:
        notes = (
            "digits is a 17-level source (values 0..16) upscaled to 8 bits: its bits/dim "
            "compare with no published figure."
        )
    return DatasetInfo(
        name=name,
        kind="image",
        shape=tuple(image.shape),
        num_classes=num_classes,
        splits={str(split): info.num_examples for split, info in builder.info.splits.items()},
        data_dir=data_dir,
        notes=notes,
    )


def _toy_info(name: str) -> DatasetInfo:
    return DatasetInfo(
        name=name,
        kind="vector",
        shape=(2,),
        num_classes=toy.TOY_NUM_CLASSES[name],
        splits=dict(toy.TOY_SPLIT_SIZES),
        notes="2-D toy points, not in [-1, 1]: sample with x0 clipping off.",
    )


def _folder_builder(name: str, data_dir: str, prepare: bool) -> tfds.core.DatasetBuilder:
    """A reader for a prepared image folder, preparing it first if asked."""
    listing = image_folder.list_folder(name[len(FOLDER_PREFIX) :])
    variant_dir = os.path.join(
        data_dir, image_folder.BUILDER_NAME, listing.slug, image_folder.VERSION
    )
    if not os.path.exists(os.path.join(variant_dir, "dataset_info.json")):
        if not prepare:
            raise _not_prepared(name, data_dir, variant_dir)
        builder = image_folder.DiffusionImageFolder(
            listing=listing,
            image_shape=image_folder.scan_images(listing),
            data_dir=data_dir,
            file_format="array_record",
        )
        _download_and_prepare(builder)
    # A prepared copy describes itself: no need to rescan the images to read it.
    return tfds.builder_from_directory(variant_dir)


def _download_and_prepare(builder: tfds.core.DatasetBuilder) -> None:
    try:
        builder.download_and_prepare(file_format="array_record")
    except Exception:
        # Another process (same data_dir on a multi-host run) may have won the race to write it.
        if not builder.is_prepared():
            raise


def _open_builder(
    name: str, data_dir: str, prepare_local: bool
) -> tuple[tfds.core.DatasetBuilder | None, DatasetInfo]:
    if name in toy.TOY_DATASETS:
        return None, _toy_info(name)
    if name.startswith(FOLDER_PREFIX):
        # Canonical (absolute) name: it is what iterator states and messages record.
        name = FOLDER_PREFIX + os.path.abspath(os.path.expanduser(name[len(FOLDER_PREFIX) :]))
        builder = _folder_builder(name, data_dir, prepare=prepare_local)
    else:
        builder = _tfds_builder(name, data_dir)
        if name in LOCAL_DATASETS and prepare_local and not builder.is_prepared():
            _download_and_prepare(builder)
    _check_readable(name, builder, data_dir)
    return builder, _info_from_builder(name, builder, data_dir)


def get_dataset_info(
    name: str, *, data_dir: str | os.PathLike | None = None, prepare_local: bool = True
) -> DatasetInfo:
    """Describes a dataset, preparing ``digits`` or an image folder on first use.

    Args:
      name: a dataset name (see the module docstring).
      data_dir: TFDS data directory; default ``$TFDS_DATA_DIR`` or ``~/tensorflow_datasets``.
      prepare_local: prepare ``digits`` / ``folder:PATH`` if they are not yet (offline, no TF).

    Returns:
      The `DatasetInfo`.

    Raises:
      DatasetNotPreparedError: at once, naming the dataset, the data_dir searched and the
        prepare command; nothing is ever downloaded.
      ValueError: unknown name, or a dataset without a uint8 image feature.

    Example:
      >>> get_dataset_info("digits", data_dir="/tmp/tfds")
      DatasetInfo(name='digits', kind='image', shape=(8, 8, 1), num_classes=10,
                  splits={'train': 1500, 'test': 297}, ...)
    """
    return _open_builder(name, resolve_data_dir(data_dir), prepare_local)[1]


def open_split(
    name: str, *, split: str, data_dir: str | os.PathLike | None = None
) -> tuple[DatasetInfo, RecordSource]:
    """Opens one split of a dataset for random access (preparing local datasets if needed).

    Args:
      name: a dataset name (see the module docstring).
      split: a split name, e.g. ``"train"``; for TFDS datasets also a slice like
        ``"train[:90%]"``.
      data_dir: TFDS data directory; default ``$TFDS_DATA_DIR`` or ``~/tensorflow_datasets``.

    Returns:
      ``(info, source)``.

    Raises:
      DatasetNotPreparedError, ValueError: as `get_dataset_info`; ValueError for a split the
        dataset does not have.
    """
    data_dir = resolve_data_dir(data_dir)
    builder, info = _open_builder(name, data_dir, prepare_local=True)
    split_name = split.split("[", 1)[0]
    if split_name not in info.splits:
        raise ValueError(f"Dataset {name!r} has no split {split!r}; its splits are {info.splits}.")
    if builder is None:
        points, labels = toy.toy_split(name, split)
        arrays = {"x": points} if labels is None else {"x": points, "label": labels}
        return info, ArraySource(arrays)
    if name.startswith(FOLDER_PREFIX):
        data_source = builder.as_data_source(split=split)
    else:
        data_source = tfds.data_source(name, split=split, data_dir=data_dir, download=False)
    return info, TfdsSource(data_source, has_label=info.num_classes is not None)


def tensorflow_available() -> bool:
    """Whether TensorFlow can be imported (checked without importing it)."""
    return importlib.util.find_spec("tensorflow") is not None


def prepare(name: str, *, data_dir: str | os.PathLike | None = None) -> DatasetInfo:
    """Prepares a dataset into ``data_dir`` as ArrayRecord (what the ``prepare`` CLI runs).

    ``digits`` and image folders are built locally, offline and without TensorFlow. Other TFDS
    datasets are downloaded and built by TFDS, which needs TensorFlow and the internet. Toy sets
    need nothing. A dataset already prepared is left as it is.

    Args:
      name: a dataset name (see the module docstring).
      data_dir: TFDS data directory; default ``$TFDS_DATA_DIR`` or ``~/tensorflow_datasets``.

    Returns:
      The prepared dataset's `DatasetInfo`.

    Raises:
      RuntimeError: a dataset that must be downloaded, and TensorFlow is not installed.
    """
    data_dir = resolve_data_dir(data_dir)
    if name in toy.TOY_DATASETS or name in LOCAL_DATASETS or name.startswith(FOLDER_PREFIX):
        return get_dataset_info(name, data_dir=data_dir, prepare_local=True)
    builder = _tfds_builder(name, data_dir)
    if not builder.is_prepared():
        if not tensorflow_available():
            raise RuntimeError(
                f"Preparing {name!r} downloads it and builds it with TFDS, which needs "
                "TensorFlow: install it with `pip install 'diffusion_jax[tf]'` (training then "
                "reads the prepared ArrayRecord files without TensorFlow), or prepare it on "
                f"another machine and copy {builder.data_path} here."
            )
        builder.download_and_prepare(file_format="array_record")
    _check_readable(name, builder, data_dir)
    return _info_from_builder(name, builder, data_dir)
