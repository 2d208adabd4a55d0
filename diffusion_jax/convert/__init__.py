"""Published weights in and out: converters to and from this library's workdirs.

- :mod:`.from_diffusers`: a diffusers ``UNet2DModel`` + ``DDPMScheduler`` (the DDPM releases
  ``google/ddpm-*``) -> a workdir (its config from :mod:`.diffusers_config`, its weights from
  :mod:`.diffusers_weights`);
- :mod:`.from_improved_diffusion`: an improved-diffusion checkpoint and its flags -> a workdir
  (the flags from :mod:`.improved_diffusion_flags`, the weights from
  :mod:`.improved_diffusion_weights`);
- :mod:`.to_diffusers`: a trained run -> a diffusers folder (its configs from
  :mod:`.diffusers_export_config`);
- :mod:`.workdir`: the workdir a converter writes, like a trained run's.

Command line: ``python -m diffusion_jax.convert {diffusers,improved-diffusion,to-diffusers}``.
"""
