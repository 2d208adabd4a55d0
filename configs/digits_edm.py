"""The digits recipe trained EDM's way (Karras et al. 2022): preconditioning, log-normal sigmas
and EDM's loss weight around the same U-Net; everything else is configs/digits.py.

Command:
  python train.py --config configs/digits_edm.py --workdir workdirs/digits_edm
  python sample.py --workdir workdirs/digits_edm --num 100 --method heun --steps 18 \\
      --out workdirs/digits_edm/generated
  python -m diffusion_jax.evaluation digits --samples workdirs/digits_edm/generated/samples.npz

The network is trained on EDM's continuous sigma; the samplers see it as an x0-predicting model
on the linear schedule below (sigma_t from 0.01 to 157, EDM's range of 0.002 to 80 rounded to
the schedule's timesteps), so every method of ``sample.py`` applies. sigma_data is the measured
standard deviation of the train digits' pixels in [-1, 1] (0.752). Expect: 3,000 steps in about
the time of configs/digits.py (the same network and batch); the comparison with the DDPM recipe
at 10, 20 and 35 model evaluations is in benchmarks/README.md ("EDM training vs DDPM").
"""

from configs import digits


def get_config():
    """configs/digits.py with ``diffusion.formulation = "edm"``."""
    config = digits.get_config()
    config.diffusion.formulation = "edm"
    config.diffusion.parameterization = "x0"  # what the preconditioned denoiser outputs
    config.diffusion.schedule = "linear"  # sigma_t in [0.01, 157]: EDM's training range
    config.edm.sigma_data = 0.75
    return config
