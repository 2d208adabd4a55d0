"""The default training config: every field the trainer reads, each with a one-line comment.

It trains the embedded offline ``digits`` dataset (scikit-learn's 8x8 handwritten digits,
prepared locally into TFDS ArrayRecord files) with a small U-Net on the CPU. It lives in the
package, so an installed wheel can build and validate configs; the recipes in the repository's
``configs/`` start from it and override only what differs.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    """Returns the default config (the digits recipe)."""
    config = ml_collections.ConfigDict()
    config.seed = 0  # one seed for init, data order, timesteps, noise and dropout

    config.data = data = ml_collections.ConfigDict()
    data.name = "digits"  # TFDS name, "digits", "folder:/path", or a 2-D set ("swissroll", ...)
    data.data_dir = ""  # TFDS data_dir; "" means the TFDS default (~/tensorflow_datasets)
    data.batch_size = 64  # global batch, split over processes and devices
    data.image_size = 0  # resize/centre-crop to this size; 0 keeps the dataset's size
    data.random_flip = False  # random horizontal flips (not for digits: they are not symmetric)
    data.train_split = "train"  # split to train on
    data.eval_split = "test"  # split for the held-out loss
    # global batches placed on the devices ahead of the step by a background thread; 0: none
    data.prefetch = 2

    config.diffusion = diffusion = ml_collections.ConfigDict()
    diffusion.schedule = "cosine"  # linear | quadratic | sigmoid | cosine
    diffusion.num_timesteps = 1000  # T
    # linear/quadratic/sigmoid betas times 1000/T, so any T reaches noise (improved-diffusion);
    # False keeps the literal range (to reproduce a paper or a diffusers config at T != 1000)
    diffusion.scale_to_num_timesteps = True
    diffusion.zero_terminal_snr = False  # rescale to alpha_bar_T = 0 (needs v or x0 prediction)
    # explicit betas [num_timesteps] (a converted published schedule); when set they replace
    # the named schedule and its scaling/rescaling; None: the named schedule
    diffusion.betas = None
    # train even when the forward process does not reach noise (prior term L_T above
    # schedules.PRIOR_BPD_LIMIT bits/dim at unit data scale); sampling from N(0, I) is then off
    diffusion.allow_prior_mismatch = False
    diffusion.parameterization = "eps"  # what the network predicts: eps | x0 | v
    diffusion.variance = "fixed_small"  # fixed_small | fixed_large | learned_range
    diffusion.loss_type = "simple"  # simple | hybrid | vlb
    diffusion.min_snr_gamma = 0.0  # min-SNR-gamma weighting of the simple loss; 0 turns it off
    diffusion.clip_x0 = True  # clip predicted x0 to [-1, 1] when sampling (off for 2-D data)
    diffusion.p_uncond = 0.0  # label dropout to the null label (classifier-free guidance)
    diffusion.timestep_sampler = "uniform"  # uniform | loss_second_moment (for vlb training)
    # ddpm | edm: EDM's preconditioned denoiser and loss (Karras et al. 2022; config.edm), seen
    # as an x0 model on this schedule (needs parameterization x0, a fixed variance, simple loss)
    diffusion.formulation = "ddpm"

    config.edm = edm = ml_collections.ConfigDict()  # EDM training (diffusion.formulation = edm)
    edm.sigma_data = 0.5  # the data's standard deviation per dimension (c_skip, c_out, c_in)
    edm.P_mean = -1.2  # mean of ln(sigma) drawn in training
    edm.P_std = 1.2  # standard deviation of ln(sigma) drawn in training

    config.model = model = ml_collections.ConfigDict()
    model.name = "unet"  # unet | mlp
    model.ch = 32  # base channels
    model.ch_mult = (1, 2)  # channel multiplier per resolution level
    model.num_res_blocks = 1  # ResNet blocks per level
    model.attn_resolutions = (4,)  # resolutions (pixels) with self-attention
    model.dropout = 0.1  # dropout in the ResNet blocks
    model.num_groups = 8  # GroupNorm groups
    model.num_heads = 1  # attention heads
    model.conv_resample = True  # convolutions when resampling
    model.resblock_updown = False  # resample inside ResNet blocks (ADM)
    model.use_scale_shift_norm = False  # FiLM time conditioning (ADM)
    model.remat = False  # rematerialise ResNet blocks to save memory
    # Options of published networks (diffusion_jax.convert); the defaults are DDPM's
    model.norm_eps = 1e-6  # GroupNorm epsilon (improved-diffusion: 1e-5)
    model.downsample_padding = "same"  # strided convs pad same (TF) | symmetric (1 each side)
    model.flip_sin_to_cos = False  # timestep embedding [cos, sin] instead of [sin, cos]
    model.freq_shift = 1.0  # embedding frequencies exp(-log(1e4) * i / (ch / 2 - freq_shift))
    model.head_dim = None  # channels per attention head (overrides num_heads); None: num_heads
    model.timestep_scale = 1.0  # the embedding sees t * timestep_scale
    model.class_conditional = False  # condition on labels (needs a labelled dataset)

    config.optim = optim = ml_collections.ConfigDict()
    optim.optimizer = "adam"  # adam | adamw
    optim.lr = 2e-3  # peak learning rate (the best of the digits study, benchmarks/README.md)
    optim.weight_decay = 0.0  # decoupled weight decay (adamw)
    optim.b1 = 0.9  # Adam beta1
    optim.b2 = 0.999  # Adam beta2
    optim.eps = 1e-8  # Adam epsilon
    optim.warmup_steps = 200  # linear warm-up from 0 to lr
    optim.lr_schedule = "cosine"  # constant | cosine (decay to 0 at train.num_steps)
    optim.grad_clip = 1.0  # global-norm clipping; 0 turns it off
    optim.accumulate_steps = 1  # micro-batches accumulated per optimiser step
    optim.ema_decay = 0.999  # parameter EMA decay
    optim.ema_warmup = True  # decay = min(ema_decay, (1 + step) / (10 + step))

    config.train = train = ml_collections.ConfigDict()
    train.num_steps = 3000  # optimiser steps in all
    # wall-clock budget in seconds, counted from the end of the first step (compilation
    # excluded): then save a checkpoint and end as at train.num_steps; 0: no budget
    train.max_seconds = 0.0
    train.log_every = 50  # steps between metric lines
    train.checkpoint_every = 500  # steps between checkpoints
    train.sample_every = 1000  # steps between sample grids (0: only at the end)
    train.eval_every = 500  # steps between held-out losses (0: never)
    train.eval_batches = 2  # batches of the held-out loss
    train.keep_checkpoints = 3  # checkpoints kept on disk
    train.compute_dtype = "float32"  # float32 | bfloat16 (params stay float32)
    # XLA:CPU's YNNPACK library fusions in the train step: auto (on for model.ch >= 128, where
    # they are faster; benchmarks/README.md) | on | off. Speed only.
    train.cpu_library_fusions = "auto"
    train.max_nonfinite_steps = 20  # consecutive skipped non-finite updates before stopping
    train.init_from = ""  # workdir or checkpoint dir to take initial params from (fine-tuning)
    train.num_samples = 64  # images in each sample grid
    train.sample_method = "ddim"  # ddpm | ddim | dpm_solver++ | heun | euler for the grids
    train.sample_steps = 50  # sampler steps for the grids
    train.progress_bar = True  # tqdm progress bar (log lines are written either way)
    return config
