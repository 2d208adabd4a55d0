"""The per-step pieces of the samplers: the noise, the guided model output, each method's update.

Each is a pure function of arrays, so it runs under ``chex.variants``: jitted and eagerly, and
with ``pmap`` where it is per-example (its batch split over the eight fake CPU devices of
``conftest.py``; the schedule, the step's table row and ``eta`` reach every device whole). Each
update rule is checked against one step written in float64 from its paper's equations, with
the model output given (so no ideal denoiser is needed).
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import reference as ref
from absl.testing import parameterized

from diffusion_jax.samplers import (
    MIN_STEP_RATIO,
    ddim,
    ddpm,
    dpm_solver,
    guidance,
    loop,
    step_noise,
)
from diffusion_jax.samplers.base import Step
from diffusion_jax.schedules import get_schedule
from diffusion_jax.timesteps import timesteps_for

T = 100
SCHEDULE = get_schedule("cosine", T)
ABAR = np.cumprod(1.0 - np.asarray(SCHEDULE.betas, np.float64))
SHAPE = (16, 4)  # 16 examples: two per fake device under pmap
ALL_THREE = dict(with_jit=True, without_jit=True, with_pmap=True)
METHODS = {"ddpm": ddpm.METHOD, "ddim": ddim.METHOD, "dpm_solver++": dpm_solver.METHOD}


def _abar(t):
    return 1.0 if t < 0 else ABAR[t]


def _lam(t):
    """lambda = log(alpha / sigma) (infinite at t = -1, x0)."""
    return 0.5 * np.log(_abar(t) / (1.0 - _abar(t)))


def reference_step(method, steps, k, x, out, noise, *, parameterization, clip_x0, eta, prev_x0):
    """Update ``k`` of a run visiting ``steps``, in float64 from the papers' equations.

    ddpm: Ho et al. (2020) eqs. 6-7 on the chain visiting ``steps`` (beta = 1 - abar_t / abar_s
    between consecutive visited t > s); ddim: Song et al. (2021) eq. 12 with eps re-derived from
    the clipped x0; dpm_solver++: Lu et al. (2022) Algorithm 2 (2M), first order at the first
    and last steps and where r = h_prev / h < MIN_STEP_RATIO. Returns ``(x_next, x0)``.
    """
    t, s = steps[k], (steps[k + 1] if k + 1 < len(steps) else -1)
    a_t, a_s = _abar(t), _abar(s)
    x, out = np.asarray(x, np.float64), np.asarray(out, np.float64)
    if parameterization == "eps":
        x0 = (x - np.sqrt(1.0 - a_t) * out) / np.sqrt(a_t)
    else:
        x0 = out
    if clip_x0:
        x0 = np.clip(x0, -1.0, 1.0)
    eps = (x - np.sqrt(a_t) * x0) / np.sqrt(1.0 - a_t)
    if method == "ddpm":
        beta = 1.0 - a_t / a_s
        mean = (beta * np.sqrt(a_s) * x0 + (1.0 - a_s) * np.sqrt(1.0 - beta) * x) / (1.0 - a_t)
        return mean + np.sqrt(beta * (1.0 - a_s) / (1.0 - a_t)) * noise, x0
    if method == "ddim":
        sigma = eta * np.sqrt((1.0 - a_s) / (1.0 - a_t) * (1.0 - a_t / a_s))
        return np.sqrt(a_s) * x0 + np.sqrt(1.0 - a_s - sigma**2) * eps + sigma * noise, x0
    if s < 0:  # onto x0: first order, sigma_s = 0, alpha_s = 1
        return x0, x0
    h = _lam(s) - _lam(t)
    data = x0
    if k > 0 and (_lam(t) - _lam(steps[k - 1])) / h >= MIN_STEP_RATIO:
        r = (_lam(t) - _lam(steps[k - 1])) / h
        data = (1.0 + 1.0 / (2.0 * r)) * x0 - 1.0 / (2.0 * r) * prev_x0
    return np.sqrt((1.0 - a_s) / (1.0 - a_t)) * x - np.sqrt(a_s) * np.expm1(-h) * data, x0


def _row(tables, k):
    """Row ``k`` of a plan's tables, as the loop scans it."""
    return {name: jnp.asarray(table[k]) for name, table in loop.device_tables(tables).items()}


def _normal(seed, scale=1.0):
    return (scale * np.random.default_rng(seed).normal(size=SHAPE)).astype(np.float32)


# (method, num_steps, spacing, k, parameterization, clip_x0, eta). Spacings that start at
# t = 99 are entered further in: 1 / sqrt(abar_99) ~ 2000 would amplify float32 rounding.
UPDATE_CASES = [
    ("ddpm", T, "linspace", 50, "eps", False, 0.0),  # all steps: the schedule itself
    ("ddpm", 10, "trailing", 3, "eps", False, 0.0),  # the respaced chain
    ("ddpm", 10, "trailing", 9, "x0", True, 0.0),  # the last step adds no noise
    ("ddim", 10, "quadratic", 4, "eps", False, 0.0),
    ("ddim", 10, "quadratic", 4, "x0", True, 0.7),
    ("ddim", 10, "leading", 9, "eps", False, 0.7),  # onto x0
    ("dpm_solver++", 10, "leading", 0, "eps", False, 0.0),  # first order: no history yet
    ("dpm_solver++", 10, "leading", 4, "eps", False, 0.0),  # second order
    ("dpm_solver++", 10, "linspace", 8, "x0", True, 0.0),  # the ratio guard: first order
    ("dpm_solver++", 10, "leading", 9, "eps", False, 0.0),  # onto x0
]


class SamplerStepsUnderVariantsTest(chex.TestCase):
    """Noise, guidance and the update rules under jit, eagerly and (per-example ones) pmap."""

    @chex.variants(**ALL_THREE)
    def test_step_noise_depends_on_the_run_wide_index_only(self):
        """Eight batches of 2 (one per device under pmap) draw the noise of one batch of 16,
        each example ``normal(fold_in(fold_in(key, index), step))``."""
        key, step = jax.random.key(4), 5
        firsts = 2 * np.arange(8, dtype=np.int32)
        draw = lambda key, first_index: step_noise(key, step, (2, 4), first_index)
        if self.variant.type is chex.ChexVariantType.WITH_PMAP:
            pmapped = self.variant(
                draw, broadcast_args_to_devices=False, in_axes=(None, 0), reduce_fn=None
            )
            parts = pmapped(key, firsts)
        else:
            parts = [self.variant(draw)(key, first) for first in firsts]
        whole = np.concatenate(parts)
        chex.assert_shape(whole, SHAPE)
        by_example = [
            jax.random.normal(jax.random.fold_in(jax.random.fold_in(key, i), step), (4,))
            for i in range(16)
        ]
        chex.assert_trees_all_equal(whole, np.stack(by_example))
        chex.assert_trees_all_equal(whole, step_noise(key, step, SHAPE))

    @chex.variants(with_jit=True, without_jit=True)
    def test_step_noise_with_traced_step_and_index(self):
        noise = self.variant(step_noise, static_argnums=2)(jax.random.key(0), 3, SHAPE, 32)
        chex.assert_shape(noise, SHAPE)
        chex.assert_tree_all_finite(noise)
        expected = step_noise(jax.random.key(0), 3, (48, 4))[32:]
        chex.assert_trees_all_equal(noise, expected)

    @chex.variants(**ALL_THREE)
    @parameterized.parameters("fixed_small", "learned_range")
    def test_guided_output_mixes_cond_and_uncond(self, variance):
        """``uncond + w (cond - uncond)`` from one call; a variance half stays conditional."""
        params, scale = np.float32(0.5), np.float32(3.0)
        labels, null = np.arange(16, dtype=np.int32) % 3, np.full(16, 3, np.int32)

        def model_fn(params, x, t, y):
            mean = params * x * (y[:, None] - 1.0) + 1e-3 * t[:, None]
            if variance == "fixed_small":
                return mean
            return jnp.concatenate([mean, jnp.tanh(x) * y[:, None]], axis=-1)

        def guided(params, scale, x, t, y, y_null):
            kwargs, uncond = {"y": y}, {"y": y_null}
            return guidance.model_output(model_fn, params, x, t, kwargs, uncond, scale, variance)

        x, t = _normal(11), np.full(16, 40, np.int32)
        out = ref.call_variant(
            self.variant, guided, params, scale, x, t, labels, null, shared=(0, 1)
        )
        x64, t64 = np.asarray(x, np.float64), np.asarray(t, np.float64)[:, None]
        cond = 0.5 * x64 * (labels[:, None] - 1.0) + 1e-3 * t64
        uncond = 0.5 * x64 * (null[:, None] - 1.0) + 1e-3 * t64
        expected = uncond + 3.0 * (cond - uncond)
        if variance == "learned_range":
            expected = np.concatenate([expected, np.tanh(x64) * labels[:, None]], axis=-1)
        chex.assert_trees_all_close(out, expected, rtol=1e-6, atol=1e-6)

    @chex.variants(**ALL_THREE)
    @parameterized.parameters(*UPDATE_CASES)
    def test_update_matches_float64_reference(
        self, method, num_steps, spacing, k, parameterization, clip_x0, eta
    ):
        steps = timesteps_for(T, num_steps, spacing)
        step_schedule, tables = METHODS[method].plan(SCHEDULE, steps)
        scale = 1.5 if parameterization == "x0" else 1.0  # x0 outputs beyond [-1, 1] get clipped
        x, out, noise, prev_x0 = _normal(1, 2.0), _normal(2, scale), _normal(3), _normal(4)
        t = np.full(SHAPE[0], steps[k], np.int32)
        carry = prev_x0 if method == "dpm_solver++" else None

        def update(step_schedule, row, eta, x, t, out, noise, carry):
            step = Step(
                schedule=step_schedule,
                row=row,
                x=x,
                t=t,
                model_output=out,
                noise=noise,
                eta=eta,
                parameterization=parameterization,
                variance="fixed_small",
                clip_x0=clip_x0,
            )
            return METHODS[method].update(step, carry)

        args = (step_schedule, _row(tables, k), jnp.float32(eta), x, t, out, noise, carry)
        x_next, pred_x0, new_carry = ref.call_variant(self.variant, update, *args, shared=(0, 1, 2))
        expected_x, expected_x0 = reference_step(
            method,
            steps,
            k,
            x,
            out,
            noise,
            parameterization=parameterization,
            clip_x0=clip_x0,
            eta=eta,
            prev_x0=prev_x0,
        )
        chex.assert_shape([x_next, pred_x0], SHAPE)
        chex.assert_tree_all_finite((x_next, pred_x0))
        chex.assert_trees_all_close(pred_x0, expected_x0, rtol=1e-5, atol=1e-5)
        chex.assert_trees_all_close(x_next, expected_x, rtol=1e-5, atol=1e-5)
        if method == "dpm_solver++":  # the history for the next step is this step's x0
            chex.assert_trees_all_equal(new_carry, pred_x0)
        else:
            assert new_carry is None


def test_init_carry_is_derived_from_x_T():
    """Solver state starts from ``zeros_like(x_T)`` (shape, dtype and, in shard_map, type)."""
    x_T = jnp.ones((3, 2, 2), jnp.float32)
    chex.assert_trees_all_equal(dpm_solver.METHOD.init_carry(x_T), jnp.zeros_like(x_T))
    assert ddpm.METHOD.init_carry(x_T) is None and ddim.METHOD.init_carry(x_T) is None
