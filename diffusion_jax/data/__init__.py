"""Datasets -> batches: TFDS by name, the embedded ``digits``, image folders, 2-D toy sets.

Everything reads without TensorFlow: TFDS datasets prepared as ArrayRecord through
`tfds.data_source`, batched by a `grain` pipeline (`create_iterator`) with seeded global
shuffling, per-process sharding and a checkpointable position. Batches are numpy dicts:
``{"image": uint8 [b, H, W, C]}`` (scaled to [-1, 1] on the device, not here) or
``{"x": float32 [b, D]}``, plus ``"label": int32 [b]`` when the dataset has labels.

Prepare and inspect datasets from the shell::

  python -m diffusion_jax.data prepare NAME --data_dir DIR
  python -m diffusion_jax.data info NAME --data_dir DIR

Example:
  >>> from diffusion_jax import data
  >>> info = data.get_dataset_info("digits")  # prepares it on first use, offline
  >>> it = data.create_iterator("digits", split="train", batch_size=128, seed=0)
  >>> batch = next(it)
"""

from diffusion_jax.data.pipeline import (
    BatchIterator,
    check_labels,
    create_iterator,
    resize_and_center_crop,
)
from diffusion_jax.data.sources import (
    FOLDER_PREFIX,
    LOCAL_DATASETS,
    DatasetInfo,
    DatasetNotPreparedError,
    get_dataset_info,
    open_split,
    prepare,
    prepare_command,
    resolve_data_dir,
)
from diffusion_jax.data.toy import TOY_DATASETS, sample_toy

__all__ = [
    "FOLDER_PREFIX",
    "LOCAL_DATASETS",
    "TOY_DATASETS",
    "BatchIterator",
    "DatasetInfo",
    "DatasetNotPreparedError",
    "check_labels",
    "create_iterator",
    "get_dataset_info",
    "open_split",
    "prepare",
    "prepare_command",
    "resize_and_center_crop",
    "resolve_data_dir",
    "sample_toy",
]
