"""CIFAR-10 with the DDPM paper's recipe exactly (Ho et al. 2020).

35.7M-parameter U-Net (ch 128, ch_mult (1, 2, 2, 2), 2 ResNet blocks, attention at 16x16,
dropout 0.1), linear betas 1e-4 -> 0.02, T = 1000, eps prediction, simple loss, `fixed_large`
variance for sampling, Adam lr 2e-4 with 5000 warm-up steps, gradient clipping at 1, batch 128,
random flips, EMA 0.9999, 800k steps.

Prepare the data once (needs TensorFlow and the internet):
  pip install -e '.[tf]' && python -m diffusion_jax.data prepare cifar10 --data_dir DIR
Command:
  python train.py --config configs/cifar10.py --workdir W --config.data.data_dir=DIR

Expect: the paper reports FID 3.17 and IS 9.46 (50k samples, 1000 ancestral steps) and
<= 3.75 bits/dim on the test set after 800k steps on a TPU v3-8 (about 10.6 hours there).
"""

from diffusion_jax.train import defaults as default_lib


def get_config():
    """The DDPM CIFAR-10 recipe."""
    config = default_lib.get_config()
    config.data.name = "cifar10"
    config.data.batch_size = 128
    config.data.random_flip = True
    config.diffusion.schedule = "linear"
    config.diffusion.num_timesteps = 1000
    config.diffusion.parameterization = "eps"
    config.diffusion.variance = "fixed_large"
    config.diffusion.loss_type = "simple"
    config.model.ch = 128
    config.model.ch_mult = (1, 2, 2, 2)
    config.model.num_res_blocks = 2
    config.model.attn_resolutions = (16,)
    config.model.dropout = 0.1
    config.model.num_groups = 32
    config.optim.optimizer = "adam"
    config.optim.lr = 2e-4
    config.optim.warmup_steps = 5000
    config.optim.lr_schedule = "constant"
    config.optim.grad_clip = 1.0
    config.optim.ema_decay = 0.9999
    config.optim.ema_warmup = False
    config.train.num_steps = 800_000
    config.train.log_every = 100
    config.train.checkpoint_every = 10_000
    config.train.sample_every = 50_000
    config.train.eval_every = 10_000
    config.train.eval_batches = 8
    config.train.sample_method = "ddpm"
    config.train.sample_steps = 1000
    return config
