"""Export to diffusers (``diffusion_jax.convert.to_diffusers``): what diffusers loads computes
what our U-Net computes, its scheduler has our tables, and what it cannot represent is refused.

The reference is diffusers itself, run in float64 (``UNet2DModel.double()``): our float32 U-Net
must match it to 1e-5 of the output's largest magnitude. Float32 rounds each operation to 6e-8
relative; a forward pass of these tiny U-Nets chains a few dozen normalised layers (sums of at
most a few hundred terms), which measured errors of ~1e-6; 1e-5 leaves a margin while a wrong
mapping (a transposed kernel, a swapped half, a wrong epsilon or padding) errs by 1e-3 or more.
"""

from __future__ import annotations

import argparse
import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import safetensors.numpy
import trainer_helpers as h

from diffusion_jax import samplers
from diffusion_jax.convert import __main__ as convert_main
from diffusion_jax.convert import diffusers_export_config as export_config
from diffusion_jax.convert import from_diffusers, to_diffusers
from diffusion_jax.models import make_model_fn
from diffusion_jax.train import checkpoint as checkpoint_lib
from diffusion_jax.train import config as config_lib

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

RTOL = 1e-5  # of the largest output magnitude; see the module docstring


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """Torch on one thread: the suite shares two cores, and these models are tiny."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_config(image_size: int = 16, **overrides) -> ml_collections.ConfigDict:
    """A default config with a tiny three-level U-Net (attention at the middle level) and
    ``overrides`` (``model__x=v`` sets ``model.x``)."""
    config = config_lib.default_config()
    config.data.image_size = image_size
    config.diffusion.num_timesteps = 100
    m = config.model
    m.ch, m.ch_mult, m.num_res_blocks, m.attn_resolutions = 16, (1, 2, 2), 1, (8,)
    m.num_groups, m.dropout = 4, 0.0
    return h.apply_overrides(config, {k.replace("__", "."): v for k, v in overrides.items()})


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
            return noise / np.float32(np.sqrt(np.prod(leaf.shape[:-1])))
        return 1 + np.float32(0.1) * noise if name == "scale" else np.float32(0.1) * noise

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
    # improved-diffusion's network options: symmetric padding, [cos, sin] embedding without the
    # frequency shift, GroupNorm epsilon 1e-5, heads of a fixed width.
    "improved": (
        {
            "model__downsample_padding": "symmetric",
            "model__flip_sin_to_cos": True,
            "model__freq_shift": 0.0,
            "model__norm_eps": 1e-5,
            "model__head_dim": 8,
        },
        None,
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


@pytest.mark.parametrize(
    "diffusion",
    [
        # v prediction, learned variance, clipping, betas capped by the scaling to T = 10
        # (exported as trained_betas).
        {"parameterization": "v", "variance": "learned_range", "schedule": "linear"},
        # eps prediction, fixed variance, no clipping, the cosine schedule by name.
        {"parameterization": "eps", "variance": "fixed_small", "clip_x0": False},
    ],
    ids=["v_learned", "eps_fixed"],
)
def test_ddpm_sampling_matches_diffusers(tmp_path, monkeypatch, diffusion):
    """Our ancestral sampler and diffusers' DDPMScheduler, run on the exported model with the
    same noise, give the same images: the scheduler config carries the parameterisation, the
    variance, the clipping and the schedule. Both run in float32 here (the network's float64
    comparison is above); over 10 steps the two roundings differ by ~1e-5 of the samples'
    scale (measured), so 1e-4 holds with a margin.
    """
    num_timesteps = 10
    config = tiny_config(
        model__attn_resolutions=(4,),
        diffusion__num_timesteps=num_timesteps,
        diffusion__allow_prior_mismatch=True,
        **{f"diffusion__{k}": v for k, v in diffusion.items()},
    )
    if config.diffusion.variance == "learned_range":
        config.diffusion.loss_type = "hybrid"
    model, params = random_params(config, None)
    out = to_diffusers.export(params, config, tmp_path / "out", sample_size=16)
    key, shape = jax.random.key(3), (2, 16, 16, 3)
    ours = samplers.sample(
        make_model_fn(model, train=False),
        params,
        config_lib.build_schedule(config),
        key,
        shape,
        method="ddpm",
        num_steps=num_timesteps,
        parameterization=config.diffusion.parameterization,
        variance=config.diffusion.variance,
        clip_x0=config.diffusion.clip_x0,
    )

    def nchw(x):
        return torch.from_numpy(np.array(x, np.float32).transpose(0, 3, 1, 2))

    # diffusers draws the noise of update k (k = 0, 1, ...) where we draw step k + 1.
    noises = iter(nchw(samplers.step_noise(key, k + 1, shape)) for k in range(num_timesteps))
    monkeypatch.setattr(
        diffusers.schedulers.scheduling_ddpm, "randn_tensor", lambda *a, **k: next(noises)
    )
    unet = load_unet(out).float()
    scheduler = diffusers.DDPMScheduler.from_pretrained(out, subfolder="scheduler")
    scheduler.set_timesteps(num_timesteps)
    assert scheduler.timesteps.tolist() == list(range(num_timesteps))[::-1]
    x = nchw(samplers.step_noise(key, 0, shape))
    with torch.no_grad():
        for t in scheduler.timesteps:
            x = scheduler.step(unet(x, t).sample, t, x).prev_sample
    theirs = x.numpy().transpose(0, 2, 3, 1)
    error = np.max(np.abs(np.asarray(ours, np.float64) - theirs)) / np.max(np.abs(theirs))
    assert error <= 1e-4, error


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
    scheduler = diffusers.DDPMScheduler.from_config(export_config.scheduler_config(config))
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
    fields = export_config.scheduler_config(config)
    assert fields["prediction_type"] == "v_prediction"
    assert fields["variance_type"] == "learned_range"
    assert fields["clip_sample"] is False
    config.diffusion.parameterization, config.diffusion.variance = "x0", "fixed_large"
    fields = export_config.scheduler_config(config)
    assert (fields["prediction_type"], fields["variance_type"]) == ("sample", "fixed_large")


# A model for the round trip with most options away from their defaults; the importer takes
# no class embeddings and no resampling ResNet blocks, so those stay off.
ROUND_TRIP = {
    **MODELS["improved"][0],
    "model__use_scale_shift_norm": True,
    "model__attn_resolutions": (8, 4),
    "diffusion__variance": "learned_range",
    "diffusion__parameterization": "v",
    "diffusion__num_timesteps": 1000,  # DDPM's beta range, which diffusers names exactly
}


def read_export(folder) -> tuple[dict, dict, dict]:
    """(unet config, scheduler config, weights) of an exported folder."""
    with open(folder / "unet" / "config.json") as f:
        unet = json.load(f)
    with open(folder / "scheduler" / "scheduler_config.json") as f:
        scheduler = json.load(f)
    weights = safetensors.numpy.load_file(folder / "unet" / "diffusion_pytorch_model.safetensors")
    return unet, scheduler, weights


def test_round_trip_through_the_importer_and_the_cli(tmp_path, capsys):
    """Ours -> diffusers -> ours (the importer, from_diffusers, writes a workdir) -> diffusers
    again with the command line: the same config and the same parameter bits, and
    ``DDPMPipeline`` loads and runs the result."""
    config = tiny_config(**ROUND_TRIP)
    _, params = random_params(config, None)
    first = tmp_path / "first"
    to_diffusers.export(params, config, first, sample_size=16)
    args = argparse.Namespace(src=str(first), unet=None, scheduler=None, dataset=None)
    args.out = str(tmp_path / "imported")
    workdir = from_diffusers.run(args)

    saved = checkpoint_lib.read_config(os.path.join(workdir, "checkpoints"))
    config_back, expected = ml_collections.ConfigDict(saved), config_lib.config_to_dict(config)
    for field, value in expected["model"].items():
        assert saved["model"][field] == value, field
    for field in ("num_timesteps", "schedule", "parameterization", "variance", "clip_x0"):
        assert config_back.diffusion[field] == config.diffusion[field], field
    np.testing.assert_array_equal(
        config_lib.build_schedule(config_back).betas, config_lib.build_schedule(config).betas
    )

    second = tmp_path / "second"
    argv = ["to-diffusers", "--workdir", workdir, "--out", str(second)]
    assert convert_main.main(argv) == 0
    assert capsys.readouterr().out.strip() == f"wrote {second}"
    (unet1, scheduler1, weights1), (unet2, scheduler2, weights2) = map(read_export, (first, second))
    assert unet2 == unet1 and scheduler2 == scheduler1 and weights2.keys() == weights1.keys()
    # Each exported tensor is one parameter, transposed: equal bits here mean the imported
    # workdir holds our parameters bit for bit.
    for key in weights1:
        np.testing.assert_array_equal(weights2[key], weights1[key], key)

    with open(second / "model_index.json") as f:
        assert json.load(f)["_class_name"] == "DDPMPipeline"
    pipeline = diffusers.DDPMPipeline.from_pretrained(second)
    images = pipeline(
        batch_size=2, num_inference_steps=2, generator=torch.manual_seed(0), output_type="np"
    ).images
    assert images.shape == (2, 16, 16, 3) and np.all((images >= 0) & (images <= 1))

    # A second export into the same folder is refused, naming the flag.
    capsys.readouterr()
    assert convert_main.main(argv) == 2
    error = capsys.readouterr().err
    assert error.startswith("error: --out ") and "not empty" in error and error.count("\n") == 1


def test_cli_exports_the_requested_params(tmp_path):
    config = tiny_config()
    _, ema = random_params(config, None, seed=1)
    _, raw = random_params(config, None, seed=2)
    workdir = write_workdir(tmp_path / "run", config, ema, raw_params=raw)
    out = tmp_path / "raw"
    argv = ["to-diffusers", "--workdir", workdir, "--out", str(out), "--params", "raw"]
    assert convert_main.main(argv) == 0
    _, _, written = read_export(out)
    expected = to_diffusers.unet_state_dict(raw, len(config.model.ch_mult))
    assert written.keys() == expected.keys()
    for key in expected:
        np.testing.assert_array_equal(written[key], expected[key], err_msg=key)


REFUSALS = {
    "model.name": {"model__name": "mlp"},
    "diffusion.formulation": {"diffusion__formulation": "edm"},
    "model.conv_resample": {"model__conv_resample": False},
    "model.timestep_scale": {"model__timestep_scale": 0.25},
    # Two heads of widths 16 (level 0) and 32 (the middle): no single head width.
    "model.num_heads": {"model__num_heads": 2, "model__attn_resolutions": (16,)},
}


@pytest.mark.parametrize("field", list(REFUSALS))
def test_refusals_name_the_field(field):
    config = tiny_config(**REFUSALS[field])
    with pytest.raises(ValueError) as error:
        export_config.check_exportable(config, 16)
    message = str(error.value)
    assert message.startswith(f"config.{field} = ") and "\n" not in message


def test_refuses_a_sample_size_the_parameters_contradict():
    config = tiny_config()
    _, params = random_params(config, None)
    with pytest.raises(ValueError, match=r"^config.data.image_size = 32 .*--sample_size") as error:
        export_config.unet_config(config, params, 32)  # would put attention one level lower
    assert "\n" not in str(error.value)


def test_sample_size_comes_from_the_flag_the_config_or_the_workdir(tmp_path):
    config = tiny_config(image_size=16)
    assert to_diffusers._sample_size(str(tmp_path), config, 32) == 32
    assert to_diffusers._sample_size(str(tmp_path), config, None) == 16
    config.data.image_size, config.data.name = 0, "no_such_dataset"
    with open(tmp_path / "data_info.json", "w") as f:  # as a converted workdir records it
        json.dump({"kind": "image", "shape": [64, 64, 3], "num_classes": None}, f)
    assert to_diffusers._sample_size(str(tmp_path), config, None) == 64
    os.remove(tmp_path / "data_info.json")
    with pytest.raises(ValueError, match=r"^cannot tell the trained image size .*--sample_size"):
        to_diffusers._sample_size(str(tmp_path), config, None)
