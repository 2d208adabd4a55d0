"""The real training loop on the embedded digits with a ~40k-parameter U-Net (a file of its own:
the U-Net's compiles dominate, and pytest-xdist balances by file)."""

import os

import numpy as np
import trainer_helpers as h

from diffusion_jax import train


def test_digits_unet_end_to_end(tmp_path):
    workdir = tmp_path / "digits"
    state = train.train_and_evaluate(h.digits(), str(workdir))
    assert int(state.step) == 6
    losses = h.losses_by_step(workdir)
    assert sorted(losses) == [2, 4, 6] and all(np.isfinite(v) for v in losses.values())
    from PIL import Image

    with Image.open(workdir / "samples" / "step_0000006.png") as grid:
        assert grid.size[0] >= 64 * 3  # 8 tiles of 8x8, upscaled to >= 64 px each
    assert sorted(os.listdir(workdir / "checkpoints")) == ["3", "6"]
