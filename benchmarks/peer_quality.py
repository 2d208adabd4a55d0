"""The PyTorch peer of ``benchmarks/quality_per_minute.py``: diffusers on the same digits, the
same wall time and the same scores.

What a diffusers user would write for the default digits recipe (``configs/digits.py``), or
for another recipe of the harness with ``--recipe`` when its levers are ones the peer follows
(:data:`FOLLOWS`: the architecture, learning rate, warm-up, EMA decay and batch size):
  * ``UNet2DModel`` with the same architecture and parameter count as our default U-Net
    (:func:`benchmarks.compare_torch.diffusers_unet`; both counts go into each row);
  * ``DDPMScheduler`` with the same schedule (cosine = ``squaredcos_cap_v2``, T = 1000,
    fixed-small variance), eps prediction and the plain MSE loss;
  * ``torch.optim.Adam`` at the recipe's learning rate, Adam betas and epsilon, diffusers'
    ``get_cosine_schedule_with_warmup`` over the recipe's warm-up, global-norm clipping at 1,
    and diffusers' ``EMAModel`` at the recipe's decay (its default warm-up,
    ``min(decay, (1 + n) / (10 + n))``, is the form of ours);
  * the 1,500 train digits, shuffled each epoch, batches of ``data.batch_size``, scaled to
    [-1, 1] as our pipeline does; ``torch.set_num_threads(--threads)`` (default 2, the cores).

It trains for ``--minutes`` of wall time counted from the end of the first step (as
``train.max_seconds`` counts ours); the cosine decay's length is the step count the peer
reaches in that time, measured by a ``--calibrate_seconds`` run first (or ``--schedule_steps``).
It then samples ``--num_samples`` digits from the EMA weights with ``DDIMScheduler`` at 50
steps, eta 0, ``timestep_spacing="trailing"`` (diffusers' DDIM steps from ``t`` to
``t - T // n``, which only the trailing and leading grids follow exactly; trailing starts at
T - 1, as our linspace grid does) and x0 clipped to [-1, 1] (our ``diffusion.clip_x0``), and
scores them with :func:`benchmarks.quality_per_minute.score` (the digits check and the PCA
Frechet distance). Rows, recipe ``diffusers-peer``, are appended to the same JSONL file, so
``quality_per_minute.py --table`` shows the peer beside our recipes.

Run from the repository root (torch and diffusers come from the ``compare`` extra):
  .venv/bin/python benchmarks/peer_quality.py --seeds 0 1 --minutes 5
  .venv/bin/python benchmarks/peer_quality.py --recipe ch_16 --seeds 0 1 --num_samples 3000
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax
import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler, DDPMScheduler, UNet2DModel
from diffusers.optimization import get_cosine_schedule_with_warmup
from diffusers.training_utils import EMAModel

from benchmarks import common, compare_torch, quality_recipes
from benchmarks import quality_per_minute as qpm
from diffusion_jax.data import digits
from diffusion_jax.train import config as config_lib
from diffusion_jax.train import sharding
from diffusion_jax.train.generate import to_uint8
from diffusion_jax.train.step import create_train_state

RECIPE = "diffusers-peer"
# The levers of quality_per_minute.RECIPES the peer follows (the rest, e.g. v prediction,
# min-SNR weighting or EDM, it does not implement: such recipes are refused).
FOLLOWS = ("model.", "optim.lr", "optim.warmup_steps", "optim.ema_decay", "data.batch_size")
SHAPE = (8, 8, 1)
SAMPLER = ("ddim", 50)


def peer_config(recipe: str):
    """The config of ``quality_per_minute`` recipe ``recipe`` for the peer, and its row label
    (``diffusers-peer`` for the default, ``diffusers-peer_<recipe>`` otherwise).

    Raises:
      ValueError: an unknown recipe, or one with a lever the peer does not follow.
    """
    config = qpm.recipe_config(recipe)
    foreign = [key for key in quality_recipes.RECIPES[recipe][1] if not key.startswith(FOLLOWS)]
    if foreign:
        raise ValueError(
            f"recipe {recipe!r} changes {foreign}, which the peer does not implement; it "
            f"follows only {', '.join(FOLLOWS)}."
        )
    return config, RECIPE if recipe == "default" else f"{RECIPE}_{recipe}"


def our_param_count(config) -> int:
    """Parameters of our U-Net for ``config`` (shapes only, nothing is computed)."""
    model = config_lib.build_model(config, SHAPE, None)
    tx, _ = config_lib.build_optimizer(config)
    mesh = sharding.make_mesh(jax.devices()[:1])
    _, abstract_state, _ = create_train_state(config, model, tx, SHAPE, mesh)
    return common.count_params(abstract_state.params)


def train_digits() -> torch.Tensor:
    """The train split as float32 ``[1500, 1, 8, 8]`` in [-1, 1] (uint8 / 127.5 - 1)."""
    images, _ = digits.load_digits_uint8()
    train = images[digits.split_indices()["train"]]
    return torch.from_numpy(train.transpose(0, 3, 1, 2).astype(np.float32) / 127.5 - 1.0)


def scheduler_for(config) -> DDPMScheduler:
    """diffusers' DDPM scheduler with our digits schedule."""
    d = config.diffusion
    return DDPMScheduler(
        num_train_timesteps=d.num_timesteps,
        beta_schedule=compare_torch._BETA_SCHEDULES[d.schedule],
        variance_type="fixed_small",
        prediction_type="epsilon",
        clip_sample=True,
    )


def train_peer(
    config, *, seed: int, budget_seconds: float, schedule_steps: int
) -> tuple[UNet2DModel, EMAModel, dict[str, Any]]:
    """Trains the peer for ``budget_seconds`` after its first step (or ``schedule_steps``).

    Returns:
      ``(model, ema, stats)`` with ``stats`` as :func:`quality_per_minute.train_for` gives.
    """
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    o = config.optim
    model = compare_torch.diffusers_unet(config, SHAPE)
    scheduler = scheduler_for(config)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=o.lr, betas=(o.b1, o.b2), eps=o.eps)
    warmup = min(o.warmup_steps, schedule_steps)
    lr_schedule = get_cosine_schedule_with_warmup(optimizer, warmup, max(schedule_steps, 1))
    ema = EMAModel(params, decay=o.ema_decay)
    data = train_digits()
    batch = config.data.batch_size
    load_before = os.getloadavg()[0]
    start = time.perf_counter()
    budget_start, step, losses = None, 0, []
    model.train()
    while step < schedule_steps:
        order = torch.randperm(len(data), generator=generator)
        for first in range(0, len(data) - batch + 1, batch):  # whole batches, as ours
            x0 = data[order[first : first + batch]]
            noise = torch.randn(x0.shape, generator=generator)
            t = torch.randint(
                0, scheduler.config.num_train_timesteps, (batch,), generator=generator
            )
            loss = F.mse_loss(model(scheduler.add_noise(x0, noise, t), t).sample, noise)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, o.grad_clip)
            optimizer.step()
            lr_schedule.step()
            ema.step(params)
            step += 1
            losses.append(loss.item())
            budget_start = budget_start or time.perf_counter()
            if time.perf_counter() - budget_start >= budget_seconds or step >= schedule_steps:
                break
        if budget_start and time.perf_counter() - budget_start >= budget_seconds:
            break
    seconds = time.perf_counter() - start
    spent = step < schedule_steps
    stats = {
        "steps": step,
        "train_s": round(seconds, 1),
        "overhead_s": round(seconds - budget_seconds, 1) if spent else None,
        "steps_per_s": round((step - 1) / budget_seconds, 2) if spent else None,
        "budget_spent": spent,
        "final_loss": float(np.mean(losses[-50:])),
        "load_before": round(load_before, 2),
        "load_after": round(os.getloadavg()[0], 2),
    }
    return model, ema, stats


@torch.no_grad()
def sample_peer(
    config, model: UNet2DModel, ema: EMAModel, num: int, seed: int, steps: int = SAMPLER[1]
) -> np.ndarray:
    """``num`` DDIM samples of the EMA weights as uint8 ``[num, 8, 8, 1]``."""
    ema.copy_to(model.parameters())
    model.eval()
    ddim = DDIMScheduler.from_config(scheduler_for(config).config, timestep_spacing="trailing")
    ddim.set_timesteps(steps)
    generator = torch.Generator().manual_seed(10_000 + seed)
    out = []
    for first in range(0, num, 100):
        x = torch.randn((min(100, num - first), 1, 8, 8), generator=generator)
        for t in ddim.timesteps:
            x = ddim.step(model(x, t).sample, t, x, eta=0.0).prev_sample
        out.append(x.numpy().transpose(0, 2, 3, 1))
    return to_uint8(np.concatenate(out))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--recipe", default="default", help="a quality_per_minute recipe (its levers in FOLLOWS)"
    )
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    parser.add_argument("--minutes", type=float, default=5.0)
    parser.add_argument("--num_samples", type=int, default=500)
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    parser.add_argument("--calibrate_seconds", type=float, default=30.0)
    parser.add_argument("--schedule_steps", type=int, default=0, help="0: calibrate")
    parser.add_argument("--results", default=qpm.RESULTS)
    args = parser.parse_args(argv)
    if args.minutes <= 0 or args.num_samples < 2:
        parser.error("--minutes must be > 0 and --num_samples >= 2.")
    try:
        config, label = peer_config(args.recipe)
    except ValueError as error:
        parser.error(str(error))
    torch.set_num_threads(args.threads)
    ours = our_param_count(config)
    theirs = sum(p.numel() for p in compare_torch.diffusers_unet(config, SHAPE).parameters())
    print(f"parameters: ours {ours:,}, diffusers {theirs:,}; load {os.getloadavg()}", flush=True)
    qpm.warn_if_loaded()
    budget = args.minutes * 60
    horizon = args.schedule_steps
    if not horizon:
        _, _, probe = train_peer(
            config, seed=0, budget_seconds=args.calibrate_seconds, schedule_steps=10**7
        )
        horizon = max(1, math.floor(probe["steps_per_s"] * budget))
    print(f"learning-rate schedule of {horizon} steps", flush=True)
    for seed in args.seeds:
        commit = qpm.git_commit()
        model, ema, trained = train_peer(
            config, seed=seed, budget_seconds=budget, schedule_steps=horizon
        )
        print(f"  seed {seed}: {trained}", flush=True)
        start = time.perf_counter()
        images = sample_peer(config, model, ema, args.num_samples, seed)
        row = {
            "recipe": label,
            "seed": seed,
            "minutes": args.minutes,
            "schedule_steps": horizon,
            **qpm.recipe_settings(config),
            **trained,
            "sampler": f"{SAMPLER[0]}:{SAMPLER[1]}",
            "sample_s": round(time.perf_counter() - start, 1),
            **qpm.score(images),
            "params": theirs,
            "params_ours": ours,
            "torch_threads": args.threads,
            "torch": torch.__version__,
            "date": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
            "commit": commit,
            "cores": os.cpu_count(),
        }
        qpm.append_row(args.results, row)
        print(
            f"    {row['sampler']}: recognisable {row['recognisable']:.2f}, classes "
            f"{row['classes']}, Frechet {row['frechet_pca']:.3f}",
            flush=True,
        )


if __name__ == "__main__":
    main()
