"""The default configuration (the digits recipe), declared in the package.

Every field, with its comment, is in ``diffusion_jax/train/defaults.py``; the other configs here
start from it and override only what differs.

Command:
  python train.py --config configs/default.py --workdir workdirs/digits
"""

from diffusion_jax.train.defaults import get_config

__all__ = ["get_config"]
