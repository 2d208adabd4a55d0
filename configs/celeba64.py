"""CelebA faces, centre-cropped and resized to 64x64, with the DDPM 64x64 architecture
(ch 128, ch_mult (1, 1, 2, 2, 4), attention at 16x16; as for CelebA-HQ/LSUN in Ho et al.).

Prepare the data once (needs TensorFlow, the internet and the manual-download steps of TFDS's
`celeb_a`):
  pip install -e '.[tf]' && python -m diffusion_jax.data prepare celeb_a --data_dir DIR
Command:
  python train.py --config configs/celeba64.py --workdir W --config.data.data_dir=DIR

Expect: recognisable faces after about 100k steps on an accelerator; this is a multi-day run.
"""

from diffusion_jax.train import defaults as default_lib


def get_config():
    """CelebA 64x64."""
    config = default_lib.get_config()
    config.data.name = "celeb_a"
    config.data.image_size = 64
    config.data.random_flip = True
    config.data.batch_size = 64
    config.data.eval_split = "validation"
    config.diffusion.schedule = "linear"
    config.model.ch = 128
    config.model.ch_mult = (1, 1, 2, 2, 4)
    config.model.num_res_blocks = 2
    config.model.attn_resolutions = (16,)
    config.model.dropout = 0.0
    config.model.num_groups = 32
    config.optim.lr = 2e-5
    config.optim.warmup_steps = 5000
    config.optim.lr_schedule = "constant"
    config.optim.ema_decay = 0.9999
    config.optim.ema_warmup = False
    config.train.num_steps = 500_000
    config.train.log_every = 100
    config.train.checkpoint_every = 10_000
    config.train.sample_every = 20_000
    config.train.eval_every = 10_000
    return config
