"""The embedded offline default: scikit-learn's 8x8 handwritten digits on the CPU.

Command (the README's `make demo` runs it):
  python train.py --config configs/digits.py --workdir workdirs/digits

Expect: the dataset prepared offline on first use (1,500 train / 297 test images); 3,000 steps
in about 4.5 minutes on 2 CPU cores (the whole `make demo` about 5); a training loss near 0.13
and a held-out loss near 0.11; sample grids of recognisable digits in workdirs/digits/samples/.
`python -m diffusion_jax.evaluation digits` on DDIM-50 samples: about four in five
recognisable, all 10 classes (real held-out digits: 86%). The recipe (peak learning rate 2e-3)
is the best of a 5-minute study of the levers against a diffusers peer (benchmarks/README.md,
"Quality per minute"). Its bits/dim describe a 17-level source stored as 8 bits and compare
with no published figure.
"""

from diffusion_jax.train import defaults as default_lib


def get_config():
    """The default config is the digits recipe; this file names it."""
    return default_lib.get_config()
