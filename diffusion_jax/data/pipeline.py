"""The grain input pipeline: seeded global shuffling, per-process batches, checkpointable.

The global batch stream is a function of (dataset, split, global batch size, seed, shuffle,
image_size, random_flip) only:

* epoch ``e`` visits the split in the order of a permutation seeded by ``(seed, e)``, cut into
  ``num_examples // global_batch`` global batches (the remainder of each epoch is dropped);
* global batch ``s`` (counting across epochs) is split into ``process_count`` equal, contiguous
  blocks, and process ``p`` yields block ``p``, so the processes read disjoint slices that
  together cover the epoch, and the global batch does not depend on the number of processes;
* a random flip of the example at position ``j`` of global batch ``s`` is drawn from
  ``(seed, s)``, so it too is independent of the process count.

`grain` runs it: a `grain.MapDataset` of step indices (repeated for ``num_epochs``), mapped to
batches by a function that reads each batch with one random-access call, and iterated with
background threads. The iterator's state is grain's (how many batches were yielded), tagged
with a description of the stream so that it cannot be restored into a different one.
"""

import dataclasses
import os
import threading
from typing import Any

import grain
import numpy as np
from PIL import Image

from diffusion_jax.data import sources

# Independent random streams derived from the user's seed.
_SHUFFLE_STREAM = 0
_FLIP_STREAM = 1


def resize_and_center_crop(image: np.ndarray, size: int) -> np.ndarray:
    """Resizes the shorter side to ``size`` (bicubic) and crops the centre square, in uint8.

    Args:
      image: uint8 [H, W, C], C in {1, 3}.
      size: side of the output.

    Returns:
      uint8 [size, size, C]; ``image`` itself when it already has that shape.
    """
    height, width, channels = image.shape
    if (height, width) == (size, size):
        return image
    scale = size / min(height, width)
    new_height, new_width = max(size, round(height * scale)), max(size, round(width * scale))
    pil_image = Image.fromarray(image[..., 0] if channels == 1 else image)
    # PIL's bicubic widens its kernel by the scale factor, so downscaling is anti-aliased.
    resized = np.asarray(
        pil_image.resize((new_width, new_height), resample=Image.Resampling.BICUBIC)
    )
    top, left = (new_height - size) // 2, (new_width - size) // 2
    return resized[top : top + size, left : left + size].reshape(size, size, channels)


def check_labels(labels: np.ndarray, num_classes: int, name: str) -> np.ndarray:
    """Validates labels on the host and returns them as int32.

    Args:
      labels: int [B].
      num_classes: labels must lie in ``0..num_classes-1``.
      name: dataset name, for the error message.

    Returns:
      int32 [B].

    Raises:
      ValueError: a label out of range.
    """
    labels = np.asarray(labels)
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        bad = labels[(labels < 0) | (labels >= num_classes)]
        raise ValueError(
            f"Dataset {name!r} yielded labels {np.unique(bad)[:10]} outside 0..{num_classes - 1}."
        )
    return labels.astype(np.int32)


@dataclasses.dataclass(frozen=True, eq=False)
class _BatchReader:
    """Maps a global step to this process's batch (called from grain's reader threads)."""

    info: sources.DatasetInfo
    split: str
    source: sources.RecordSource
    global_batch: int
    process_index: int
    process_count: int
    seed: int
    shuffle: bool
    image_size: int | None
    random_flip: bool
    _orders: dict = dataclasses.field(default_factory=dict)
    _lock: threading.Lock = dataclasses.field(default_factory=threading.Lock)

    @property
    def local_batch(self) -> int:
        return self.global_batch // self.process_count

    @property
    def steps_per_epoch(self) -> int:
        return len(self.source) // self.global_batch

    def epoch_order(self, epoch: int) -> np.ndarray:
        """The order in which epoch ``epoch`` visits the split: int64 [num_examples]."""
        with self._lock:
            if epoch not in self._orders:
                if self.shuffle:
                    rng = np.random.default_rng([self.seed, _SHUFFLE_STREAM, epoch])
                    order = rng.permutation(len(self.source))
                else:
                    order = np.arange(len(self.source))
                # Reader threads work on at most a few consecutive epochs at once.
                for old_epoch in sorted(self._orders)[:-2]:
                    del self._orders[old_epoch]
                self._orders[epoch] = order
            return self._orders[epoch]

    def example_indices(self, step: int) -> np.ndarray:
        """Indices into the split of this process's examples of global batch ``step``."""
        epoch, step_in_epoch = divmod(step, self.steps_per_epoch)
        start = step_in_epoch * self.global_batch + self.process_index * self.local_batch
        return self.epoch_order(epoch)[start : start + self.local_batch]

    def __call__(self, step: int, _: Any = None) -> dict[str, np.ndarray]:
        record = self.source.read(self.example_indices(step))
        batch = {}
        if self.info.kind == "vector":
            batch["x"] = np.asarray(record["x"], dtype=np.float32)
        else:
            images = record["image"]
            if self.image_size is not None:
                images = [resize_and_center_crop(image, self.image_size) for image in images]
            images = np.stack(images).astype(np.uint8, copy=False)
            if self.random_flip:
                flips = self._flips(step)
                images = np.where(flips[:, None, None, None], images[:, :, ::-1], images)
            batch["image"] = images
        if self.info.num_classes is not None:
            batch["label"] = check_labels(record["label"], self.info.num_classes, self.info.name)
        return batch

    def _flips(self, step: int) -> np.ndarray:
        # Drawn for the whole global batch, then sliced: independent of the process count.
        rng = np.random.default_rng([self.seed, _FLIP_STREAM, step])
        flips = rng.random(self.global_batch) < 0.5
        start = self.process_index * self.local_batch
        return flips[start : start + self.local_batch]

    def describe(self) -> str:
        """What identifies the global stream (stored in, and checked against, the state)."""
        return (
            f"{self.info.name}:{self.split} examples={len(self.source)} "
            f"global_batch={self.global_batch} seed={self.seed} shuffle={self.shuffle} "
            f"image_size={self.image_size} random_flip={self.random_flip}"
        )


class BatchIterator(grain.DatasetIterator):
    """Iterator over this process's batches; its position can be checkpointed.

    A `grain.DatasetIterator`, so `grain.checkpoint.CheckpointSave` / `CheckpointRestore`
    (Orbax) handle it, as does ``json.dumps(iterator.get_state())``.

    State format (a JSON-serialisable dict)::

      {"grain": {"next_index": int},   # grain's state: global batches yielded so far
       "pipeline": str}                # the stream it belongs to (dataset, batch, seed, ...)

    Every process holds the same state at the same step. Restoring it with `set_state` into an
    iterator over the same stream (with any number of processes) continues with exactly the
    batches an uninterrupted run would have yielded; restoring it into a different stream raises
    ValueError.

    One thread at a time may call it: the trainer restores its state first, then hands it to
    its read-ahead thread (``diffusion_jax.train.prefetch``), which takes ``get_state`` after
    each batch so that a checkpoint holds the position of the batches consumed, not read ahead.
    grain's own reader threads (``num_threads``) and buffer (``prefetch_batches``) sit behind it.

    Attributes:
      steps_per_epoch: global batches in one epoch (the remainder of each epoch is dropped).
    """

    def __init__(self, dataset: grain.IterDataset, pipeline: str, steps_per_epoch: int):
        super().__init__(iter(dataset))
        self._pipeline = pipeline
        self.steps_per_epoch = steps_per_epoch

    def __next__(self) -> dict[str, np.ndarray]:
        return next(self._parent)

    def get_state(self) -> dict[str, Any]:
        """Returns ``{"grain": {...}, "pipeline": str}`` (see the class docstring)."""
        return {"grain": self._parent.get_state(), "pipeline": self._pipeline}

    def set_state(self, state: dict[str, Any]) -> None:
        """Restores a state from `get_state`, checking that it belongs to this stream.

        Raises:
          ValueError: ``state`` is not of `get_state`'s form, belongs to another stream, or
            grain refuses it.
        """
        if not isinstance(state, dict) or set(state) != {"grain", "pipeline"}:
            shown = sorted(state) if isinstance(state, dict) else type(state).__name__
            raise ValueError(
                f"Not an iterator state of this pipeline: expected the keys 'grain' and "
                f"'pipeline', got {shown}."
            )
        if state.get("pipeline") != self._pipeline:
            raise ValueError(
                "This iterator state belongs to another input stream, so restoring it would "
                f"not resume the same batches:\n  state:    {state.get('pipeline')}\n"
                f"  iterator: {self._pipeline}\nCreate the iterator with the original settings."
            )
        try:
            self._parent.set_state(state["grain"])
        except Exception as error:  # grain's own error names no file or step: say what it was
            raise ValueError(
                f"grain refused the saved iterator position ({type(error).__name__}: {error})."
            ) from error

    def __str__(self) -> str:
        return f"BatchIterator({self._pipeline})"


def _process_defaults(process_index: int | None, process_count: int | None) -> tuple[int, int]:
    if process_index is None or process_count is None:
        import jax  # Here: the CLI and data tests need no JAX.

        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    return process_index, process_count


def create_iterator(
    name: str,
    *,
    split: str,
    batch_size: int,
    data_dir: str | os.PathLike | None = None,
    seed: int = 0,
    shuffle: bool = True,
    num_epochs: int | None = None,
    image_size: int | None = None,
    random_flip: bool = False,
    process_index: int | None = None,
    process_count: int | None = None,
    num_threads: int = 2,
    prefetch_batches: int = 4,
) -> BatchIterator:
    """Creates this process's iterator over a dataset's batches.

    Args:
      name: a dataset name: TFDS (``"cifar10"``), ``"digits"``, ``"folder:/path"`` or a toy set
        (``"swissroll"``, ``"moons"``, ``"8gaussians"``, ``"checkerboard"``).
      split: ``"train"``, ``"test"``, ... (TFDS slices like ``"train[:90%]"`` work too).
      batch_size: the GLOBAL batch size; each process yields ``batch_size // process_count``.
      data_dir: TFDS data directory; default ``$TFDS_DATA_DIR`` or ``~/tensorflow_datasets``.
      seed: seeds the shuffle and the flips (a non-negative int).
      shuffle: reshuffle the split every epoch; else visit it in stored order.
      num_epochs: stop after this many epochs; None repeats forever.
      image_size: resize the shorter side to this and centre-crop a square (host, uint8).
      random_flip: flip images horizontally with probability 1/2 (host, uint8).
      process_index: this process's index; default `jax.process_index()`.
      process_count: number of processes; default `jax.process_count()`.
      num_threads: grain reader threads.
      prefetch_batches: batches read ahead.

    Returns:
      A `BatchIterator` yielding numpy dicts: ``{"image": uint8 [b, H, W, C]}`` (never scaled)
      or ``{"x": float32 [b, D]}``, plus ``"label": int32 [b]`` when the dataset has labels,
      with ``b = batch_size // process_count``.

    Raises:
      DatasetNotPreparedError: at once, when the dataset is not prepared (never downloads).
      ValueError: inconsistent arguments (e.g. ``batch_size`` not divisible by
        ``process_count``, or larger than the split).

    Example:
      >>> it = create_iterator("digits", split="train", batch_size=64, seed=0)
      >>> batch = next(it)  # {"image": uint8 [64, 8, 8, 1], "label": int32 [64]}
      >>> state = it.get_state()  # JSON-serialisable; it.set_state(state) resumes here
    """
    process_index, process_count = _process_defaults(process_index, process_count)
    if process_count < 1 or not 0 <= process_index < process_count:
        raise ValueError(
            f"Need 0 <= process_index < process_count, got {process_index=}, {process_count=}."
        )
    if batch_size < 1 or batch_size % process_count:
        raise ValueError(
            f"batch_size (global) must be a positive multiple of process_count, got "
            f"{batch_size=}, {process_count=}."
        )
    if num_epochs is not None and num_epochs < 1:
        raise ValueError(f"num_epochs must be None (forever) or positive, got {num_epochs=}.")
    if seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed=}.")
    if image_size is not None and image_size < 1:
        raise ValueError(f"image_size must be None or positive, got {image_size=}.")

    info, source = sources.open_split(name, split=split, data_dir=data_dir)
    if info.kind != "image" and (image_size is not None or random_flip):
        raise ValueError(
            f"image_size and random_flip apply to images; {name!r} is {info.kind} data."
        )
    if info.kind == "image" and image_size is None and None in info.shape:
        raise ValueError(
            f"Dataset {name!r} holds images of different sizes: pass image_size to resize and "
            "centre-crop them."
        )
    reader = _BatchReader(
        info=info,
        split=split,
        source=source,
        global_batch=batch_size,
        process_index=process_index,
        process_count=process_count,
        seed=seed,
        shuffle=shuffle,
        image_size=image_size,
        random_flip=random_flip,
    )
    if reader.steps_per_epoch < 1:
        raise ValueError(
            f"batch_size={batch_size} is larger than split {split!r} of {name!r} "
            f"({len(source)} examples)."
        )
    dataset = (
        grain.MapDataset.range(reader.steps_per_epoch)
        .repeat(num_epochs)
        # map_with_index sees the global step (the index across epochs), not the range value.
        .map_with_index(reader)
        .to_iter_dataset(
            grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=prefetch_batches)
        )
    )
    return BatchIterator(dataset, reader.describe(), reader.steps_per_epoch)
