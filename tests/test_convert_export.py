"""Export to diffusers (``diffusion_jax.convert.to_diffusers``): what diffusers loads computes
what our U-Net computes, its scheduler has our tables, and what it cannot represent is refused.

The reference is diffusers itself, run in float64 (``UNet2DModel.double()``): our float32 U-Net
must match it to 1e-5 of the output's largest magnitude. Float32 rounds each operation to 6e-8
relative; a forward pass of these tiny U-Nets chains a few dozen normalised layers (sums of at
most a few hundred terms), which measured errors of ~1e-6; 1e-5 leaves a margin while a wrong
mapping (a transposed kernel, a swapped half, a wrong epsilon or padding) errs by 1e-3 or more.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from diffusion_jax.convert import to_diffusers
from diffusion_jax.train import checkpoint as checkpoint_lib
from diffusion_jax.train import config as config_lib

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

RTOL = 1e-5  # of the largest output magnitude; see the module docstring


def tiny_config(image_size: int = 16, **model) -> ml_collections.ConfigDict:
    """A default config with a tiny three-level U-Net (attention at the middle level) and
    ``model`` overrides (``field=value``; ``diffusion__x=v`` sets ``diffusion.x``)."""
    config = config_lib.default_config()
    config.data.image_size = image_size
    config.diffusion.num_timesteps = 100
    m = config.model
    m.ch, m.ch_mult, m.num_res_blocks, m.attn_resolutions = 16, (1, 2, 2), 1, (8,)
    m.num_groups, m.dropout = 4, 0.0
    for key, value in model.items():
        node = config
        *parents, leaf = key.split("__")
        for name in parents:
            node = node[name]
        node[leaf] = value
    return config


def random_params(config, num_classes: int | None, channels: int = 3, seed: int = 0):
    """The config's U-Net and random parameters for it, drawn in NumPy without running ``init``
    (our initialisation zeroes some layers, which would hide their mapping): kernels with
    variance 1 / fan-in, GroupNorm scales near 1, biases and embeddings small."""
    shape = (config.data.image_size, config.data.image_size, channels)
    model = config_lib.build_model(config, shape, num_classes)
    x, t = jnp.zeros((1, *shape)), jnp.zeros((1,), jnp.int32)
    y = None if num_classes is None else jnp.zeros((1,), jnp.int32)
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), x, t, y)["params"])
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        noise = rng.standard_normal(leaf.shape).astype(np.float32)
        name = path[-1].key
        if name == "kernel":
            return noise / np.sqrt(np.prod(leaf.shape[:-1]))
        return 1 + 0.1 * noise if name == "scale" else 0.1 * noise

    return model, jax.tree_util.tree_map_with_path(draw, shapes)


def write_workdir(workdir, config, params, raw_params=None) -> str:
    """A workdir like a trained run's: one checkpoint with raw and EMA params and the config."""
    state = {"params": params if raw_params is None else raw_params, "ema_params": params}
    manager = checkpoint_lib.CheckpointManager(os.path.join(workdir, "checkpoints"))
    with manager:
        manager.save(1, state, config=config_lib.config_to_dict(config))
    return str(workdir)


def load_unet(out):
    """diffusers' UNet2DModel from the export, in float64, checking every weight was used."""
    unet, info = diffusers.UNet2DModel.from_pretrained(
        out, subfolder="unet", output_loading_info=True
    )
    assert not any(info.values()), info  # missing, unexpected, mismatched keys, errors
    return unet.double().eval()


def diffusers_output(unet, x, t, y=None) -> np.ndarray:
    """diffusers' float64 output, NHWC, for NHWC ``x``."""
    sample = torch.from_numpy(np.asarray(x, np.float64).transpose(0, 3, 1, 2))
    labels = None if y is None else torch.from_numpy(np.asarray(y, np.int64))
    with torch.no_grad():
        out = unet(sample, torch.from_numpy(np.asarray(t, np.int64)), class_labels=labels).sample
    return out.numpy().transpose(0, 2, 3, 1)


def assert_close(ours, reference):
    ours, reference = np.asarray(ours, np.float64), np.asarray(reference, np.float64)
    assert ours.shape == reference.shape
    error = np.max(np.abs(ours - reference)) / np.max(np.abs(reference))
    assert error <= RTOL, f"relative error {error:.3g} > {RTOL}"


MODELS = {
    # DDPM's network: one head, additive time embedding, TF "same" padding.
    "ddpm": ({}, None),
    # ADM-style: FiLM conditioning, 2 heads of a fixed count, a learned variance (2C outputs)
    # and classes with the null label.
    "adm_classes": (
        {
            "model__use_scale_shift_norm": True,
            "model__num_heads": 2,
            "model__attn_resolutions": (8, 4),
            "model__ch_mult": (1, 2, 2),
            "model__num_res_blocks": 2,
            "diffusion__variance": "learned_range",
            "model__class_conditional": True,
        },
        5,
    ),
    # BigGAN-style resampling inside ResNet blocks.
    "resblock_updown": ({"model__resblock_updown": True, "model__conv_resample": False}, None),
}


@pytest.mark.parametrize("name", list(MODELS))
def test_export_matches_diffusers(tmp_path, name):
    overrides, num_classes = MODELS[name]
    config = tiny_config(**overrides)
    model, params = random_params(config, num_classes)
    out = to_diffusers.export(params, config, tmp_path / "out", sample_size=16)
    unet = load_unet(out)
    assert unet.config.sample_size == 16
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 16, 16, 3)).astype(np.float32)
    t = np.array([0, 37, 99])
    y = None if num_classes is None else np.array([0, 4, num_classes])  # the last: null label
    ours = jax.jit(model.apply)({"params": params}, x, t, y)
    assert_close(ours, diffusers_output(unet, x, t, y))


SCHEDULES = {
    "linear_1000": {"schedule": "linear", "num_timesteps": 1000},
    "linear_scaled_50": {"schedule": "linear", "num_timesteps": 50},
    "linear_capped_4": {"schedule": "linear", "num_timesteps": 4, "allow_prior_mismatch": True},
    "quadratic": {"schedule": "quadratic", "num_timesteps": 200},
    "sigmoid_literal": {
        "schedule": "sigmoid",
        "num_timesteps": 300,
        "scale_to_num_timesteps": False,
        "allow_prior_mismatch": True,
    },
    "cosine_4000": {"schedule": "cosine", "num_timesteps": 4000},
    "zero_terminal_snr": {
        "schedule": "linear",
        "num_timesteps": 1000,
        "zero_terminal_snr": True,
        "parameterization": "v",
    },
}


@pytest.mark.filterwarnings("ignore:Schedule .* ends at alpha_bar_T:UserWarning")
@pytest.mark.parametrize("name", list(SCHEDULES))
def test_scheduler_tables_equal_ours(name):
    config = tiny_config()
    config.diffusion.update(SCHEDULES[name])
    scheduler = diffusers.DDPMScheduler.from_config(to_diffusers.scheduler_config(config))
    ours = config_lib.build_schedule(config)
    # diffusers' float32 formulas (torch.linspace etc.) give the betas within 4 float32 ulps of
    # ours (float64, rounded to float32). It then forms alpha = 1 - beta and the cumulative
    # product in float32 (we do both in float64), each step adding a relative error of at most
    # 2**-24 (the product's rounding) + 2**-21 beta / alpha (the betas' difference, large only
    # for betas near 1); their sum, plus both tables' final rounding, bounds abar's error.
    betas = np.asarray(ours.betas, np.float64)
    np.testing.assert_allclose(scheduler.betas.numpy(), betas, rtol=2.0**-21, atol=0)
    bound = 2.0**-23 + np.cumsum(2.0**-24 + 2.0**-21 * betas / np.maximum(1 - betas, 1e-30))
    theirs, abar = scheduler.alphas_cumprod.numpy(), np.asarray(ours.alphas_cumprod)
    error = np.abs(theirs / np.where(abar > 0, abar, 1) - 1)
    assert np.all(error[:-1] <= bound[:-1]), np.max(error[:-1] / bound[:-1])
    if config.diffusion.get("zero_terminal_snr", False):
        assert scheduler.alphas_cumprod[-1] == ours.alphas_cumprod[-1] == 0
    else:
        assert error[-1] <= bound[-1]
    assert scheduler.config.num_train_timesteps == config.diffusion.num_timesteps


def test_scheduler_fields():
    config = tiny_config(diffusion__parameterization="v", diffusion__variance="learned_range")
    config.diffusion.clip_x0 = False
    fields = to_diffusers.scheduler_config(config)
    assert fields["prediction_type"] == "v_prediction"
    assert fields["variance_type"] == "learned_range"
    assert fields["clip_sample"] is False
    config.diffusion.parameterization, config.diffusion.variance = "x0", "fixed_large"
    fields = to_diffusers.scheduler_config(config)
    assert (fields["prediction_type"], fields["variance_type"]) == ("sample", "fixed_large")
