"""The recipes of ``benchmarks/quality_per_minute.py``: one lever of issue 16 per recipe.

Each recipe is ``name -> (what it changes, dotted overrides of configs/digits.py, samplers
[(method, steps)])``; :data:`HARNESS_OVERRIDES` is what the harness sets on every one of them.
``benchmarks/peer_quality.py --recipe`` runs the diffusers peer on the recipes whose levers it
follows.
"""

from __future__ import annotations

from typing import Any

# The sampler of ``make demo`` (sample.py --method ddim --steps 50): every recipe is scored with it.
DEMO_SAMPLER = ("ddim", 50)
# The sampler lever, scored on the default recipe's runs.
SAMPLER_LEVER = (DEMO_SAMPLER, ("ddim", 20), ("dpm_solver++", 20), ("dpm_solver++", 10))

# name -> (what it changes, dotted overrides of configs/digits.py, samplers [(method, steps)])
RECIPES: dict[str, tuple[str, dict[str, Any], tuple[tuple[str, int], ...]]] = {
    "default": ("configs/digits.py as it is (peak learning rate 2e-3)", {}, SAMPLER_LEVER),
    # The default before this study (its rows were recorded as "default" at commit 6436fdd).
    "lr_1e-3": (
        "peak learning rate 1e-3 (the default until the study)",
        {"optim.lr": 1e-3},
        SAMPLER_LEVER,
    ),
    "lr_5e-4": ("peak learning rate 5e-4", {"optim.lr": 5e-4}, (DEMO_SAMPLER,)),
    "lr_2e-3": ("peak learning rate 2e-3", {"optim.lr": 2e-3}, (DEMO_SAMPLER,)),
    "lr_3e-3_warmup_500": (
        "peak learning rate 3e-3, 500 warm-up steps",
        {"optim.lr": 3e-3, "optim.warmup_steps": 500},
        (DEMO_SAMPLER,),
    ),
    "warmup_50": ("50 warm-up steps", {"optim.warmup_steps": 50}, (DEMO_SAMPLER,)),
    "lr_constant": (
        "constant learning rate after warm-up",
        {"optim.lr_schedule": "constant"},
        (DEMO_SAMPLER,),
    ),
    "batch_32": ("batch 32", {"data.batch_size": 32}, (DEMO_SAMPLER,)),
    "batch_128": ("batch 128", {"data.batch_size": 128}, (DEMO_SAMPLER,)),
    "ema_0.995": ("EMA decay 0.995", {"optim.ema_decay": 0.995}, (DEMO_SAMPLER,)),
    "ema_0.9999": ("EMA decay 0.9999", {"optim.ema_decay": 0.9999}, (DEMO_SAMPLER,)),
    "ema_no_warmup": ("EMA without warm-up", {"optim.ema_warmup": False}, (DEMO_SAMPLER,)),
    "v": ("v prediction", {"diffusion.parameterization": "v"}, (DEMO_SAMPLER,)),
    "eps_min_snr_5": (
        "eps, min-SNR-5 weighting",
        {"diffusion.min_snr_gamma": 5.0},
        (DEMO_SAMPLER,),
    ),
    "v_min_snr_5": (
        "v prediction, min-SNR-5 weighting",
        {"diffusion.parameterization": "v", "diffusion.min_snr_gamma": 5.0},
        (DEMO_SAMPLER,),
    ),
    "t_loss_second_moment": (
        "timesteps drawn by loss second moment (importance sampling)",
        {"diffusion.timestep_sampler": "loss_second_moment"},
        (DEMO_SAMPLER,),
    ),
    "ch_16": ("base width 16", {"model.ch": 16}, (DEMO_SAMPLER,)),
    "ch_24": ("base width 24", {"model.ch": 24}, (DEMO_SAMPLER,)),
    "ch_64": ("base width 64", {"model.ch": 64}, (DEMO_SAMPLER,)),
    "blocks_2": ("2 ResNet blocks per level", {"model.num_res_blocks": 2}, (DEMO_SAMPLER,)),
    "no_dropout": ("no dropout", {"model.dropout": 0.0}, (DEMO_SAMPLER,)),
    # The two levers that raised the recognisable share in the first pass, together.
    "lr_2e-3_v_min_snr_5": (
        "peak learning rate 2e-3 with v prediction and min-SNR-5 weighting",
        {"optim.lr": 2e-3, "diffusion.parameterization": "v", "diffusion.min_snr_gamma": 5.0},
        (DEMO_SAMPLER,),
    ),
    # EDM's training (configs/digits_edm.py's overrides), sampled by the demo's DDIM-50 through
    # its x0 view and by EDM's own Heun at 35 evaluations.
    "edm": (
        "EDM preconditioning, log-normal sigmas and loss weight (configs/digits_edm.py)",
        {
            "diffusion.formulation": "edm",
            "diffusion.parameterization": "x0",
            "diffusion.schedule": "linear",
            "edm.sigma_data": 0.75,
        },
        (DEMO_SAMPLER, ("heun", 18), ("dpm_solver++", 20)),
    ),
}

# What the harness sets on every recipe: no periodic work inside the budget, one checkpoint
# at the end (train.max_seconds and train.num_steps are set per run).
HARNESS_OVERRIDES = {
    "train.log_every": 100,
    "train.checkpoint_every": 0,
    "train.eval_every": 0,
    "train.sample_every": 0,
    "train.num_samples": 0,
    "train.progress_bar": False,
}
