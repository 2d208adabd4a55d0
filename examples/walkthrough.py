"""The seed of diffusion_jax, runnable: DDPM's story told with the library, measured.

1. The forward process adds Gaussian noise step by step under a beta schedule: a digit and the
   swiss roll noised under the linear, sigmoid and quadratic schedules (``noising_digit.png``,
   ``noising_swissroll.png``, ``schedules.png``).
2. Because each step is Gaussian, q(x_t | x_0) has a closed form; here it is checked against
   the chain of single steps x_t = sqrt(1 - beta_t) x_{t-1} + sqrt(beta_t) eps by their
   moments over many draws (``chain_check.png``).
3. Where the chain ends: alpha_bar_t and the prior term KL(q(x_t | x_0) || N(0, I)) of each
   schedule (``prior.png``).
4. The reverse process is a Gaussian whose mean and variance can both be learned; training
   maximises the likelihood (the variational bound). One small U-Net is trained on the offline
   digits four ways with the library's trainer (fixed_small and fixed_large variance with the
   simple loss, learned variance with the hybrid loss, learned variance with the pure bound and
   the loss-second-moment timestep sampler) and each is scored by its bits/dim on test digits,
   the recognisability of its samples and its wall time (``results.md``, ``results.json``).
5. The learned-variance model's reverse trajectory and its predicted variance per step against
   the two fixed choices beta_t and beta-tilde_t (``reverse_trajectory.png``,
   ``learned_variance.png``).

Command (from the repository root; ``--out`` is emptied of the four runs first):
  python examples/walkthrough.py --out out/walkthrough          # a few minutes on 2 CPU cores
  python examples/walkthrough.py --out /tmp/walkthrough --quick  # tiny, under a minute

docs/walkthrough.md shows the figures and the measured table.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import math
import os
import shutil
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

import diffusion_jax
from diffusion_jax import data, diffusion, losses, plots, schedules
from diffusion_jax.evaluation import digits_check, likelihood, runs, sampling
from diffusion_jax.train import train_and_evaluate

STORY_SCHEDULES = ("linear", "sigmoid", "quadratic")
DEFAULT_CONFIG = os.path.join(os.path.dirname(__file__), os.pardir, "configs", "digits.py")


@dataclasses.dataclass(frozen=True)
class Budget:
    """How much work each part of the walkthrough does."""

    num_timesteps: int  # T, for the pictures, the training and the bound alike
    train_steps: int  # optimiser steps of each of the four runs
    nll_examples: int  # test digits in the bound
    num_samples: int  # samples scored by the digits check
    sample_steps: int  # DDIM steps of those samples
    chain_draws: int  # draws of the chained forward process per schedule
    trajectory_images: int  # images followed along the learned-variance reverse run
    unet_ch: int  # the U-Net's base channels
    unet_ch_mult: tuple[int, ...]  # its channel multiplier per resolution
    unet_attn_resolutions: tuple[int, ...]  # its resolutions with self-attention


FULL = Budget(1000, 1200, 200, 100, 50, 4000, 8, 16, (1, 2), (4,))
# The quick budget's U-Net is the smallest that still has the U-Net's parts, to cut compile time.
QUICK = Budget(20, 10, 16, 16, 10, 500, 4, 8, (1,), ())

# The four ways to train the same network: (name, variance, loss_type, timestep_sampler).
RUNS = (
    ("fixed_small", "fixed_small", "simple", "uniform"),
    ("fixed_large", "fixed_large", "simple", "uniform"),
    ("learned_hybrid", "learned_range", "hybrid", "uniform"),
    ("learned_vlb", "learned_range", "vlb", "loss_second_moment"),
)


def story_timesteps(num_timesteps: int) -> list[int]:
    """Eight timesteps from 0 to T - 1 at fixed fractions of the chain."""
    fractions = (0.0, 0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 1.0)
    return sorted({round(f * (num_timesteps - 1)) for f in fractions})


def test_digits(num: int) -> np.ndarray:
    """The first ``num`` test digits in [-1, 1], float32 ``[num, 8, 8, 1]``."""
    _, source = data.open_split("digits", split="test")
    images = np.asarray(source.read(np.arange(num))["image"], np.float32)
    return images / 127.5 - 1.0


def plot_swissroll_noising(out: str, num_timesteps: int, seed: int = 0) -> str:
    """The swiss roll noised by q(x_t | x_0) at several t (columns) under each schedule (rows)."""
    plt = plots.pyplot()
    points, _ = data.sample_toy("swissroll", 2000, np.random.default_rng(seed))
    noise = np.random.default_rng(seed + 1).standard_normal(points.shape).astype(np.float32)
    timesteps = story_timesteps(num_timesteps)
    fig, axes = plt.subplots(
        len(STORY_SCHEDULES),
        len(timesteps),
        figsize=(1.7 * len(timesteps), 1.8 * len(STORY_SCHEDULES)),
        squeeze=False,
    )
    for row, name in enumerate(STORY_SCHEDULES):
        schedule = schedules.get_schedule(name, num_timesteps)
        for col, step in enumerate(timesteps):
            t = jnp.full((len(points),), step, jnp.int32)
            noised = np.asarray(diffusion.q_sample(schedule, points, t, noise))
            ax = axes[row, col]
            ax.scatter(noised[:, 0], noised[:, 1], s=0.5, alpha=0.5)
            ax.set(xlim=(-3.5, 3.5), ylim=(-3.5, 3.5), xticks=[], yticks=[], aspect="equal")
            if row == 0:
                ax.set_title(f"t = {step}", fontsize=9)
            if col == 0:
                ax.set_ylabel(name)
    fig.suptitle(rf"The swiss roll under $q(x_t \mid x_0)$, T = {num_timesteps}")
    fig.tight_layout()
    return plots.save_figure(fig, out)


def chain_moments(schedule: schedules.Schedule, x0: jax.Array, num_draws: int, key: jax.Array):
    """Per-step moments over ``num_draws`` draws of the chained single steps and of the closed
    form q(x_t | x_0), for one flattened image ``x0`` ``[D]``.

    Returns:
      ``(chain_mean, chain_std, closed_mean, closed_std)``, each ``[T, D]``.
    """
    chain_key, closed_key = jax.random.split(key)
    draws = jnp.broadcast_to(x0, (num_draws, *x0.shape))
    betas = jnp.asarray(schedule.betas)

    def step(x_prev, t):
        eps = jax.random.normal(jax.random.fold_in(chain_key, t), draws.shape)
        beta = betas[t]
        x_t = jnp.sqrt(1.0 - beta) * x_prev + jnp.sqrt(beta) * eps
        closed_noise = jax.random.normal(jax.random.fold_in(closed_key, t), draws.shape)
        closed = diffusion.q_sample(
            schedule, draws, jnp.full((num_draws,), t, jnp.int32), closed_noise
        )
        moments = (x_t.mean(0), x_t.std(0), closed.mean(0), closed.std(0))
        return x_t, moments

    run = diffusion_jax.jit(lambda: jax.lax.scan(step, draws, jnp.arange(schedule.num_timesteps)))
    _, moments = run()
    return tuple(np.asarray(m) for m in moments)


def chain_check(out: str, num_timesteps: int, num_draws: int) -> dict:
    """Closed-form q(x_t | x_0) against the chained steps; draws ``chain_check.png``.

    Two checks per schedule: the moments of ``num_draws`` draws of each (which agree up to
    Monte Carlo noise, so each difference is also given in standard errors), and the chain's
    exact moments, propagated step by step in float64, against the closed form's tables.
    """
    plt = plots.pyplot()
    x0 = jnp.asarray(test_digits(1)[0].reshape(-1))
    pixel = int(np.argmax(np.abs(np.asarray(x0))))  # a bright pixel: its mean decays visibly
    fig, (ax_pixel, ax_diff) = plt.subplots(1, 2, figsize=(12, 4.2))
    comparisons = num_timesteps * x0.shape[0]
    # The largest |z| of this many independent standard normals is about sqrt(2 ln n).
    result = {"num_draws": num_draws, "expected_max_z": math.sqrt(2.0 * math.log(comparisons))}
    t = np.arange(num_timesteps)
    for index, name in enumerate(STORY_SCHEDULES):
        schedule = schedules.get_schedule(name, num_timesteps)
        moments = chain_moments(schedule, x0, num_draws, jax.random.key(index))
        chain_mean, chain_std, closed_mean, closed_std = moments
        mean_diff = np.abs(chain_mean - closed_mean)
        std_diff = np.abs(chain_std - closed_std)
        stderr = np.sqrt((chain_std**2 + closed_std**2) / num_draws)
        z = mean_diff / np.maximum(stderr, 1e-12)
        betas = np.asarray(schedule.betas, np.float64)
        exact_scale = np.cumprod(np.sqrt(1.0 - betas))  # the chain's mean is this times x0
        exact_var = np.zeros(num_timesteps)
        for step in range(num_timesteps):  # Var x_t = (1 - beta_t) Var x_{t-1} + beta_t
            previous = exact_var[step - 1] if step else 0.0
            exact_var[step] = (1.0 - betas[step]) * previous + betas[step]
        table_diff = max(
            np.abs(exact_scale - np.asarray(schedule.sqrt_alphas_cumprod)).max(),
            np.abs(np.sqrt(exact_var) - np.asarray(schedule.sqrt_one_minus_alphas_cumprod)).max(),
        )
        result[name] = {
            "max_mean_diff": float(mean_diff.max()),
            "max_std_diff": float(std_diff.max()),
            "max_mean_diff_z": float(z.max()),
            "exact_moments_vs_tables": float(table_diff),
        }
        (line,) = ax_pixel.plot(t, chain_mean[:, pixel], label=f"{name}: chain")
        ax_pixel.plot(t, closed_mean[:, pixel], "--", color=line.get_color(), label="closed form")
        ax_pixel.fill_between(
            t,
            chain_mean[:, pixel] - chain_std[:, pixel],
            chain_mean[:, pixel] + chain_std[:, pixel],
            color=line.get_color(),
            alpha=0.1,
        )
        color = line.get_color()
        ax_diff.plot(t, mean_diff.max(1), color=color, lw=0.8, label=f"{name}: |mean diff|")
        ax_diff.plot(t, std_diff.max(1), ":", color=color, lw=0.8, label=f"{name}: |std diff|")
        if index == 0:
            ax_diff.plot(t, stderr.mean(1), "k", lw=1, label="one standard error")
    ax_pixel.set(title=f"pixel {pixel}: mean (+- std) over {num_draws} draws", xlabel="t")
    ax_diff.set(title="largest difference over the 64 pixels", xlabel="t", yscale="log")
    for ax in (ax_pixel, ax_diff):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(r"Chained single steps against the closed form $q(x_t \mid x_0)$")
    fig.tight_layout()
    plots.save_figure(fig, out)
    return result


def prior_figure(out: str, num_timesteps: int, num_images: int = 100) -> dict:
    """alpha_bar_t and KL(q(x_t | x_0) || N(0, I)) per schedule on test digits; draws
    ``prior.png`` and returns L_T (``losses.prior_bpd``) of each schedule in bits/dim."""
    plt = plots.pyplot()
    x0 = jnp.asarray(test_digits(num_images))
    fig, (ax_abar, ax_kl) = plt.subplots(1, 2, figsize=(12, 4.2))
    priors = {}
    t_all = np.arange(num_timesteps)
    for name in STORY_SCHEDULES:
        schedule = schedules.get_schedule(name, num_timesteps)

        def kl_at(step, schedule=schedule):
            t = jnp.full((x0.shape[0],), step, jnp.int32)
            mean, _, log_var = diffusion.q_mean_variance(schedule, x0, t)
            kl = losses.mean_flat(losses.normal_kl(mean, log_var, 0.0, 0.0))
            return kl.mean() / math.log(2.0)

        kl_bpd = np.asarray(jax.lax.map(kl_at, jnp.arange(num_timesteps)))
        priors[name] = float(losses.prior_bpd(schedule, x0).mean())
        (line,) = ax_abar.plot(t_all, np.asarray(schedule.alphas_cumprod), label=name)
        ax_kl.plot(t_all, kl_bpd, color=line.get_color(), label=f"{name}: L_T = {priors[name]:.2g}")
    ax_abar.set(title=r"$\bar\alpha_t$", xlabel="t")
    ax_kl.set(
        title=r"KL$(q(x_t \mid x_0)\,\|\,N(0, I))$, bits/dim (L_T at t = T - 1)",
        xlabel="t",
        yscale="log",
    )
    for ax in (ax_abar, ax_kl):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"Where the forward chain ends, T = {num_timesteps}, {num_images} test digits")
    fig.tight_layout()
    plots.save_figure(fig, out)
    return priors


def load_config(path: str):
    """``get_config()`` of a config file, as ``train.py --config`` reads it."""
    spec = importlib.util.spec_from_file_location("walkthrough_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def run_config(base_path: str, budget: Budget, schedule: str, variance, loss_type, sampler):
    """The digits config with a small U-Net, the walkthrough's budget and one training way."""
    config = load_config(base_path)
    config.diffusion.schedule = schedule
    config.diffusion.num_timesteps = budget.num_timesteps
    config.diffusion.variance = variance
    config.diffusion.loss_type = loss_type
    config.diffusion.timestep_sampler = sampler
    config.model.ch = budget.unet_ch
    config.model.ch_mult = budget.unet_ch_mult
    config.model.attn_resolutions = budget.unet_attn_resolutions
    config.model.num_groups = min(8, budget.unet_ch // 2)
    config.model.dropout = 0.0
    config.optim.warmup_steps = min(100, budget.train_steps // 5)
    config.train.num_steps = budget.train_steps
    config.train.log_every = max(1, budget.train_steps // 10)
    config.train.checkpoint_every = budget.train_steps
    config.train.sample_every = 0
    config.train.eval_every = 0
    config.train.num_samples = 4  # the trainer's own final grid; the check draws its own
    config.train.sample_steps = budget.sample_steps
    config.train.progress_bar = False
    return config


def last_loss(workdir: str) -> float:
    """The training loss of the last line of a run's ``metrics.jsonl``."""
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        lines = [json.loads(line) for line in f if line.strip()]
    return float([line["loss"] for line in lines if "loss" in line][-1])


def train_and_score(out: str, budget: Budget, config_path: str, schedule: str) -> list[dict]:
    """Trains the four ways, one fresh workdir each, and scores each one."""
    rows = []
    for name, variance, loss_type, sampler in RUNS:
        workdir = os.path.join(out, "runs", name)
        shutil.rmtree(workdir, ignore_errors=True)
        config = run_config(config_path, budget, schedule, variance, loss_type, sampler)
        print(f"[{name}] training {budget.train_steps} steps ...", flush=True)
        start = time.perf_counter()
        train_and_evaluate(config, workdir)
        train_seconds = time.perf_counter() - start
        start = time.perf_counter()
        nll = likelihood.nll_from_workdir(
            workdir, split="test", num=budget.nll_examples, batch_size=100, progress=False
        )
        nll_seconds = time.perf_counter() - start
        start = time.perf_counter()
        # DDIM (eta = 0) ignores the reverse variance; ancestral DDPM over all T steps uses it.
        reports = {}
        for method, steps in (("ddim", budget.sample_steps), ("ddpm", None)):
            written = sampling.sample_from_workdir(
                workdir,
                out=os.path.join(workdir, f"generated_{method}"),
                num=budget.num_samples,
                method=method,
                steps=steps,
                progress=False,
            )
            reports[method] = digits_check.digits_report(np.load(written["npz"])["images"])
        sample_seconds = time.perf_counter() - start
        rows.append(
            {
                "run": name,
                "variance": variance,
                "loss_type": loss_type,
                "timestep_sampler": sampler,
                "train_steps": budget.train_steps,
                "final_train_loss": last_loss(workdir),
                "total_bpd": nll["total_bpd"],
                "total_bpd_stderr": nll["total_bpd_stderr"],
                "decoder_bpd": nll["decoder_bpd"],
                "transitions_bpd": nll["transitions_bpd"],
                "prior_bpd": nll["prior_bpd"],
                "recognisable_fraction": reports["ddim"]["recognisable_fraction"],
                "classes_present": reports["ddim"]["classes_present"],
                "ddpm_recognisable_fraction": reports["ddpm"]["recognisable_fraction"],
                "ddpm_classes_present": reports["ddpm"]["classes_present"],
                "train_seconds": train_seconds,
                "nll_seconds": nll_seconds,
                "sample_seconds": sample_seconds,
            }
        )
        print(f"[{name}] {json.dumps(rows[-1])}", flush=True)
    return rows


def reverse_with_variance(run: runs.Run, num_images: int, seed: int = 0):
    """Ancestral sampling of a learned-variance run, keeping every x_{t-1} and the mean
    predicted log-variance of each step.

    Returns:
      ``(frames, mean_log_variance)``: ``[T + 1, N, H, W, C]``, where ``frames[T - 1 - t]`` is
      the input of the step at index t (what ``q_sample`` at index t draws) and ``frames[T]``
      the sample; and ``[T]``, indexed by t.
    """
    schedule = run.schedule
    shape = (num_images, *run.data_shape)
    clip = bool(run.config.diffusion.clip_x0)
    key = jax.random.key(seed)

    def step(x_t, t_index):
        t = jnp.full((num_images,), t_index, jnp.int32)
        output = run.model_fn(run.params, x_t, t)
        mean, _, log_variance, _ = diffusion.p_mean_variance(
            schedule, output, x_t, t, variance="learned_range", clip_x0=clip
        )
        noise = jax.random.normal(jax.random.fold_in(key, t_index), shape)
        scale = jnp.where(t_index > 0, jnp.exp(0.5 * log_variance), 0.0)
        x_prev = mean + scale * noise
        return x_prev, (x_prev, log_variance.mean())

    def sample():
        x_init = jax.random.normal(jax.random.fold_in(key, schedule.num_timesteps), shape)
        timesteps = jnp.arange(schedule.num_timesteps - 1, -1, -1)
        xs, log_variances = jax.lax.scan(step, x_init, timesteps)[1]
        return jnp.concatenate([x_init[None], xs]), log_variances

    frames, log_variances = diffusion_jax.jit(sample)()
    return np.asarray(frames), np.asarray(log_variances)[::-1]


def variance_figures(workdir: str, out_dir: str, num_images: int) -> dict:
    """``reverse_trajectory.png`` and ``learned_variance.png`` of a learned-variance run."""
    plt = plots.pyplot()
    run = runs.restore_run(workdir)
    schedule = run.schedule
    num_timesteps = schedule.num_timesteps
    frames, learned = reverse_with_variance(run, num_images)
    log_beta = np.log(np.asarray(schedule.betas))
    log_tilde = np.asarray(schedule.posterior_log_variance_clipped)

    # The trajectory: each image (rows) at the story's timesteps, t = T-1 down to the sample.
    shown = [*story_timesteps(num_timesteps)[::-1], None]
    fig, axes = plt.subplots(
        num_images, len(shown), figsize=(1.3 * len(shown), 1.3 * num_images), squeeze=False
    )
    for col, t in enumerate(shown):
        frame = frames[num_timesteps if t is None else num_timesteps - 1 - t]
        for row in range(num_images):
            ax = axes[row, col]
            ax.imshow(np.clip(frame[row, ..., 0], -1, 1), cmap="gray", vmin=-1, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title("sample" if t is None else f"t = {t}", fontsize=9)
    fig.suptitle("Reverse process of the learned-variance (hybrid) model")
    fig.tight_layout()
    plots.save_figure(fig, os.path.join(out_dir, "reverse_trajectory.png"))

    # The variance: learned log-variance per step between log beta-tilde_t and log beta_t.
    t_all = np.arange(num_timesteps)
    span = log_beta - log_tilde
    fraction = np.where(span > 1e-8, (learned - log_tilde) / np.where(span > 1e-8, span, 1.0), 0)
    fig, (ax_log, ax_frac) = plt.subplots(1, 2, figsize=(12, 4.2))
    ax_log.plot(t_all, log_beta, label=r"fixed_large: $\log\beta_t$")
    ax_log.plot(t_all, log_tilde, label=r"fixed_small: $\log\tilde\beta_t$")
    ax_log.plot(t_all, learned, "k", lw=1, label="learned (mean over pixels and images)")
    ax_log.set(title="log-variance of each reverse step", xlabel="t")
    ax_frac.plot(t_all[1:], fraction[1:], "k", lw=1)
    ax_frac.set(
        title=r"learned interpolation $v$: 0 = $\tilde\beta_t$, 1 = $\beta_t$",
        xlabel="t",
        ylim=(-0.05, 1.05),
    )
    for ax in (ax_log, ax_frac):
        ax.grid(alpha=0.3)
    ax_log.legend(fontsize=8)
    fig.suptitle(f"Predicted variance along a sampling run of {num_images} images")
    fig.tight_layout()
    plots.save_figure(fig, os.path.join(out_dir, "learned_variance.png"))
    return {
        "mean_interpolation": float(fraction[1:].mean()),
        "interpolation_first_tenth": float(fraction[1 : max(2, num_timesteps // 10)].mean()),
    }


def write_table(out: str, rows: list[dict], extra: dict) -> str:
    """``results.md`` (the table) and ``results.json`` (rows and checks) in ``out``."""
    header = (
        "| run | variance | loss | t sampler | train loss | bits/dim | L_0 | L_1..L_T-1 | L_T "
        "| recognisable (classes), DDIM | ancestral DDPM | train s | bound s | samples s |\n"
        "| --- | --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: "
        "| ---: | ---: |\n"
    )
    lines = [
        f"| {r['run']} | {r['variance']} | {r['loss_type']} | {r['timestep_sampler']} "
        f"| {r['final_train_loss']:.4f} | {r['total_bpd']:.3f} +- {r['total_bpd_stderr']:.3f} "
        f"| {r['decoder_bpd']:.3f} | {r['transitions_bpd']:.3f} | {r['prior_bpd']:.2e} "
        f"| {r['recognisable_fraction']:.0%} ({r['classes_present']}) "
        f"| {r['ddpm_recognisable_fraction']:.0%} ({r['ddpm_classes_present']}) "
        f"| {r['train_seconds']:.0f} | {r['nll_seconds']:.0f} | {r['sample_seconds']:.0f} |"
        for r in rows
    ]
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write(header + "\n".join(lines) + "\n")
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump({"rows": rows, **extra}, f, indent=2)
    return header + "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="directory for figures, table and runs")
    parser.add_argument("--quick", action="store_true", help="tiny budget (the test's)")
    parser.add_argument("--config", default=DEFAULT_CONFIG, help="base config file")
    parser.add_argument("--schedule", default="linear", help="schedule of the four runs")
    args = parser.parse_args(argv)
    budget = QUICK if args.quick else FULL
    num_timesteps = budget.num_timesteps
    os.makedirs(args.out, exist_ok=True)
    began = time.perf_counter()

    digit = plots.dataset_image("digits", index=0, split="test")
    plots.plot_noising(
        os.path.join(args.out, "noising_digit.png"),
        image=digit,
        names=STORY_SCHEDULES,
        timesteps=story_timesteps(num_timesteps),
        num_timesteps=num_timesteps,
    )
    plot_swissroll_noising(os.path.join(args.out, "noising_swissroll.png"), num_timesteps)
    plots.plot_schedules(os.path.join(args.out, "schedules.png"), STORY_SCHEDULES, num_timesteps)
    check = chain_check(
        os.path.join(args.out, "chain_check.png"), num_timesteps, budget.chain_draws
    )
    for name in STORY_SCHEDULES:
        c = check[name]
        print(
            f"chain vs closed form, {name}: max |mean diff| {c['max_mean_diff']:.4f} "
            f"({c['max_mean_diff_z']:.1f} standard errors; noise alone gives about "
            f"{check['expected_max_z']:.1f}), max |std diff| {c['max_std_diff']:.4f}; "
            f"exact moments vs the closed-form tables: {c['exact_moments_vs_tables']:.1e}"
        )
    priors = prior_figure(os.path.join(args.out, "prior.png"), num_timesteps)
    print("prior term L_T in bits/dim:", {k: f"{v:.3g}" for k, v in priors.items()})

    rows = train_and_score(args.out, budget, args.config, args.schedule)
    variance = variance_figures(
        os.path.join(args.out, "runs", "learned_hybrid"), args.out, budget.trajectory_images
    )
    wall_seconds = time.perf_counter() - began
    extra = {
        "budget": dataclasses.asdict(budget),
        "schedule": args.schedule,
        "chain_check": check,
        "prior_bpd": priors,
        "learned_variance": variance,
        "wall_seconds": wall_seconds,
        "devices": [str(d) for d in jax.devices()],
    }
    print(write_table(args.out, rows, extra))
    print(f"wall time {wall_seconds:.0f} s; figures and results in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
