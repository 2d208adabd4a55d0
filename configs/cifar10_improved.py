"""CIFAR-10 with improved DDPM's choices (Nichol & Dhariwal 2021): cosine schedule, learned
variance (`learned_range`) trained with the hybrid loss, T = 4000 as in their CIFAR-10 runs.

Command:
  python train.py --config configs/cifar10_improved.py --workdir W --config.data.data_dir=DIR

Expect: better log-likelihood (bits/dim) than configs/cifar10.py at a similar FID, and good
samples with far fewer sampling steps, as the paper reports for its own models. Sample with
`sample.py --method ddpm --steps 100` (respaced ancestral sampling works well with a learned
variance).
"""

from configs import cifar10


def get_config():
    """improved DDPM on CIFAR-10, on the DDPM U-Net."""
    config = cifar10.get_config()
    config.diffusion.schedule = "cosine"
    config.diffusion.num_timesteps = 4000
    config.diffusion.variance = "learned_range"
    config.diffusion.loss_type = "hybrid"
    config.model.dropout = 0.3
    config.optim.lr = 1e-4
    config.optim.warmup_steps = 0
    config.train.num_steps = 500_000
    config.train.sample_steps = 100
    return config
