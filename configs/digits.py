"""The embedded offline default: scikit-learn's 8x8 handwritten digits on the CPU.

Command (the README's `make demo` runs it):
  python train.py --config configs/digits.py --workdir workdirs/digits

Expect: the dataset prepared offline on first use (1,500 train / 297 test images); on 2 CPU
cores about 8 minutes of training; a loss near 0.03 and a sample grid of recognisable digits of
every class in workdirs/digits/samples/. Its bits/dim describe a 17-level source stored as 8 bits
and compare with no published figure.
"""

from configs import default as default_lib


def get_config():
    """The default config is the digits recipe; this file names it."""
    return default_lib.get_config()
