"""Published weights in and out: converters to and from this library's workdirs.

- :mod:`.from_diffusers`: a diffusers ``UNet2DModel`` + ``DDPMScheduler`` (the DDPM releases
  ``google/ddpm-*``) -> a workdir;
- :mod:`.from_improved_diffusion`: an improved-diffusion checkpoint and its flags -> a workdir;
- :mod:`.to_diffusers`: a trained run -> a diffusers folder;
- :mod:`.workdir`: the workdir a converter writes, like a trained run's.

Command line: ``python -m diffusion_jax.convert {diffusers,improved-diffusion,to-diffusers}``.
"""
