"""The diffusers importer against diffusers itself, with no download.

For the five DDPM releases (their config.json / scheduler_config.json written out below), a
``UNet2DModel`` with random weights is built by diffusers, saved in the hub layout, converted,
and our U-Net's output compared with diffusers' on the same inputs and timesteps; the
scheduler's tables are compared with our schedule's; a short DDPM run with the same noise is
compared with ``DDPMScheduler.step``; and ``sample.py`` runs on a converted workdir with no
dataset. Refusals name the field or key.

Where the configs come from: ``google/ddpm-cat-256``'s config.json and scheduler_config.json
were read in a public copy (diffusers 0.0.4 / 0.1.1 format); ``ddpm-ema-cat-256`` is the EMA
checkpoint of the same network. ``ddpm-cifar10-32``'s values match a public re-save of its
config by diffusers 0.24 (block_out_channels [128, 256, 256, 256], attention at level 1 only,
downsample_padding 0, flip_sin_to_cos false, freq_shift 1, attention_head_dim null); its field
set is taken to be the cat release's. ``ddpm-celebahq-256``, ``ddpm-ema-church-256`` and
``ddpm-ema-bedroom-256`` are inferred: DDPM trained one 256x256 network for CelebA-HQ and all
LSUN classes (ch_mult 1,1,2,2,4,4, attention at 16x16; Ho et al. 2020, Appendix B), which the
cat config spells out; their scheduler configs are DDPM's linear 1e-4..0.02 at T = 1000 with
fixed_small and clipping, as the cat one.

Tolerance: both networks run in float32, with different summation orders (XLA's convolutions,
attention and GroupNorm against torch's). The measured difference is ~1e-7 of the output's
scale (max |ours - theirs| / max |theirs|); we require 1e-5, the float32 round-off (6e-8) of
~100 layers, each adding a few ulps, with margin for the timestep embedding, whose arguments
(up to 999 rad) carry ~1e-4 absolute error from one ulp of a frequency.
"""

from __future__ import annotations

import copy
import json
import math
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax import diffusion, samplers
from diffusion_jax.convert import __main__ as convert_cli
from diffusion_jax.convert import from_diffusers
from diffusion_jax.samplers.noise import step_noise
from diffusion_jax.train import config as config_lib

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

LSUN_256 = {
    "_class_name": "UNet2DModel",
    "_diffusers_version": "0.0.4",
    "act_fn": "silu",
    "attention_head_dim": None,
    "block_out_channels": [128, 128, 256, 256, 512, 512],
    "center_input_sample": False,
    "down_block_types": ["DownBlock2D"] * 4 + ["AttnDownBlock2D", "DownBlock2D"],
    "downsample_padding": 0,
    "flip_sin_to_cos": False,
    "freq_shift": 1,
    "in_channels": 3,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-06,
    "norm_num_groups": 32,
    "out_channels": 3,
    "sample_size": 256,
    "time_embedding_type": "positional",
    "up_block_types": ["UpBlock2D", "AttnUpBlock2D"] + ["UpBlock2D"] * 4,
}
CIFAR10 = {
    **LSUN_256,
    "block_out_channels": [128, 256, 256, 256],
    "down_block_types": ["DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"],
    "sample_size": 32,
}
DDPM_SCHEDULER = {
    "_class_name": "DDPMScheduler",
    "_diffusers_version": "0.1.1",
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "beta_start": 0.0001,
    "clip_sample": True,
    "num_train_timesteps": 1000,
    "trained_betas": None,
    "variance_type": "fixed_small",
}
RELEASES = {
    "google/ddpm-cifar10-32": CIFAR10,
    "google/ddpm-celebahq-256": LSUN_256,
    "google/ddpm-ema-church-256": LSUN_256,
    "google/ddpm-ema-bedroom-256": LSUN_256,
    "google/ddpm-ema-cat-256": LSUN_256,
}


def small(config, channels=(8, 8, 16, 16, 32, 32), size=32, groups=4):
    """The same block types with fewer channels, fewer groups and a smaller sample size."""
    levels = len(config["block_out_channels"])
    return {
        **config,
        "block_out_channels": list(channels[:levels]),
        "norm_num_groups": groups,
        "layers_per_block": 1,
        "sample_size": size,
    }


def compile_for_test(fn, *args):
    """``jax.jit(fn)`` compiled with XLA's LLVM optimisation off (values, not speed)."""
    return jax.jit(fn).lower(*args).compile({"xla_backend_optimization_level": 0})


def randomise(model, seed=0):
    """Random weights for every parameter, none zero: N(0, 1/fan_in) kernels, GroupNorm scales
    1 + 0.1 N, biases 0.1 N (diffusers' own init would do, but this is independent of it)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            if param.ndim > 1:
                param.copy_(noise / math.sqrt(param[0].numel()))
            elif "norm" in name and name.endswith("weight"):
                param.copy_(1 + 0.1 * noise)
            else:
                param.copy_(0.1 * noise)
    return model.eval()


def save_hub(tmp_path, unet_config, scheduler_config=DDPM_SCHEDULER, seed=0, safe=True):
    """A random ``UNet2DModel`` saved as the hub lays a DDPM release out; returns it."""
    model = randomise(diffusers.UNet2DModel(**unet_config), seed)
    model.save_pretrained(tmp_path / "unet", safe_serialization=safe)
    diffusers.DDPMScheduler(**scheduler_config).save_pretrained(tmp_path / "scheduler")
    # save_pretrained writes every field; keep the release's own config.json, as published.
    (tmp_path / "unet" / "config.json").write_text(json.dumps(unet_config))
    return model


def convert(folder, dataset="converted"):
    unet_dir, unet_config, scheduler_config, _ = from_diffusers.read_configs(str(folder))
    config = from_diffusers.build_config(unet_config, scheduler_config, dataset=dataset)
    shape = (config.data.image_size, config.data.image_size, unet_config.get("in_channels", 3))
    classes = unet_config.get("num_class_embeds")  # appended null label: as many classes
    params = from_diffusers.convert_state_dict(
        from_diffusers.load_state_dict(unet_dir), config, shape, num_classes=classes
    )
    return config, params, shape


def outputs(model, config, params, shape, x, t, y=None):
    """(ours, diffusers') outputs, both NHWC float32; ``y`` the labels of a conditional one."""
    classes = None if y is None else params["label_embed"]["embedding"].shape[0] - 1
    net = config_lib.build_model(config, shape, classes)
    args = (x, t) if y is None else (x, t, jnp.asarray(y, jnp.int32))
    ours = compile_for_test(net.apply, {"params": params}, *args)({"params": params}, *args)
    labels = None if y is None else torch.from_numpy(np.asarray(y))
    with torch.no_grad():
        theirs = model(nchw(np.array(x)), torch.from_numpy(t), class_labels=labels)
    return np.asarray(ours), theirs.sample.numpy().transpose(0, 2, 3, 1)


def assert_same_output(ours, theirs, rtol=1e-5):
    scale = np.max(np.abs(theirs))
    assert scale > 0.1, "random weights give a non-trivial output"
    error = np.max(np.abs(ours - theirs))
    assert error <= rtol * scale, f"max |ours - diffusers| = {error:.3g}, scale {scale:.3g}"


def test_release_configs_convert_to_ddpm_networks():
    cifar = from_diffusers.build_config(CIFAR10, DDPM_SCHEDULER, dataset="cifar10")
    m = cifar.model
    assert (m.ch, tuple(m.ch_mult), m.num_res_blocks, tuple(m.attn_resolutions)) == (
        128,
        (1, 2, 2, 2),
        2,
        (16,),
    )
    assert (m.norm_eps, m.downsample_padding, m.flip_sin_to_cos, m.freq_shift) == (
        1e-6,
        "same",
        False,
        1.0,
    )
    assert m.head_dim is None and m.num_heads == 1 and not m.use_scale_shift_norm
    d = cifar.diffusion
    assert (d.schedule, d.num_timesteps, d.betas, d.parameterization, d.variance, d.clip_x0) == (
        "linear",
        1000,
        None,
        "eps",
        "fixed_small",
        True,
    )
    # The four 256x256 releases are one network: converting one checks them all.
    converted = [
        config_lib.config_to_dict(from_diffusers.build_config(c, DDPM_SCHEDULER))
        for name, c in RELEASES.items()
        if name != "google/ddpm-cifar10-32"
    ]
    assert all(c == converted[0] for c in converted)
    assert converted[0]["model"]["ch_mult"] == [1, 1, 2, 2, 4, 4]
    assert converted[0]["model"]["attn_resolutions"] == [16]
    assert converted[0]["data"]["image_size"] == 256


@pytest.mark.parametrize(
    "name, unet_config",
    [
        ("cifar10-32 layout", small(CIFAR10, size=16)),
        ("256 layout (celebahq, church, bedroom, cat)", small(LSUN_256)),
        # UNet2DModel's own defaults: cos-then-sin embedding, shift 0, symmetric padding,
        # eps 1e-5, 8-channel heads; with scale-shift conditioning, a learned variance and
        # class labels.
        (
            "diffusers defaults, scale_shift, learned_range, labels",
            {
                "block_out_channels": [16, 32],
                "down_block_types": ["AttnDownBlock2D", "AttnDownBlock2D"],
                "up_block_types": ["AttnUpBlock2D", "AttnUpBlock2D"],
                "norm_num_groups": 4,
                "attn_norm_num_groups": 4,
                "layers_per_block": 1,
                "sample_size": 8,
                "out_channels": 6,
                "resnet_time_scale_shift": "scale_shift",
                "num_class_embeds": 5,
            },
        ),
    ],
)
def test_small_networks_match_diffusers(tmp_path, name, unet_config):
    scheduler = DDPM_SCHEDULER
    if unet_config.get("out_channels") == 6:
        scheduler = {**DDPM_SCHEDULER, "variance_type": "learned_range"}
    # The 256 layout goes through a .bin (torch) file, the others through safetensors.
    model = save_hub(tmp_path, unet_config, scheduler, safe="256" not in name)
    config, params, shape = convert(tmp_path)
    if "defaults" in name:
        m = config.model
        assert (m.flip_sin_to_cos, m.freq_shift, m.downsample_padding, m.norm_eps) == (
            True,
            0.0,
            "symmetric",
            1e-5,
        )
        assert m.head_dim == 8 and m.use_scale_shift_norm
        assert config.diffusion.variance == "learned_range" and m.class_conditional
        # Five classes and the appended null label, a zero row.
        assert params["label_embed"]["embedding"].shape == (6, 64)
        assert not np.any(params["label_embed"]["embedding"][5])
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.standard_normal((2, *shape)), jnp.float32)
    t = np.array([0, 999])
    y = np.array([4, 1]) if "labels" in name else None
    ours, theirs = outputs(model, config, params, shape, x, t, y)
    assert_same_output(ours, theirs)


def test_cifar10_at_full_size_matches_diffusers():
    # The hub files are tested on the small layouts; here the state dict goes in directly.
    model = randomise(diffusers.UNet2DModel(**CIFAR10))
    assert sum(p.numel() for p in model.parameters()) == 35_746_307  # DDPM's 35.7M
    config = from_diffusers.build_config(CIFAR10, DDPM_SCHEDULER, dataset="cifar10")
    shape = (32, 32, 3)
    state = {k: v.numpy() for k, v in model.state_dict().items()}
    params = from_diffusers.convert_state_dict(state, config, shape)
    assert sum(v.size for v in jax.tree.leaves(params)) == 35_746_307
    x = jnp.asarray(np.random.default_rng(2).standard_normal((1, *shape)), jnp.float32)
    ours, theirs = outputs(model, config, params, shape, x, np.array([517]))
    assert_same_output(ours, theirs)


def test_deprecated_attention_names_convert_the_same():
    # The first releases stored attention as query/key/value/proj_attn.
    config = from_diffusers.build_config(small(CIFAR10, size=16), DDPM_SCHEDULER)
    model = randomise(diffusers.UNet2DModel(**small(CIFAR10, size=16)))
    state = {k: v.numpy() for k, v in model.state_dict().items()}
    renamed = {
        k.replace("to_q", "query")
        .replace("to_k", "key")
        .replace("to_v", "value")
        .replace("to_out.0", "proj_attn"): v
        for k, v in state.items()
    }
    assert renamed.keys() != state.keys()
    a = from_diffusers.convert_state_dict(state, config, (16, 16, 3))
    b = from_diffusers.convert_state_dict(renamed, config, (16, 16, 3))
    jax.tree.map(np.testing.assert_array_equal, a, b)


SCHEDULERS = [
    DDPM_SCHEDULER,
    {"beta_schedule": "squaredcos_cap_v2", "num_train_timesteps": 4000},
    {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012},
    {"beta_schedule": "sigmoid", "num_train_timesteps": 500},
    {"beta_schedule": "linear", "beta_start": 0.001, "beta_end": 0.05, "num_train_timesteps": 200},
    {"trained_betas": list(np.linspace(0.01, 0.3, 50)), "num_train_timesteps": 50},
    {"rescale_betas_zero_snr": True, "prediction_type": "v_prediction"},
]


@pytest.mark.filterwarnings("ignore:Schedule .* ends at alpha_bar_T")  # T = 500 sigmoid
@pytest.mark.parametrize("scheduler_config", SCHEDULERS)
def test_scheduler_tables_match_diffusers(scheduler_config):
    theirs = diffusers.DDPMScheduler(**scheduler_config)
    config = from_diffusers.build_config(small(CIFAR10, size=16), scheduler_config)
    ours = config_lib.build_schedule(config)
    num = theirs.config.num_train_timesteps
    assert ours.num_timesteps == num
    zero_snr = bool(scheduler_config.get("rescale_betas_zero_snr"))
    their_betas = theirs.betas.numpy().astype(np.float64)
    # Betas: diffusers' float32 values against our float64 ones stored as float32: equal to
    # float32 rounding. With zero terminal SNR diffusers rescales in float32, and each beta is
    # 1 minus a ratio of alpha_bars: absolute errors of a few ulps of 1 (2**-24) where they
    # are near 1 (8.2e-7 measured), relative ones of a few ulps near the end (1.7e-6 at
    # t = T - 2); we allow 2**-20 (9.5e-7) absolute plus 4e-6 relative there.
    if zero_snr:
        np.testing.assert_allclose(ours.betas, their_betas, rtol=4e-6, atol=2.0**-20)
    else:
        np.testing.assert_allclose(ours.betas, their_betas, rtol=2e-6, atol=0)
        # Ours is the float64 product of the same betas, stored as float32.
        reference = np.cumprod(1 - their_betas)
        np.testing.assert_allclose(ours.alphas_cumprod, reference, rtol=2e-6, atol=1e-12)
    # alpha_bar: diffusers multiplies T float32 numbers in float32, so its error grows to about
    # T ulps of 1 (T * 2**-24): we allow T * 2**-23 absolute.
    their_abar = theirs.alphas_cumprod.numpy().astype(np.float64)
    np.testing.assert_allclose(ours.alphas_cumprod, their_abar, rtol=0, atol=num * 2.0**-23)
    # Posterior variance (the fixed_small variance) at t >= 1, as their _get_variance gives it.
    # It divides by 1 - alpha_bar_t, so diffusers' absolute alpha_bar error becomes a relative
    # error of ~ t * 2**-24 / (1 - alpha_bar_t) (0.26% measured at t = 1 of the T = 4000 cosine,
    # where 1 - alpha_bar_1 = 2e-5); we allow 4 (t + 1) 2**-24 / (1 - alpha_bar_t) + 1e-5.
    t = np.arange(1, num, max(1, num // 97))
    theirs_var = np.array([float(theirs._get_variance(int(i))) for i in t])
    ours_var = np.asarray(ours.posterior_variance, np.float64)[t]
    rtol = 4 * (t + 1) * 2.0**-24 / (1 - np.minimum(their_abar[t], 1 - 1e-12)) + 1e-5
    assert np.all(np.abs(ours_var - theirs_var) <= rtol * np.abs(theirs_var)), np.max(
        np.abs(ours_var - theirs_var) / np.abs(theirs_var) / rtol
    )
    assert config.diffusion.parameterization == (
        "v" if scheduler_config.get("prediction_type") == "v_prediction" else "eps"
    )
    named = scheduler_config.get("trained_betas") is None and "beta_start" not in scheduler_config
    assert (config.diffusion.betas is None) == (named or scheduler_config is DDPM_SCHEDULER)


def nchw(array):
    """A NHWC NumPy array as a NCHW torch tensor."""
    return torch.from_numpy(np.ascontiguousarray(array.transpose(0, 3, 1, 2)))


@pytest.mark.parametrize(
    "scheduler_config",
    [
        {"variance_type": "fixed_small", "clip_sample": True},
        {"variance_type": "fixed_large", "prediction_type": "sample", "clip_sample": False},
        {"variance_type": "learned_range", "prediction_type": "v_prediction"},
        {"variance_type": "learned_range", "beta_schedule": "squaredcos_cap_v2"},
    ],
)
def test_reverse_step_matches_diffusers_step(scheduler_config, monkeypatch):
    # One ancestral step from the same model output, x_t and noise, at early, middle and late
    # t (t = 0 adds no noise in either), for each variance and parameterisation the converter
    # maps: the mapping of the scheduler fields, checked without a network.
    config = from_diffusers.build_config(
        {**small(CIFAR10), "out_channels": 6 if "learned" in str(scheduler_config) else 3},
        scheduler_config,
    )
    d = config.diffusion
    schedule = config_lib.build_schedule(config)
    scheduler = diffusers.DDPMScheduler(**scheduler_config)
    rng = np.random.default_rng(4)
    channels = 6 if d.variance == "learned_range" else 3
    for t in (0, 1, 480, 999):
        output = rng.standard_normal((2, 4, 4, channels)).astype(np.float32)
        if d.variance == "learned_range":
            output[..., 3:] = np.tanh(output[..., 3:])  # the interpolation v lies in [-1, 1]
        x_t = (1.5 * rng.standard_normal((2, 4, 4, 3))).astype(np.float32)
        noise = rng.standard_normal((2, 4, 4, 3)).astype(np.float32)
        ours = diffusion.p_sample(
            schedule,
            jnp.asarray(output),
            jnp.asarray(x_t),
            jnp.full((2,), t, jnp.int32),
            jnp.asarray(noise),
            parameterization=d.parameterization,
            variance=d.variance,
            clip_x0=d.clip_x0,
        )
        drawn = nchw(noise)
        monkeypatch.setattr(
            diffusers.schedulers.scheduling_ddpm, "randn_tensor", lambda *a, d=drawn, **k: d
        )
        theirs = scheduler.step(nchw(output), t, nchw(x_t)).prev_sample.numpy()
        # diffusers recomputes beta_t = 1 - alpha_bar_t / alpha_bar_{t-1} from float32
        # alpha_bars: a few ulps of 1 (2**-24) absolute, a relative error of ~2**-22 / beta_t
        # in the step's coefficients and variance (0.2% at beta_1 = 1.2e-4 on the linear
        # schedule, 4.5e-4 absolute measured at t = 1 on O(1) values). Elsewhere: float32
        # round-off through different formulas (1/sqrt(alpha_bar_t) ~ 160 at t = 999).
        beta = float(schedule.betas[t])
        np.testing.assert_allclose(
            np.asarray(ours),
            theirs.transpose(0, 2, 3, 1),
            rtol=0,
            atol=1e-4 + 2.0**-22 / beta * np.max(np.abs(x_t)),
            err_msg=f"{t=}",
        )


@pytest.fixture(scope="module")
def tiny_release(tmp_path_factory):
    """A two-level model in the releases' conventions with a 10-step cosine scheduler, saved in
    the hub layout: the smallest network for the tests that compile a sampler."""
    folder = tmp_path_factory.mktemp("tiny_release")
    scheduler = {**DDPM_SCHEDULER, "beta_schedule": "squaredcos_cap_v2", "num_train_timesteps": 10}
    unet = {
        **small(CIFAR10, size=8, channels=(8, 8)),
        "down_block_types": ["DownBlock2D", "AttnDownBlock2D"],
        "up_block_types": ["AttnUpBlock2D", "UpBlock2D"],
    }
    model = save_hub(folder, unet, scheduler, seed=3)
    return folder, model, scheduler


def test_ddpm_sampling_matches_diffusers_step(tiny_release, monkeypatch):
    folder, model, scheduler_config = tiny_release
    config, params, shape = convert(folder)
    net = config_lib.build_model(config, shape, None)
    schedule = config_lib.build_schedule(config)
    key, batch = jax.random.key(7), (2, *shape)

    def model_fn(params, x, t):
        return net.apply({"params": params}, x, t)

    ours = samplers.sample(model_fn, params, schedule, key, batch, method="ddpm", clip_x0=True)
    # diffusers' DDPMPipeline loop, fed the noise our sampler drew: x_T is step 0's, the k-th
    # update (k = 0..T-1) adds step k + 1's (none at t = 0).
    noise = [nchw(np.array(step_noise(key, k, batch))) for k in range(schedule.num_timesteps + 1)]
    drawn = iter(noise[1:])
    monkeypatch.setattr(
        diffusers.schedulers.scheduling_ddpm, "randn_tensor", lambda *a, **k: next(drawn)
    )
    scheduler = diffusers.DDPMScheduler(**scheduler_config)
    scheduler.set_timesteps(scheduler_config["num_train_timesteps"])
    image = noise[0]
    with torch.no_grad():
        for t in scheduler.timesteps:
            output = model(image, t).sample
            image = scheduler.step(output, t, image).prev_sample
    theirs = image.numpy().transpose(0, 2, 3, 1)
    assert np.std(theirs) > 0.1
    # Ten steps, each ~1e-7 relative per network call, amplified at most by 1/sqrt(alpha_t).
    np.testing.assert_allclose(np.asarray(ours), theirs, rtol=0, atol=1e-4)


def test_cli_workdir_samples_with_sample_py(tiny_release, tmp_path, capsys):
    folder, _, _ = tiny_release
    out = tmp_path / "workdir"
    assert convert_cli.main(["diffusers", "--src", str(folder), "--out", str(out)]) == 0
    assert f"wrote {out}" in capsys.readouterr().out
    info = json.loads((out / "data_info.json").read_text())
    assert info == {"kind": "image", "shape": [8, 8, 3], "num_classes": None}
    samples = tmp_path / "samples"
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    result = subprocess.run(
        [sys.executable, os.path.join(REPO, "sample.py"), "--workdir", str(out)]
        + ["--method", "ddpm", "--steps", "10", "--num", "2", "--out", str(samples)],
        capture_output=True,
        text=True,
        env=env,
        cwd=str(tmp_path),
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    images = np.load(samples / "samples.npz")["images"]
    assert images.shape == (2, 8, 8, 3) and images.dtype == np.uint8
    # The same workdir again: refused, not overwritten.
    assert convert_cli.main(["diffusers", "--src", str(folder), "--out", str(out)]) == 2
    assert "exists and is not empty" in capsys.readouterr().err


@pytest.mark.parametrize(
    "field, value",
    [
        ("center_input_sample", True),
        ("time_embedding_type", "fourier"),
        ("class_embed_type", "timestep"),
        ("num_class_embeds", 0),
        ("down_block_types", ["DownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D", "DownBlock2D"]),
        ("up_block_types", ["UpBlock2D", "UpBlock2D", "UpBlock2D", "UpBlock2D"]),
        ("block_out_channels", [128, 192, 256, 256]),
        ("downsample_padding", 2),
        ("attention_head_dim", 48),
        ("some_future_field", 1),
    ],
)
def test_unrepresentable_config_field_is_named(tmp_path, capsys, field, value):
    unet = tmp_path / "unet"
    unet.mkdir()
    (unet / "config.json").write_text(json.dumps({**CIFAR10, field: value}))
    code = convert_cli.main(["diffusers", "--src", str(tmp_path), "--out", str(tmp_path / "w")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and err.startswith("error: ")
    assert f"config field {field} = " in err
    assert not (tmp_path / "w").exists()


def test_unrepresentable_scheduler_field_is_named():
    for field, value in [
        ("variance_type", "learned"),
        ("thresholding", True),
        ("beta_schedule", "laplace"),
    ]:
        with pytest.raises(ValueError, match=f"config field {field} = "):
            from_diffusers.build_config(small(CIFAR10), {**DDPM_SCHEDULER, field: value})
    with pytest.raises(ValueError, match="config field out_channels = 3"):
        from_diffusers.build_config(small(CIFAR10), {"variance_type": "learned_range"})


def test_mismatched_state_dict_names_the_key(tiny_release):
    folder, model, _ = tiny_release
    config, _, shape = convert(folder)
    state = {k: v.numpy() for k, v in model.state_dict().items()}
    key = "down_blocks.1.attentions.0.to_q.weight"
    missing = {k: v for k, v in state.items() if k != key}
    with pytest.raises(ValueError, match="no key for parameter down1_attn0/q/kernel"):
        from_diffusers.convert_state_dict(missing, config, shape)
    extra = {**state, "down_blocks.1.attentions.1.to_q.weight": state[key]}
    with pytest.raises(ValueError, match=r"key down_blocks\.1\.attentions\.1\.to_q\.weight has no"):
        from_diffusers.convert_state_dict(extra, config, shape)
    wrong = copy.copy(state)
    wrong["conv_in.weight"] = np.zeros((8, 1, 3, 3), np.float32)
    with pytest.raises(ValueError, match=r"key conv_in\.weight has shape \(8, 1, 3, 3\)"):
        from_diffusers.convert_state_dict(wrong, config, shape)
    with pytest.raises(ValueError, match=r"key time_embedding\.cond_proj\.weight has no place"):
        from_diffusers.convert_state_dict(
            {**state, "time_embedding.cond_proj.weight": state[key]}, config, shape
        )


def test_explicit_betas_are_checked():
    config = from_diffusers.build_config(
        small(CIFAR10),
        {"beta_schedule": "scaled_linear", "beta_start": 0.001, "num_train_timesteps": 20},
    )
    assert len(config.diffusion.betas) == 20
    config.diffusion.betas = config.diffusion.betas[:-1]
    with pytest.raises(ValueError, match=r"config\.diffusion\.betas must be None or a list of"):
        config_lib.validate_config(config)
    config.diffusion.betas = [0.5] * 19 + [1.5]
    with pytest.raises(ValueError, match=r"config.diffusion.betas is not valid: .* \[19\]"):
        config_lib.validate_config(config)


def test_class_embeddings_take_a_null_label():
    unet = {**small(CIFAR10, size=16), "num_class_embeds": 3}
    config = from_diffusers.build_config(unet, DDPM_SCHEDULER)
    assert config.model.class_conditional
    table = randomise(diffusers.UNet2DModel(**unet)).state_dict()
    state = {k: v.numpy() for k, v in table.items()}
    rows = state["class_embedding.weight"]
    assert from_diffusers.num_classes(3, "append") == 3
    appended = from_diffusers.convert_state_dict(state, config, (16, 16, 3), num_classes=3)
    np.testing.assert_array_equal(appended["label_embed"]["embedding"][:3], rows)
    assert not np.any(appended["label_embed"]["embedding"][3])  # the null label adds nothing
    # A to-diffusers export stores our null label as its last row: --null_label last.
    assert from_diffusers.num_classes(3, "last") == 2
    last = from_diffusers.convert_state_dict(state, config, (16, 16, 3), num_classes=2)
    np.testing.assert_array_equal(last["label_embed"]["embedding"], rows)
    with pytest.raises(ValueError, match="config field num_class_embeds = 1"):
        from_diffusers.num_classes(1, "last")
    with pytest.raises(ValueError, match=r"state dict key class_embedding\.weight has shape"):
        from_diffusers.convert_state_dict(state, config, (16, 16, 3), num_classes=5)
