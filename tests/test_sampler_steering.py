"""Steering ``samplers.sample``: a given x_T, SDEdit from ``x_start`` at ``t_start``, and the
hooks traced inside the loop (inpainting by replacement, classifier guidance).

Each use case is checked against an exact answer:

* a given x_T equal to the drawn one reproduces the run bit for bit (it is the same program);
* SDEdit from x_s at a timestep t with ancestral sampling and the ideal learned-variance model of
  N(MU, STD^2) samples exactly ``p(x0 | x_t)`` for ``x_t ~ q(x_t | x_s)``: a Gaussian with mean
  ``MU + c a (x_s - MU)`` and variance ``c^2 s^2 + STD^2 s^2 / (a^2 STD^2 + s^2)``, where
  ``c = a STD^2 / (a^2 STD^2 + s^2)``, ``a = sqrt(abar_t)`` and ``s = sqrt(1 - abar_t)``;
* inpainting keeps the known pixels exactly; on data with independent pixels the unknown ones
  follow their exact conditional, which is then their marginal (replacement is not exact when
  the unknown pixels depend on the known ones: that is the method, not the hook);
* classifier guidance at scale 1 with the exact noisy classifier of a two-Gaussian mixture is
  the exact conditional score, so the guided samples come from the chosen component.
"""

from __future__ import annotations

import functools
import inspect
import warnings

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_samplers import MU, SCHEDULES, STD, _denoise, exact_model, learned_variance_model

from diffusion_jax import diffusion, samplers
from diffusion_jax.samplers import edm, keep_known, shift_by_score, step_noise, timesteps_for
from diffusion_jax.samplers.steering import HOOK_NOISE_STREAM
from diffusion_jax.samplers.validation import make_options
from diffusion_jax.schedules import from_betas, rescale_zero_terminal_snr

COSINE = SCHEDULES["cosine100"]


@functools.cache
def with_learned_variance(num_steps, mean_model):
    """``mean_model`` with the ideal learned-variance half of N(MU, STD^2) on the respaced
    chain (test_samplers.learned_variance_model): ancestral sampling is then exact."""
    variance_model = learned_variance_model(num_steps)

    def model_fn(params, x_t, t):
        variance = variance_model(params, x_t, t)[..., x_t.shape[-1] :]
        return jnp.concatenate([mean_model(params, x_t, t), variance], -1)

    return model_fn


STATS_SHAPE = (4096, 4)  # 4096 draws a column: standard error 1.1% on a std

METHODS = [
    ("ddpm", {}),
    ("ddim", {"eta": 0.5}),
    ("dpm_solver++", {}),
    ("heun", {}),
    ("euler", {}),
]
# One stochastic method, one with solver state, one on EDM's grid (each compiles its loop).
X_T_METHODS = [METHODS[0], METHODS[2], METHODS[3]]


# ----------------------------------------------------------------------------- x_T


@pytest.mark.parametrize("method, options", X_T_METHODS)
def test_given_x_T_reproduces_the_drawn_run(method, options):
    kwargs = dict(method=method, num_steps=6, timestep_spacing="leading", **options)
    model, key = exact_model(), jax.random.key(2)
    drawn = samplers.sample(
        model, None, COSINE, key, (8, 4), return_trajectory=True, trajectory_every=1, **kwargs
    )
    again = samplers.sample(model, None, COSINE, key, (8, 4), x_T=drawn.xs[0], **kwargs)
    chex.assert_trees_all_equal(again, drawn.samples)
    # xs[0] is the documented draw: z, or sqrt(1 - abar_t0) z for EDM's methods.
    z = step_noise(key, 0, (8, 4))
    scale = np.sqrt(1.0 - np.asarray(COSINE.alphas_cumprod)[drawn.timesteps[0]])
    chex.assert_trees_all_close(drawn.xs[0], z * (scale if method in ("heun", "euler") else 1.0))
    # Another start gives another (finite) run; a deterministic one ignores the key.
    other = samplers.sample(model, None, COSINE, key, (8, 4), x_T=drawn.xs[0] + 0.5, **kwargs)
    assert float(jnp.max(jnp.abs(other - drawn.samples))) > 1e-3
    if method not in ("ddpm", "ddim"):
        chex.assert_trees_all_equal(
            samplers.sample(model, None, COSINE, jax.random.key(9), (8, 4), x_T=z, **kwargs),
            samplers.sample(model, None, COSINE, key, (8, 4), x_T=z, **kwargs),
        )


def test_changing_x_T_and_hook_arrays_does_not_recompile():
    traces = []
    exact = exact_model()  # built outside the trace (it is cached)

    def model_fn(params, x_t, t):
        traces.append(x_t.shape)
        return exact(params, x_t, t)

    for seed in (0, 1):
        x_T = jax.random.normal(jax.random.key(seed), (8, 4))
        known = jnp.full((8, 4), 0.1 * seed)
        samplers.sample(
            model_fn, None, COSINE, jax.random.key(seed), (8, 4), method="ddim", num_steps=5,
            x_T=x_T, callback=keep_known, hook_kwargs={"known": known, "mask": jnp.eye(4)[0]},
        )  # fmt: skip
    assert len(traces) == 1, traces


# ----------------------------------------------------------------------------- SDEdit


def test_sdedit_from_zero_returns_the_input_and_from_T_is_a_fresh_sample():
    x_start = jax.random.uniform(jax.random.key(3), (8, 4), minval=-1.0, maxval=1.0)
    for method, options in METHODS:
        out = samplers.sample(
            exact_model(), None, COSINE, jax.random.key(0), (8, 4), method=method, num_steps=5,
            x_start=x_start, t_start=0, **options,
        )  # fmt: skip
        chex.assert_trees_all_equal(out, x_start)
    nothing = samplers.sample(
        exact_model(), None, COSINE, jax.random.key(0), (8, 4), method="ddim", num_steps=5,
        x_start=x_start, t_start=0, return_trajectory=True,
    )  # fmt: skip
    chex.assert_shape([nothing.xs, nothing.pred_x0s], (0, 8, 4))
    chex.assert_trees_all_equal(nothing.samples, x_start)
    # With zero terminal SNR, q(x_{T-1} | x_start) is the standard normal: noising to T - 1
    # with the run's z is the drawn x_T itself, so SDEdit from T is the fresh sample.
    zero_snr, model = ZERO_SNR, _gaussian_v_model
    for method, options in (("ddim", {"eta": 0.5}),):
        kwargs = dict(method=method, num_steps=8, parameterization="v", **options)
        fresh = samplers.sample(model, None, zero_snr, jax.random.key(5), (8, 4), **kwargs)
        edited = samplers.sample(
            model, None, zero_snr, jax.random.key(5), (8, 4), x_start=x_start, t_start=100,
            **kwargs,
        )  # fmt: skip
        chex.assert_trees_all_close(edited, fresh, atol=1e-6, rtol=0)


ZERO_SNR = from_betas(rescale_zero_terminal_snr(np.asarray(COSINE.betas, np.float64)))


def _gaussian_v_model(params, x_t, t):
    """The ideal v network for N(MU, STD^2) on the zero-terminal-SNR schedule."""
    a = jnp.asarray(ZERO_SNR.sqrt_alphas_cumprod)[t][:, None]
    sigma = jnp.asarray(ZERO_SNR.sqrt_one_minus_alphas_cumprod)[t][:, None]
    x0, eps, _ = _denoise(a, sigma, x_t, MU, STD)
    return a * eps - sigma * x0


def test_sdedit_samples_the_exact_posterior_of_the_noised_input():
    """Ancestral sampling with the ideal learned variance from x_t ~ q(x_t | x_s): the output
    is p(x0 | x_t) averaged over x_t (see the module docstring), mean and std within 4
    standard errors (0.03 on the mean, 4.5% on the std; 16384 draws a column measured
    within 0.6% of the std and 0.006 of the mean)."""
    num_steps, t_start = 20, 60
    x_s = jnp.array([-0.9, -0.2, 0.5, 1.2])  # one input per column
    trajectory = samplers.sample(
        with_learned_variance(num_steps, exact_model()), None, COSINE, jax.random.key(7),
        STATS_SHAPE,
        method="ddpm", num_steps=num_steps, variance="learned_range", clip_x0=False,
        x_start=jnp.broadcast_to(x_s, STATS_SHAPE), t_start=t_start, return_trajectory=True,
        trajectory_every=1,
    )  # fmt: skip
    steps = timesteps_for(100, num_steps)
    joined = steps[steps < t_start]
    chex.assert_trees_all_equal(trajectory.timesteps, joined)  # the full grid's tail
    abar = float(np.asarray(COSINE.alphas_cumprod, np.float64)[joined[0]])
    a, s = np.sqrt(abar), np.sqrt(1.0 - abar)
    z = step_noise(jax.random.key(7), 0, STATS_SHAPE)
    chex.assert_trees_all_close(trajectory.xs[0], a * x_s + s * z, atol=1e-5)
    gain = a * STD**2 / (a**2 * STD**2 + s**2)
    mean = MU + gain * a * (np.asarray(x_s) - MU)
    std = np.sqrt(gain**2 * s**2 + STD**2 * s**2 / (a**2 * STD**2 + s**2))
    out = np.asarray(trajectory.samples, np.float64)
    np.testing.assert_allclose(out.mean(0), mean, atol=0.03)
    np.testing.assert_allclose(out.std(0) / std, 1.0, atol=0.045)


def test_sdedit_joins_heun_at_a_predictor_and_keeps_the_full_run_noise():
    timesteps, _, tables, _ = edm.prepare_heun(COSINE, 6, samplers.EDMOptions())
    trajectory = samplers.sample(
        exact_model(), None, COSINE, jax.random.key(0), (8, 4), method="heun", num_steps=6,
        x_start=jnp.zeros((8, 4)), t_start=90, return_trajectory=True, trajectory_every=1,
    )  # fmt: skip
    start = int(np.flatnonzero((tables["w_hat"] == 0) & (timesteps < 90))[0])
    chex.assert_trees_all_equal(trajectory.timesteps, timesteps[start:])
    # DDPM joined midway draws the full run's noise at the steps it runs.
    kwargs = dict(method="ddpm", num_steps=10, clip_x0=False)
    model, key = exact_model(), jax.random.key(1)
    full = samplers.sample(
        model, None, COSINE, key, (8, 4), return_trajectory=True, trajectory_every=1, **kwargs
    )
    joined = samplers.sample(model, None, COSINE, key, (8, 4), x_T=full.xs[4], t_start=56, **kwargs)
    assert timesteps_for(100, 10)[4] == 55
    chex.assert_trees_all_close(joined, full.samples, atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------- inpainting

INPAINT_MU = (-0.5, 0.3, 0.1, 0.6)
KNOWN = jnp.array([0.9, -0.8, 0.0, 0.0])  # dims 0 and 1 known, far from their means
MASK = jnp.array([1.0, 1.0, 0.0, 0.0])


def test_inpainting_keeps_known_pixels_and_samples_the_unknown_conditional():
    num_steps, key = 20, jax.random.key(11)
    trajectory = samplers.sample(
        with_learned_variance(num_steps, exact_model(mu=INPAINT_MU)), None, COSINE, key,
        STATS_SHAPE, method="ddpm",
        num_steps=num_steps, variance="learned_range", clip_x0=False, callback=keep_known,
        hook_kwargs={"known": jnp.broadcast_to(KNOWN, STATS_SHAPE), "mask": MASK},
        return_trajectory=True, trajectory_every=1,
    )  # fmt: skip
    out = np.asarray(trajectory.samples, np.float64)
    np.testing.assert_array_equal(out[:, :2], np.broadcast_to(KNOWN[:2], (4096, 2)))
    # Unknown pixels: their conditional is their marginal N(mu_j, STD^2) (4 standard errors).
    np.testing.assert_allclose(out[:, 2:].mean(0), INPAINT_MU[2:], atol=0.03)
    np.testing.assert_allclose(out[:, 2:].std(0) / STD, 1.0, atol=0.045)
    # Entering step k the known pixels are the known image noised to t_k with the hooks'
    # noise of step k (drawn at the update before it).
    abar = np.asarray(COSINE.alphas_cumprod, np.float64)
    for k in (1, 10, 19):
        t = int(trajectory.timesteps[k])
        noise = step_noise(jax.random.fold_in(key, HOOK_NOISE_STREAM), k, STATS_SHAPE)
        expected = np.sqrt(abar[t]) * KNOWN + np.sqrt(1.0 - abar[t]) * noise
        chex.assert_trees_all_close(trajectory.xs[k][:, :2], expected[:, :2], atol=1e-5)


def test_inpainting_keeps_known_pixels_and_is_batch_invariant(method="heun"):
    def run(batch, first_index):
        return samplers.sample(
            exact_model(mu=INPAINT_MU), None, COSINE, jax.random.key(3), (batch, 4),
            method=method, num_steps=8, first_index=first_index, callback=keep_known,
            hook_kwargs={"known": jnp.broadcast_to(KNOWN, (batch, 4)), "mask": MASK},
        )  # fmt: skip

    whole = run(16, 0)
    np.testing.assert_array_equal(np.asarray(whole)[:, :2], np.broadcast_to(KNOWN[:2], (16, 2)))
    chex.assert_trees_all_close(jnp.concatenate([run(8, 0), run(8, 8)]), whole, atol=1e-5)


# ----------------------------------------------------------------------------- classifier

CENTRES = np.array([[-1.0, 0.0], [1.0, 0.0]])  # two equally likely components
SPREAD = 0.3


def _mixture_posterior(x_t, a, s):
    """log p_t(y | x_t) [B, 2] and E[x0 | x_t] [B, 2] of the mixture at x_t = a x0 + s eps."""
    centres = jnp.asarray(CENTRES, x_t.dtype)
    variance = a**2 * SPREAD**2 + s**2
    log_lik = -jnp.sum((x_t[:, None, :] - a[:, None] * centres) ** 2, -1) / (2.0 * variance)
    log_post = jax.nn.log_softmax(log_lik, axis=-1)
    per_component = centres + (a * SPREAD**2 / variance)[:, None] * (
        x_t[:, None, :] - a[:, None] * centres
    )
    return log_post, jnp.sum(jnp.exp(log_post)[..., None] * per_component, axis=1)


def _mixture_model(parameterization):
    sqrt_abar = jnp.asarray(COSINE.sqrt_alphas_cumprod)
    sigma_table = jnp.asarray(COSINE.sqrt_one_minus_alphas_cumprod)

    def model_fn(params, x_t, t):
        a, s = sqrt_abar[t][:, None], sigma_table[t][:, None]
        _, x0 = _mixture_posterior(x_t, a, s)
        eps = (x_t - a * x0) / s
        return {"eps": eps, "x0": x0, "v": a * eps - s * x0}[parameterization]

    return model_fn


MIXTURE_MODELS = {p: _mixture_model(p) for p in ("eps", "x0", "v")}


def classifier_guidance(info, output, *, y, scale):
    """The model-output hook: the score of the exact noisy classifier log p_t(y | x_t)."""
    a = info.schedule.sqrt_alphas_cumprod[info.t][:, None]
    s = info.schedule.sqrt_one_minus_alphas_cumprod[info.t][:, None]
    log_prob = lambda x: jnp.sum(jnp.take_along_axis(_mixture_posterior(x, a, s)[0], y[:, None], 1))
    return shift_by_score(info, output, scale * jax.grad(log_prob)(info.x))


def _guided_mixture(parameterization, scale, labels, **kwargs):
    return samplers.sample(
        MIXTURE_MODELS[parameterization], None, COSINE, jax.random.key(8), (labels.shape[0], 2),
        method="ddim", num_steps=25, timestep_spacing="leading", clip_x0=False,
        parameterization=parameterization, model_output_hook=classifier_guidance,
        hook_kwargs={"y": labels, "scale": jnp.float32(scale)}, **kwargs,
    )  # fmt: skip


def test_classifier_guidance_moves_the_mass_to_the_chosen_component():
    """The mixture's score plus the exact classifier's is component y's score, so the guided
    run is, sample for sample, the run of the ideal model of N(CENTRES[y], SPREAD^2)."""
    labels = jnp.arange(2048) % 2
    nearest = lambda x: np.argmin(((np.asarray(x)[:, None] - CENTRES) ** 2).sum(-1), axis=1)
    share = np.mean(nearest(_guided_mixture("eps", 0.0, labels)) == 1)
    assert 0.45 < share < 0.55, share  # scale 0: the mixture, about half each
    guided = _guided_mixture("eps", 1.0, labels)
    hits = np.mean(nearest(guided) == np.asarray(labels))
    assert hits > 0.99, hits
    component = samplers.sample(
        exact_model(mu=tuple(CENTRES[1]), std=SPREAD), None, COSINE, jax.random.key(8),
        (2048, 2), method="ddim", num_steps=25, timestep_spacing="leading", clip_x0=False,
    )  # fmt: skip
    chex.assert_trees_all_close(guided[1::2], component[1::2], atol=1e-3, rtol=0)


@pytest.mark.parametrize("parameterization", ["eps", "x0", "v"])
def test_shift_by_score_adds_the_score_in_every_parameterization(parameterization):
    """The eps an output implies is ``-s`` times its score: shifting by g lowers it by s g."""
    t = jnp.array([3, 40, 97], jnp.int32)
    x = np.random.default_rng(0).standard_normal((3, 2)).astype(np.float32)
    score = np.random.default_rng(1).standard_normal((3, 2)).astype(np.float32)
    sigma = np.asarray(COSINE.sqrt_one_minus_alphas_cumprod)[t][:, None]

    @jax.jit  # one compiled program rather than a dozen eager ops, each compiled on its own
    def implied_eps(x, score):
        to_eps = lambda out: diffusion.predict_eps_from_x0(
            COSINE, x, t, diffusion.predict_x0(COSINE, out, x, t, parameterization)
        )
        output = MIXTURE_MODELS[parameterization](None, x, t)
        shifted = shift_by_score(_info(t, x, parameterization), output, score)
        return to_eps(output), to_eps(shifted)

    before, after = implied_eps(x, score)
    chex.assert_trees_all_close(after, before - sigma * score, atol=2e-4, rtol=1e-4)


def _info(t, x, parameterization="eps", variance="fixed_small", t_next=None, noise=None):
    return samplers.StepInfo(
        index=jnp.int32(0),
        t=t,
        t_next=t if t_next is None else t_next,
        x=x,
        noise=jnp.zeros_like(x) if noise is None else noise,
        schedule=COSINE,
        parameterization=parameterization,
        variance=variance,
    )


def test_shift_by_score_keeps_the_variance_half():
    info = _info(jnp.array([10, 50], jnp.int32), jnp.ones((2, 3)), variance="learned_range")
    output = jnp.concatenate([jnp.zeros((2, 3)), jnp.full((2, 3), 0.25)], -1)
    shifted = shift_by_score(info, output, jnp.ones((2, 3)))
    sigma = np.asarray(COSINE.sqrt_one_minus_alphas_cumprod)[[10, 50]]
    np.testing.assert_allclose(shifted[:, :3], -np.broadcast_to(sigma[:, None], (2, 3)), rtol=1e-6)
    np.testing.assert_array_equal(shifted[:, 3:], 0.25)


# ----------------------------------------------------------------------------- errors


def _bad_shape_hook(info, x_next, pred_x0):
    return x_next[:, :2]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(x_T=jnp.zeros((8, 3))), r"x_T must have the samples' shape \(8, 4\)"),
        (dict(x_T=jnp.zeros((8, 4), jnp.int32)), "x_T must be a float array"),
        (dict(x_T=jnp.zeros((8, 4)), x_start=jnp.zeros((8, 4)), t_start=5), "not both"),
        (dict(x_start=jnp.zeros((8, 4))), "x_start needs t_start"),
        (dict(t_start=50), "t_start needs x_start"),
        (dict(x_start=jnp.zeros((8, 4)), t_start=101), r"t_start must be in \[0, T=100\]"),
        (dict(x_start=jnp.zeros((8, 4)), t_start=jnp.int32(5)), "t_start must be a Python int"),
        (dict(callback="keep_known"), "callback must be a function"),
        (dict(hook_kwargs={"known": jnp.zeros((8, 4))}), "hook_kwargs needs a model_output_hook"),
        (dict(callback=_bad_shape_hook), r"callback must return an array of shape \(8, 4\)"),
    ],
)
def test_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        samplers.sample(
            exact_model(), None, COSINE, jax.random.key(0), (8, 4), method="ddim", num_steps=3,
            **kwargs,
        )  # fmt: skip


def test_first_step_warning_follows_where_the_run_starts():
    keyword_only = inspect.Parameter.KEYWORD_ONLY
    defaults = {
        name: parameter.default
        for name, parameter in inspect.signature(samplers.sample).parameters.items()
        if parameter.kind is keyword_only
    }
    base = defaults | dict(method="ddim", num_steps=10, clip_x0=False)
    # A given x_T at t = 99 (1 / sqrt(abar) = 2e3) is amplified like drawn noise...
    with pytest.warns(UserWarning, match="from t = 99"):
        make_options(exact_model(), COSINE, (8, 4), **(base | dict(x_T=jnp.zeros((8, 4)))))
    # ... while SDEdit from t_start = 50 starts at t = 44, where it is not.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        make_options(
            exact_model(), COSINE, (8, 4), **(base | dict(x_start=jnp.zeros((8, 4)), t_start=50))
        )


def test_q_sample_is_what_keep_known_uses_after_the_last_step():
    # After the last step (t_next = -1) the known pixels are the image itself, not noised.
    t_next = jnp.array([-1, 3], jnp.int32)
    info = _info(jnp.zeros(2, jnp.int32), jnp.zeros((2, 4)), t_next=t_next, noise=jnp.ones((2, 4)))
    known = jnp.full((2, 4), 0.5)
    out = jax.jit(lambda x: keep_known(info, x, None, known=known, mask=MASK))(
        jnp.full((2, 4), 9.0)
    )
    noised = diffusion.q_sample(COSINE, known, jnp.array([3, 3], jnp.int32), jnp.ones((2, 4)))
    chex.assert_trees_all_close(out[0], jnp.array([0.5, 0.5, 9.0, 9.0]))
    chex.assert_trees_all_close(out[1, :2], noised[1, :2])
    chex.assert_trees_all_close(out[1, 2:], jnp.array([9.0, 9.0]))
