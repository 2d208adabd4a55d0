"""`digits`: scikit-learn's handwritten digits as a TFDS dataset, the offline default.

The 1,797 8x8 grayscale images (values 0..16, 10 classes) ship inside scikit-learn, so this
dataset is prepared with no download and, because its features are uint8 ``Tensor`` features,
with no TensorFlow: ``python -m diffusion_jax.data prepare digits --data_dir DIR`` (or the first
`diffusion_jax.data.get_dataset_info` / `create_iterator` call) writes ArrayRecord files that
are then read through `tfds.data_source` like any other TFDS dataset.

Pixels are stored as ``round(v * 255 / 16)``: a 17-level source spread over 8 bits. Bits/dim on
this set therefore describe that upscaled source and compare with no published figure.
"""

from typing import ClassVar

import numpy as np
import tensorflow_datasets as tfds

NAME = "digits"
"""Registered TFDS name of the builder."""

NUM_TRAIN = 1500
"""Number of images in the ``train`` split (the other 297 form ``test``)."""

# Fixed so that the split is the same on every machine; changing it changes the dataset.
_SPLIT_SEED = 1797


def load_digits_uint8() -> tuple[np.ndarray, np.ndarray]:
    """Loads scikit-learn's digits as 8-bit images.

    Returns:
      ``(images, labels)``: images uint8 [1797, 8, 8, 1] with values ``round(v * 255 / 16)``
      (so 0..16 maps onto 0..255), labels int64 [1797] in 0..9, in scikit-learn's order.
    """
    # Imported here: scikit-learn is only needed to prepare the dataset, not to read it.
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = np.round(bunch.images * (255.0 / 16.0)).astype(np.uint8)
    return images[..., None], bunch.target.astype(np.int64)


def split_indices() -> dict[str, np.ndarray]:
    """Returns the fixed split: scikit-learn indices of each split's images.

    Returns:
      ``{"train": int64 [1500], "test": int64 [297]}``, disjoint and together covering
      ``range(1797)``; chosen by a fixed seed, so identical on every machine.
    """
    permutation = np.random.default_rng(_SPLIT_SEED).permutation(1797)
    return {"train": np.sort(permutation[:NUM_TRAIN]), "test": np.sort(permutation[NUM_TRAIN:])}


class Digits(tfds.core.GeneratorBasedBuilder):
    """TFDS builder for scikit-learn's 8x8 handwritten digits (registered as ``digits``).

    Example:
      >>> builder = Digits(data_dir="/tmp/tfds", file_format="array_record")
      >>> builder.download_and_prepare(file_format="array_record")  # no TF, no network
      >>> tfds.data_source("digits", split="train", data_dir="/tmp/tfds", download=False)[0]
      {'image': array(..., dtype=uint8), 'label': 3}
    """

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES: ClassVar[dict[str, str]] = {
        "1.0.0": "Initial release: 1500/297 train/test split by a fixed seed."
    }

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description=(
                "scikit-learn's copy of the UCI optical recognition of handwritten digits test "
                "set: 1,797 8x8 grayscale images with values 0..16, stored as uint8 "
                "round(v * 255 / 16). Bits/dim describe this 17-level source upscaled to 8 bits "
                "and compare with no published figure."
            ),
            features=tfds.features.FeaturesDict(
                {
                    # Raw bytes: the default encoding would widen each pixel to an int64.
                    "image": tfds.features.Tensor(
                        shape=(8, 8, 1), dtype=np.uint8, encoding="bytes"
                    ),
                    "label": tfds.features.ClassLabel(num_classes=10),
                }
            ),
            supervised_keys=("image", "label"),
            homepage="https://scikit-learn.org/stable/datasets/toy_dataset.html#digits-dataset",
            citation=(
                "@misc{alpaydin1998optical, author={Alpaydin, E. and Kaynak, C.}, "
                "title={Optical Recognition of Handwritten Digits}, "
                "howpublished={UCI Machine Learning Repository}, year={1998}}"
            ),
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # Nothing to download: the data ship inside scikit-learn.
        return {
            split: self._generate_examples(indices) for split, indices in split_indices().items()
        }

    def _generate_examples(self, indices):
        images, labels = load_digits_uint8()
        for index in indices:
            yield int(index), {"image": images[index], "label": int(labels[index])}
