"""The first step of an eps sampler on the cosine schedule, and its remedies, on 2-D moons.

With eps prediction and no x0 clipping, the first update forms x0 = (x_t - sqrt(1 - abar) eps) /
sqrt(abar); cosine's abar at t = T - 1 is 2.4e-9 at T = 1000, so an eps error is multiplied by
1 / sqrt(abar) = 2e4. This script measures what that does to DDIM-50, DPM-Solver++-20,
DDIM-1000 and ancestral DDPM-50 and DDPM-1000, and what each remedy buys: ``leading`` spacing
(the first step at t = 980), ``trailing`` spacing, v prediction, and clipping x0 to the data's
box.

The model is the exact denoiser of a Gaussian mixture (one isotropic component of std
``--component_std`` on each of ``--components`` points of the moons set), plus an output error
of a given size: ``error * sin(3 x_t + t / T)``, in whatever the model predicts (eps or v), as a
stand-in for a network's imperfection. With error 0 only float32 rounding remains. The score is
the energy distance between 2000 samples and 2000 fresh draws of the mixture (0 for equal
distributions; two independent draws of the mixture itself score about 1e-3).

Command (from the repository root):
  python -m benchmarks.sampler_first_step
"""

from __future__ import annotations

import argparse
import warnings

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax import samplers, schedules
from diffusion_jax.data import toy

# (label, sampler options) of every row; the baseline is cosine, linspace spacing, eps, no clip.
REMEDIES = (
    ("baseline (linspace, eps, no clip)", {}),
    ("leading spacing", {"timestep_spacing": "leading"}),
    ("trailing spacing", {"timestep_spacing": "trailing"}),
    ("v prediction", {"parameterization": "v"}),
    ("clip x0 to the data box", {"clip_x0": (-4.0, 4.0)}),
)
METHODS = (("ddim", 50), ("dpm_solver++", 20), ("ddim", 1000), ("ddpm", 50), ("ddpm", 1000))


def mixture_model(means: np.ndarray, std: float, schedule, parameterization: str, error: float):
    """The exact eps (or v) of the mixture of N(m_k, std^2 I), plus ``error`` times a smooth
    function of (x_t, t)."""
    means = jnp.asarray(means, jnp.float32)
    sqrt_abar_table = jnp.asarray(schedule.sqrt_alphas_cumprod)
    sigma_table = jnp.asarray(schedule.sqrt_one_minus_alphas_cumprod)
    num_timesteps = schedule.num_timesteps

    def model_fn(params, x_t, t):
        del params
        a = sqrt_abar_table[t][:, None]
        sigma = sigma_table[t][:, None]
        var = a**2 * std**2 + sigma**2  # [B, 1]
        diff = x_t[:, None, :] - a[:, :, None] * means[None]  # [B, K, 2]
        logits = -0.5 * jnp.sum(diff**2, axis=-1) / var
        weights = jax.nn.softmax(logits, axis=-1)  # [B, K]
        # eps = E[x_t - a x0 | x_t] / sigma = sigma sum_k w_k (x_t - a m_k) / var
        eps = sigma * jnp.einsum("bk,bkd->bd", weights, diff) / var
        if parameterization == "v":
            x0 = (x_t - sigma * eps) / a
            out = a * eps - sigma * x0
        else:
            out = eps
        time = (t.astype(jnp.float32) / num_timesteps)[:, None]
        return out + error * jnp.sin(3.0 * x_t + time)

    return model_fn


def energy_distance(x: np.ndarray, y: np.ndarray) -> float:
    """2 E|X - Y| - E|X - X'| - E|Y - Y'|, from all pairs; nan if x is not finite."""
    if not np.all(np.isfinite(x)):
        return float("nan")
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)

    def mean_dist(a, b):
        return float(np.mean(np.sqrt(np.sum((a[:, None] - b[None]) ** 2, axis=-1))))

    return 2.0 * mean_dist(x, y) - mean_dist(x, x) - mean_dist(y, y)


def draw_mixture(means: np.ndarray, std: float, num: int, rng: np.random.Generator):
    picks = rng.integers(0, len(means), num)
    return means[picks] + std * rng.standard_normal((num, 2))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num_timesteps", type=int, default=1000)
    parser.add_argument("--components", type=int, default=256)
    parser.add_argument("--component_std", type=float, default=0.1)
    parser.add_argument("--errors", type=float, nargs="+", default=[0.0, 0.003, 0.03])
    parser.add_argument("--num_samples", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    rng = np.random.default_rng(args.seed)
    means, _ = toy.sample_toy("moons", args.components, rng)
    reference = draw_mixture(means, args.component_std, args.num_samples, rng)
    floor = energy_distance(
        draw_mixture(means, args.component_std, args.num_samples, rng), reference
    )
    schedule = schedules.get_schedule("cosine", args.num_timesteps)
    print(
        f"moons mixture ({args.components} components, std {args.component_std}), cosine "
        f"T = {args.num_timesteps}; energy distance of {args.num_samples} samples to fresh "
        f"draws (two draws of the mixture: {floor:.4f}; nan: non-finite samples)"
    )
    header = f"{'remedy':<36} {'sampler':<18}" + "".join(
        f" {'error ' + format(e, 'g'):>12}" for e in args.errors
    )
    print(header)
    print("-" * len(header))
    for label, options in REMEDIES:
        for method, num_steps in METHODS:
            spacing = options.get("timestep_spacing", "linspace")
            parameterization = options.get("parameterization", "eps")
            clip_x0 = options.get("clip_x0", False)
            row = f"{label:<36} {f'{method}-{num_steps}':<18}"
            for error in args.errors:
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    samples = samplers.sample(
                        mixture_model(means, args.component_std, schedule, parameterization, error),
                        None,
                        schedule,
                        jax.random.key(args.seed),
                        (args.num_samples, 2),
                        method=method,
                        num_steps=num_steps,
                        timestep_spacing=spacing,
                        parameterization=parameterization,
                        clip_x0=clip_x0,
                    )
                warned = any("1 / sqrt(alpha_bar)" in str(w.message) for w in caught)
                row += f" {energy_distance(np.asarray(samples), reference):12.4f}"
            print(row + ("  (warns)" if warned else ""), flush=True)


if __name__ == "__main__":
    main()
