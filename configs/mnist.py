"""MNIST 28x28 with a small 3-level U-Net (28 is divisible by 2^2, as two downsamplings need).

Prepare the data once (needs TensorFlow and the internet):
  pip install -e '.[tf]' && python -m diffusion_jax.data prepare mnist --data_dir DIR
Command:
  python train.py --config configs/mnist.py --workdir W --config.data.data_dir=DIR

Expect: clean digits after about 20k steps (about an hour on one GPU; days on 2 CPU cores).
"""

from diffusion_jax.train import defaults as default_lib


def get_config():
    """MNIST with a 3-level U-Net."""
    config = default_lib.get_config()
    config.data.name = "mnist"
    config.data.batch_size = 128
    config.diffusion.schedule = "linear"
    config.model.ch = 64
    config.model.ch_mult = (1, 2, 2)
    config.model.num_res_blocks = 2
    config.model.attn_resolutions = (7,)
    config.model.num_groups = 32
    config.optim.lr = 2e-4
    config.optim.warmup_steps = 1000
    config.optim.lr_schedule = "constant"
    config.optim.ema_decay = 0.9995
    config.train.num_steps = 50_000
    config.train.log_every = 100
    config.train.checkpoint_every = 5000
    config.train.sample_every = 5000
    config.train.eval_every = 5000
    return config
