"""Image folders as TFDS datasets, built from PIL images without TensorFlow.

A folder is either flat (``root/*.png``: no labels) or holds one subfolder per class
(``root/cat/**.jpg``, ``root/dog/**.jpg``: labels are the sorted subfolder names). Every image
goes into a single ``train`` split. `tfds.folder_dataset.ImageFolder` needs TensorFlow to encode
images; this builder stores them as uint8 ``Tensor`` features instead, so it prepares (into
ArrayRecord) and reads without TensorFlow, through the same pipeline as every other dataset.

The prepared copy lives in ``DATA_DIR/diffusion_image_folder/<slug>/1.0.0``; the slug joins the
folder's name and a hash of its path and of every image's path, size and modification time, so
adding, removing or editing images makes a new copy instead of reading a stale one.
"""

import dataclasses
import hashlib
import os
import re
from collections.abc import Iterator
from typing import ClassVar

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

BUILDER_NAME = "diffusion_image_folder"
"""TFDS name of `DiffusionImageFolder` (the folder under DATA_DIR; kept out of TFDS's registry,
since the builder needs a folder listing to be built)."""

VERSION = "1.0.0"
"""Version of the prepared copies."""

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
"""File name endings (case-insensitive) read as images; every other file is ignored."""

# PIL modes that hold a single grey channel; a folder of only these is stored with C = 1.
_GRAYSCALE_MODES = frozenset({"1", "L", "LA", "P;L"})


@dataclasses.dataclass(frozen=True)
class FolderListing:
    """The images of a folder and what their prepared copy is called.

    Attributes:
      root: absolute path of the folder.
      files: image paths relative to ``root``, sorted.
      class_names: sorted class subfolder names, or ``()`` for a flat folder.
      slug: name of the prepared copy (folder name + content hash).
    """

    root: str
    files: tuple[str, ...]
    class_names: tuple[str, ...]
    slug: str

    def label(self, relative_path: str) -> int:
        """Class index of an image (its first path component) in a folder with classes."""
        return self.class_names.index(relative_path.split(os.sep, 1)[0])


def _is_image(name: str) -> bool:
    return not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS)


def list_folder(root: str) -> FolderListing:
    """Lists a folder's images and classes (cheap: reads directory entries, not pixels).

    Args:
      root: the folder.

    Returns:
      The `FolderListing`.

    Raises:
      FileNotFoundError: ``root`` is not a directory.
      ValueError: no images, or images both directly in ``root`` and in class subfolders.
    """
    root = os.path.abspath(os.path.expanduser(root))
    if not os.path.isdir(root):
        raise FileNotFoundError(f"Image folder {root!r} does not exist or is not a directory.")
    files, stats = [], []
    for directory, subdirectories, names in os.walk(root):
        subdirectories[:] = sorted(d for d in subdirectories if not d.startswith("."))
        for name in sorted(filter(_is_image, names)):
            path = os.path.join(directory, name)
            status = os.stat(path)
            files.append(os.path.relpath(path, root))
            stats.append(f"{files[-1]}\0{status.st_size}\0{status.st_mtime_ns}")
    if not files:
        raise ValueError(f"Image folder {root!r} holds no images (endings {IMAGE_EXTENSIONS}).")
    top_level = [f for f in files if os.sep not in f]
    class_names = tuple(sorted({f.split(os.sep, 1)[0] for f in files if os.sep in f}))
    if top_level and class_names:
        raise ValueError(
            f"Image folder {root!r} mixes images at its top level ({top_level[:3]}...) with "
            f"class subfolders {class_names[:5]}: put every image in a class subfolder, or "
            "none."
        )
    digest = hashlib.sha256("\n".join([root, *stats]).encode()).hexdigest()[:12]
    basename = re.sub(r"[^a-z0-9]+", "_", os.path.basename(root).lower()).strip("_") or "root"
    return FolderListing(root, tuple(files), class_names, f"{basename}_{digest}")


def scan_images(listing: FolderListing) -> tuple[int | None, int | None, int]:
    """Decodes every image once, to find the stored shape and to refuse unreadable files.

    Preparing decodes each image again; decoding here first means a truncated or non-image file
    stops the preparation before anything is written, with an error naming it.

    Args:
      listing: from `list_folder`.

    Returns:
      ``(height, width, channels)``: height and width are None unless all images share one
      size; channels is 1 if every image is grayscale, else 3 (RGB; alpha is dropped).

    Raises:
      ValueError: a file with an image ending that PIL cannot decode fully (truncated, damaged
        or not an image), named with its path.
    """
    sizes, grayscale = set(), True
    for relative_path in listing.files:
        path = os.path.join(listing.root, relative_path)
        try:
            with Image.open(path) as image:
                image.load()
                sizes.add(image.size)
                grayscale = grayscale and image.mode in _GRAYSCALE_MODES
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
            # PIL reports damage as OSError ("image file is truncated", UnidentifiedImageError)
            # or SyntaxError (a broken PNG chunk).
            reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
            raise ValueError(
                f"Image folder {listing.root!r}: cannot read {path!r} ({reason}); remove or "
                "replace the file."
            ) from None
    (width, height) = sizes.pop() if len(sizes) == 1 else (None, None)
    return height, width, 1 if grayscale else 3


def load_image(path: str, channels: int) -> np.ndarray:
    """Decodes one image file.

    Args:
      path: the image file.
      channels: 1 (grayscale) or 3 (RGB).

    Returns:
      uint8 [H, W, channels].
    """
    with Image.open(path) as image:
        pixels = np.asarray(image.convert("L" if channels == 1 else "RGB"), dtype=np.uint8)
    return pixels.reshape(pixels.shape[0], pixels.shape[1], channels)


class DiffusionImageFolder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """TFDS builder for one image folder (a `FolderListing`), one ``train`` split.

    Not registered with TFDS by name: each instance describes one folder (its config name is
    the folder's slug).

    Build it through `diffusion_jax.data.prepare` (``folder:PATH``) rather than directly;
    reading a prepared copy needs no builder instance (`tfds.builder_from_directory`).

    Args:
      listing: the folder, from `list_folder`.
      image_shape: ``(H, W, C)`` from `scan_images`; H and W may be None (varying sizes).
      data_dir: root TFDS data directory.
      **kwargs: passed on to `tfds.core.GeneratorBasedBuilder` (e.g. ``file_format``).
    """

    VERSION = tfds.core.Version(VERSION)
    RELEASE_NOTES: ClassVar[dict[str, str]] = {"1.0.0": "Images as uint8 Tensor features."}

    def __init__(
        self,
        *,
        listing: FolderListing,
        image_shape: tuple[int | None, int | None, int],
        data_dir: str,
        **kwargs,
    ):
        # Set before super().__init__, which calls _info().
        self._listing = listing
        self._image_shape = tuple(image_shape)
        config = tfds.core.BuilderConfig(name=listing.slug, description=listing.root)
        super().__init__(config=config, data_dir=data_dir, **kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        features = {
            # Raw bytes: the default encoding widens every uint8 to an int64, and a Tensor with
            # two unknown dimensions (images of varying sizes) can only be stored as bytes.
            "image": tfds.features.Tensor(shape=self._image_shape, dtype=np.uint8, encoding="bytes")
        }
        if self._listing.class_names:
            features["label"] = tfds.features.ClassLabel(names=list(self._listing.class_names))
        return tfds.core.DatasetInfo(
            builder=self,
            description=f"Images of the folder {self._listing.root}.",
            features=tfds.features.FeaturesDict(features),
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # The images are local.
        return {"train": self._generate_examples()}

    def _generate_examples(self) -> Iterator[tuple[str, dict]]:
        channels = self._image_shape[2]
        for relative_path in self._listing.files:
            example = {
                "image": load_image(os.path.join(self._listing.root, relative_path), channels)
            }
            if self._listing.class_names:
                example["label"] = self._listing.label(relative_path)
            yield relative_path, example
