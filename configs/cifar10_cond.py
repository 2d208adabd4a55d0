"""Class-conditional CIFAR-10 with label dropout for classifier-free guidance (Ho & Salimans
2022): labels are replaced by the null label with probability 0.1 during training, so one
network serves the conditional and the unconditional pass.

Command:
  python train.py --config configs/cifar10_cond.py --workdir W --config.data.data_dir=DIR
  python sample.py --workdir W --method ddim --steps 50 --guidance 3 --labels 0,1,2,3,4,5,6,7,8,9

Expect: with guidance w in [1.5, 4], sharper and more class-typical images than w = 1 (plain
conditional), at the cost of diversity (FID rises for large w).
"""

from configs import cifar10


def get_config():
    """Conditional CIFAR-10 with p_uncond = 0.1."""
    config = cifar10.get_config()
    config.model.class_conditional = True
    config.diffusion.p_uncond = 0.1
    config.diffusion.variance = "fixed_small"
    config.train.sample_method = "ddim"
    config.train.sample_steps = 50
    return config
