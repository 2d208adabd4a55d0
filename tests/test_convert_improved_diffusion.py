"""Tests of the improved-diffusion importer (``diffusion_jax.convert.from_improved_diffusion``).

improved-diffusion cannot be installed here, so its network is restated in this file from a
reading of its ``unet.py`` and ``nn.py`` (github.com/openai/improved-diffusion):

- :func:`their_state_dict_shapes` enumerates the keys and torch shapes its ``UNetModel``
  constructor creates, following the constructor's own bookkeeping (``ds``,
  ``input_block_chans``, ``TimestepEmbedSequential`` indices);
- :func:`their_forward` is a float64 NumPy forward pass of that network on a state dict in
  torch layout (NCHW), walking the modules the keys describe.

What passes here: the mapping uses every key of the published CIFAR-10 and ImageNet-64 state
dicts exactly once, with every shape matching, and yields exactly the parameter shapes of our
U-Net built from the converted config; on small flag sets (random weights everywhere, including
the layers their init zeroes) our converted U-Net in float32 gives the float64 reference's
output. What it does not prove: that this restatement matches their code where both could be
misread the same way; no published weights or their own code were run.
"""

import json
import math
import os
import shlex
import subprocess
import sys

import jax
import numpy as np
import pytest
import torch
from numpy.lib.stride_tricks import sliding_window_view

from diffusion_jax.convert import __main__ as convert_cli
from diffusion_jax.convert import improved_diffusion_flags as id_flags
from diffusion_jax.convert import improved_diffusion_weights as id_weights
from diffusion_jax.train import config as config_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CIFAR10_FLAGS = (
    "--image_size 32 --num_channels 128 --num_res_blocks 3 --learn_sigma True --dropout 0.3 "
    "--diffusion_steps 4000 --noise_schedule cosine"
)
# Their README's ImageNet-64 flags (num_heads 4 and dropout 0.0 are the defaults, given here).
IMAGENET64_FLAGS = (
    "--image_size 64 --num_channels 128 --num_res_blocks 3 --num_heads 4 --learn_sigma True "
    "--dropout 0.0 --diffusion_steps 4000 --noise_schedule cosine"
)


# --------------------------------------------------------- their network, restated from unet.py


def their_state_dict_shapes(
    image_size,
    num_channels,
    num_res_blocks,
    learn_sigma=False,
    class_cond=False,
    attention_resolutions="16,8",
    use_scale_shift_norm=True,
):
    """``{key: shape}`` of ``UNetModel(...).state_dict()`` as ``script_util.create_model``
    builds it."""
    channel_mult = {32: (1, 2, 2, 2), 64: (1, 2, 3, 4), 256: (1, 1, 2, 2, 4, 4)}[image_size]
    attention_ds = [image_size // int(res) for res in attention_resolutions.split(",")]
    out_channels = 6 if learn_sigma else 3
    emb = 4 * num_channels
    shapes = {}

    def with_bias(name, weight_shape):
        shapes[f"{name}.weight"] = weight_shape
        shapes[f"{name}.bias"] = weight_shape[:1]

    def res_block(name, channels, out):
        with_bias(f"{name}.in_layers.0", (channels,))  # GroupNorm32
        with_bias(f"{name}.in_layers.2", (out, channels, 3, 3))
        with_bias(f"{name}.emb_layers.1", (2 * out if use_scale_shift_norm else out, emb))
        with_bias(f"{name}.out_layers.0", (out,))
        with_bias(f"{name}.out_layers.3", (out, out, 3, 3))
        if out != channels:
            with_bias(f"{name}.skip_connection", (out, channels, 1, 1))

    def attention_block(name, channels):
        with_bias(f"{name}.norm", (channels,))
        with_bias(f"{name}.qkv", (3 * channels, channels, 1))
        with_bias(f"{name}.proj_out", (channels, channels, 1))

    with_bias("time_embed.0", (emb, num_channels))
    with_bias("time_embed.2", (emb, emb))
    if class_cond:
        shapes["label_emb.weight"] = (1000, emb)
    with_bias("input_blocks.0.0", (num_channels, 3, 3, 3))
    input_block_chans, ch, ds, i = [num_channels], num_channels, 1, 1
    for level, mult in enumerate(channel_mult):
        for _ in range(num_res_blocks):
            res_block(f"input_blocks.{i}.0", ch, mult * num_channels)
            ch = mult * num_channels
            if ds in attention_ds:
                attention_block(f"input_blocks.{i}.1", ch)
            input_block_chans.append(ch)
            i += 1
        if level != len(channel_mult) - 1:
            with_bias(f"input_blocks.{i}.0.op", (ch, ch, 3, 3))
            input_block_chans.append(ch)
            ds *= 2
            i += 1
    res_block("middle_block.0", ch, ch)
    attention_block("middle_block.1", ch)
    res_block("middle_block.2", ch, ch)
    j = 0
    for level, mult in list(enumerate(channel_mult))[::-1]:
        for block in range(num_res_blocks + 1):
            layers = [f"output_blocks.{j}.0"]
            res_block(layers[-1], ch + input_block_chans.pop(), num_channels * mult)
            ch = num_channels * mult
            if ds in attention_ds:
                layers.append(f"output_blocks.{j}.{len(layers)}")
                attention_block(layers[-1], ch)
            if level and block == num_res_blocks:
                with_bias(f"output_blocks.{j}.{len(layers)}.conv", (ch, ch, 3, 3))
                ds //= 2
            j += 1
    with_bias("out.0", (ch,))
    with_bias("out.2", (out_channels, num_channels, 3, 3))
    return shapes


def _group_norm(sd, name, x, eps=1e-5, groups=32):
    grouped = x.reshape(x.shape[0], groups, -1)
    mean = grouped.mean(-1, keepdims=True)
    var = grouped.var(-1, keepdims=True)
    x = ((grouped - mean) / np.sqrt(var + eps)).reshape(x.shape)
    expand = (1, -1) + (1,) * (x.ndim - 2)
    return x * sd[f"{name}.weight"].reshape(expand) + sd[f"{name}.bias"].reshape(expand)


def _conv2d(sd, name, x, stride=1):
    weight, bias = sd[f"{name}.weight"], sd[f"{name}.bias"]
    pad = weight.shape[-1] // 2  # their 3x3 convs pad 1 on every side, 1x1 none
    padded = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    windows = sliding_window_view(padded, weight.shape[2:], axis=(2, 3))[:, :, ::stride, ::stride]
    out = np.tensordot(windows, weight, axes=([1, 4, 5], [1, 2, 3]))  # [N, H, W, O]
    return out.transpose(0, 3, 1, 2) + bias[None, :, None, None]


def _conv1x1_1d(sd, name, x):
    return np.einsum("oc,nct->not", sd[f"{name}.weight"][:, :, 0], x) + sd[f"{name}.bias"][:, None]


def _silu(x):
    return x / (1.0 + np.exp(-x))


def _their_res_block(sd, name, x, emb):
    h = _conv2d(sd, f"{name}.in_layers.2", _silu(_group_norm(sd, f"{name}.in_layers.0", x)))
    w, b = sd[f"{name}.emb_layers.1.weight"], sd[f"{name}.emb_layers.1.bias"]
    emb_out = (_silu(emb) @ w.T + b)[:, :, None, None]
    if emb_out.shape[1] == 2 * h.shape[1]:  # use_scale_shift_norm
        scale, shift = np.split(emb_out, 2, axis=1)
        h = _group_norm(sd, f"{name}.out_layers.0", h) * (1 + scale) + shift
    else:
        h = _group_norm(sd, f"{name}.out_layers.0", h + emb_out)
    h = _conv2d(sd, f"{name}.out_layers.3", _silu(h))  # dropout is off at inference
    skip = (
        _conv2d(sd, f"{name}.skip_connection", x) if f"{name}.skip_connection.weight" in sd else x
    )
    return skip + h


def _their_attention(sd, name, x, num_heads):
    b, c, height, width = x.shape
    x = x.reshape(b, c, -1)
    qkv = _conv1x1_1d(sd, f"{name}.qkv", _group_norm(sd, f"{name}.norm", x))
    qkv = qkv.reshape(b * num_heads, -1, qkv.shape[2])
    ch = qkv.shape[1] // 3
    q, k, v = np.split(qkv, 3, axis=1)
    scale = 1 / math.sqrt(math.sqrt(ch))
    logits = np.einsum("bct,bcs->bts", q * scale, k * scale)
    weights = np.exp(logits - logits.max(-1, keepdims=True))
    weights /= weights.sum(-1, keepdims=True)
    h = np.einsum("bts,bcs->bct", weights, v).reshape(b, -1, qkv.shape[2])
    h = _conv1x1_1d(sd, f"{name}.proj_out", h)
    return (x + h).reshape(b, c, height, width)


def _their_block(sd, name, h, emb, num_heads):
    """One TimestepEmbedSequential: its layers are read off the keys under ``name``."""
    layer = 0
    while any(key.startswith(f"{name}.{layer}.") for key in sd):
        prefix = f"{name}.{layer}"
        if f"{prefix}.op.weight" in sd:
            h = _conv2d(sd, f"{prefix}.op", h, stride=2)
        elif f"{prefix}.conv.weight" in sd:
            h = _conv2d(sd, f"{prefix}.conv", h.repeat(2, axis=2).repeat(2, axis=3))
        elif f"{prefix}.qkv.weight" in sd:
            h = _their_attention(sd, prefix, h, num_heads)
        elif f"{prefix}.in_layers.0.weight" in sd:
            h = _their_res_block(sd, prefix, h, emb)
        else:  # input_blocks.0.0, the first conv
            h = _conv2d(sd, prefix, h)
        layer += 1
    return h


def their_forward(sd, x, timesteps, y, num_heads):
    """Their ``UNetModel.forward`` in float64 NumPy.

    Args:
      sd: their state dict (float64 arrays, torch layout).
      x: ``[B, 3, H, W]``.
      timesteps: ``[B]`` what their diffusion feeds the model (already rescaled).
      y: ``[B]`` labels or None.
      num_heads: attention heads.
    """
    model_channels = sd["time_embed.0.weight"].shape[1]
    half = model_channels // 2
    freqs = np.exp(-math.log(10000) * np.arange(half) / half)
    args = timesteps[:, None].astype(np.float64) * freqs[None]
    emb = np.concatenate([np.cos(args), np.sin(args)], axis=-1)
    emb = _silu(emb @ sd["time_embed.0.weight"].T + sd["time_embed.0.bias"])
    emb = emb @ sd["time_embed.2.weight"].T + sd["time_embed.2.bias"]
    if y is not None:
        emb = emb + sd["label_emb.weight"][y]

    def count(prefix):
        return len({key.split(".")[1] for key in sd if key.startswith(prefix + ".")})

    hs, h = [], x
    for i in range(count("input_blocks")):
        h = _their_block(sd, f"input_blocks.{i}", h, emb, num_heads)
        hs.append(h)
    h = _their_block(sd, "middle_block", h, emb, num_heads)
    for j in range(count("output_blocks")):
        h = _their_block(sd, f"output_blocks.{j}", np.concatenate([h, hs.pop()], 1), emb, num_heads)
    h = _silu(_group_norm(sd, "out.0", h))
    return _conv2d(sd, "out.2", h)


def random_state_dict(shapes, seed=0):
    """Generic weights for ``shapes``: fan-in-scaled normals (also where their init puts
    zeros), GroupNorm scales near 1 (the only 1-D ``.weight`` keys), biases near 0."""
    rng = np.random.default_rng(seed)
    sd = {}
    for key, shape in shapes.items():
        values = rng.standard_normal(shape)
        if len(shape) == 1:
            values = 0.1 * values + (1.0 if key.endswith(".weight") else 0.0)
        elif key != "label_emb.weight":
            values = values / math.sqrt(math.prod(shape[1:]))
        sd[key] = values
    return sd


def _flag_kwargs(flags):
    """The subset of flags :func:`their_state_dict_shapes` takes."""
    return dict(
        image_size=flags.image_size,
        num_channels=flags.num_channels,
        num_res_blocks=flags.num_res_blocks,
        learn_sigma=flags.learn_sigma,
        class_cond=flags.class_cond,
        attention_resolutions=flags.attention_resolutions,
        use_scale_shift_norm=flags.use_scale_shift_norm,
    )


def _model(flags):
    config = id_flags.build_config(flags)
    shape = (flags.image_size, flags.image_size, 3)
    num_classes = id_flags.NUM_CLASSES if flags.class_cond else None
    return config, config_lib.build_model(config, shape, num_classes)


def _init_shapes(model, flags):
    x = jax.ShapeDtypeStruct((1, flags.image_size, flags.image_size, 3), np.float32)
    t = jax.ShapeDtypeStruct((1,), np.int32)
    y = jax.ShapeDtypeStruct((1,), np.int32) if flags.class_cond else None
    variables = jax.eval_shape(model.init, jax.random.key(0), x, t, y)
    return jax.tree.map(lambda leaf: leaf.shape, variables["params"])


# ----------------------------------------------------------------------------------- the flags


def test_flag_defaults_are_script_utils():
    # model_and_diffusion_defaults() of improved_diffusion/script_util.py, copied by hand.
    theirs = dict(
        image_size=64,
        num_channels=128,
        num_res_blocks=2,
        num_heads=4,
        num_heads_upsample=-1,
        attention_resolutions="16,8",
        dropout=0.0,
        learn_sigma=False,
        sigma_small=False,
        class_cond=False,
        diffusion_steps=1000,
        noise_schedule="linear",
        timestep_respacing="",
        use_kl=False,
        predict_xstart=False,
        rescale_timesteps=True,
        rescale_learned_sigmas=True,
        use_checkpoint=False,
        use_scale_shift_norm=True,
    )
    flags = id_flags.parse_flags("")
    for name, value in theirs.items():
        assert getattr(flags, name) == value and type(getattr(flags, name)) is type(value), name
    assert flags.channel_mult == (1, 2, 3, 4)


def test_flag_syntax_follows_their_argparse():
    flags = id_flags.parse_flags(
        "--image_size=32 --learn_sigma yes --class_cond T --use_scale_shift_norm 0 "
        "--dropout 0.3 --num_heads 1 --num_heads 2 --attention_resolutions '16'"
    )
    assert (flags.image_size, flags.learn_sigma, flags.class_cond) == (32, True, True)
    assert (flags.use_scale_shift_norm, flags.dropout, flags.num_heads) == (False, 0.3, 2)
    # Attention at their downsampling factor 32 // 16 = 2: level 1, our 16x16 feature maps.
    assert flags.attention_levels == (1,)
    assert id_flags.model_fields(flags)["attn_resolutions"] == (16,)


@pytest.mark.parametrize(
    "text, named",
    [
        ("--image_size 32 --lr 1e-4", "--lr"),
        ("--image 32", "--image"),
        ("--image_size 48", "--image_size"),
        ("--image_size 32.0", "--image_size"),
        ("--learn_sigma maybe", "--learn_sigma"),
        ("--num_heads_upsample 1", "--num_heads_upsample"),
        ("--timestep_respacing 250", "--timestep_respacing"),
        ("--noise_schedule sqrt", "--noise_schedule"),
        ("--diffusion_steps 20", "--diffusion_steps"),
        ("--num_channels 100", "--num_channels"),
        ("--num_channels 96 --num_heads 5", "--num_heads"),
        ("--attention_resolutions 16,x", "--attention_resolutions"),
        ("--dropout 1.5", "--dropout"),
        ("--image_size", "--image_size"),
        ("image_size 32", "image_size"),
    ],
)
def test_bad_flags_are_one_line_naming_the_flag(text, named):
    with pytest.raises(ValueError) as error:
        id_flags.parse_flags(text)
    message = str(error.value)
    assert named in message and "\n" not in message


def test_diffusion_from_flags():
    def fields(text):
        return id_flags.diffusion_fields(id_flags.parse_flags(text))

    hybrid = fields(CIFAR10_FLAGS)
    assert (hybrid["schedule"], hybrid["num_timesteps"]) == ("cosine", 4000)
    assert (hybrid["variance"], hybrid["loss_type"], hybrid["parameterization"]) == (
        "learned_range",
        "hybrid",
        "eps",
    )
    vlb = fields(CIFAR10_FLAGS + " --use_kl True --schedule_sampler loss-second-moment")
    assert (vlb["loss_type"], vlb["timestep_sampler"]) == ("vlb", "loss_second_moment")
    fixed = fields("--predict_xstart True --sigma_small True")
    assert (fixed["variance"], fixed["loss_type"], fixed["parameterization"]) == (
        "fixed_small",
        "simple",
        "x0",
    )
    assert fields("")["variance"] == "fixed_large"
    assert id_flags.model_fields(id_flags.parse_flags(CIFAR10_FLAGS))["timestep_scale"] == 0.25
    flags = id_flags.parse_flags(CIFAR10_FLAGS + " --rescale_timesteps False")
    assert id_flags.model_fields(flags)["timestep_scale"] == 1.0


def _their_betas(name, steps):
    """gaussian_diffusion.get_named_beta_schedule, restated."""
    if name == "linear":
        scale = 1000 / steps
        return np.linspace(scale * 0.0001, scale * 0.02, steps, dtype=np.float64)

    def alpha_bar(t):
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    return np.array(
        [min(1 - alpha_bar((i + 1) / steps) / alpha_bar(i / steps), 0.999) for i in range(steps)]
    )


@pytest.mark.parametrize("name, steps", [("cosine", 4000), ("linear", 4000), ("linear", 1000)])
def test_schedule_equals_theirs(name, steps):
    config = id_flags.build_config(
        id_flags.parse_flags(f"--image_size 32 --noise_schedule {name} --diffusion_steps {steps}")
    )
    schedule = config_lib.build_schedule(config)
    theirs = _their_betas(name, steps)
    # Our tables are float32 copies of float64 betas; theirs rounded to float32 must agree.
    np.testing.assert_array_equal(np.asarray(schedule.betas), theirs.astype(np.float32))
    alphas_cumprod = np.cumprod(1.0 - theirs)
    np.testing.assert_allclose(
        np.asarray(schedule.alphas_cumprod), alphas_cumprod, rtol=1e-6, atol=0
    )


# ------------------------------------------------------------------------ published state dicts


@pytest.mark.parametrize("text", [CIFAR10_FLAGS, IMAGENET64_FLAGS], ids=["cifar10", "imagenet64"])
def test_published_state_dict_maps_completely(text):
    flags = id_flags.parse_flags(text)
    theirs = their_state_dict_shapes(**_flag_kwargs(flags))
    # Every key taken exactly once (a second take asserts) with the shape we enumerated.
    assert id_weights.state_dict_shapes(flags) == theirs
    zeros = {key: np.broadcast_to(np.float32(0), shape) for key, shape in theirs.items()}
    params = id_weights.convert_state_dict(zeros, flags)
    config, model = _model(flags)
    assert config.data.name == ("cifar10" if flags.image_size == 32 else "converted")
    converted = jax.tree.map(lambda leaf: leaf.shape, params)
    assert converted == _init_shapes(model, flags)
    their_count = sum(math.prod(shape) for shape in theirs.values())
    assert sum(math.prod(s) for s in jax.tree.leaves(converted, is_leaf=_is_shape)) == their_count


def _is_shape(node):
    return isinstance(node, tuple) and all(isinstance(n, int) for n in node)


SMALL = "--image_size 32 --num_channels 32 --num_res_blocks 1"


@pytest.mark.parametrize(
    "edit, named",
    [
        (lambda sd: sd.pop("middle_block.1.qkv.bias"), "'middle_block.1.qkv.bias'"),
        (lambda sd: sd.update(extra=np.zeros(1)), "'extra'"),
        (
            lambda sd: sd.update({"out.2.weight": np.zeros((6, 32, 3, 3))}),
            "'out.2.weight' has shape (6, 32, 3, 3)",
        ),
    ],
    ids=["missing", "unused", "shape"],
)
def test_mismatched_state_dict_is_one_line_naming_the_key(edit, named):
    flags = id_flags.parse_flags(SMALL)
    sd = {
        k: np.zeros(s, np.float32)
        for k, s in their_state_dict_shapes(**_flag_kwargs(flags)).items()
    }
    edit(sd)
    with pytest.raises(ValueError) as error:
        id_weights.convert_state_dict(sd, flags)
    assert named in str(error.value) and "\n" not in str(error.value)


def test_flags_of_another_checkpoint_are_refused():
    sd = {k: np.zeros(s, np.float32) for k, s in their_state_dict_shapes(32, 32, 1).items()}
    with pytest.raises(ValueError, match="check --flags"):
        id_weights.convert_state_dict(sd, id_flags.parse_flags(SMALL + " --learn_sigma True"))


# ---------------------------------------------------------------------------- numerical check

NUMERIC_FLAGS = [
    # FiLM conditioning, two heads, class labels, learned variance, t * 1000 / T.
    "--image_size 32 --num_channels 32 --num_res_blocks 1 --num_heads 2 --learn_sigma True "
    "--class_cond True --diffusion_steps 4000 --noise_schedule cosine",
    # Additive conditioning, one head, attention at one level only (the upsampling conv then
    # sits at index 1 or 2), timesteps fed unscaled.
    "--image_size 32 --num_channels 32 --num_res_blocks 1 --num_heads 1 "
    "--use_scale_shift_norm False --attention_resolutions 8 --rescale_timesteps False",
]


@pytest.mark.parametrize("text", NUMERIC_FLAGS, ids=["film-heads2-cond", "additive-heads1"])
def test_converted_unet_matches_float64_reference(text):
    flags = id_flags.parse_flags(text)
    sd = random_state_dict(their_state_dict_shapes(**_flag_kwargs(flags)), seed=1)
    params = id_weights.convert_state_dict(sd, flags)
    if flags.class_cond:  # their 1000 rows, then our null label: zeros (never trained)
        table = params["label_embed"]["embedding"]
        np.testing.assert_array_equal(table[:1000], np.float32(sd["label_emb.weight"]))
        np.testing.assert_array_equal(table[1000:], np.zeros((1, table.shape[1])))
    _, model = _model(flags)
    rng = np.random.default_rng(2)
    x = rng.standard_normal((2, 3, 32, 32))
    t = np.array([0, flags.diffusion_steps - 1])
    y = np.array([7, 999]) if flags.class_cond else None
    scale = 1000.0 / flags.diffusion_steps if flags.rescale_timesteps else 1.0
    want = their_forward(sd, x, t * scale, y, flags.num_heads)
    args = ({"params": params}, np.float32(x.transpose(0, 2, 3, 1)), np.int32(t))
    args += (None if y is None else np.int32(y),)
    # Values, not speed: XLA's LLVM optimisation off compiles the U-Net faster.
    got = jax.jit(model.apply).lower(*args).compile({"xla_backend_optimization_level": 0})(*args)
    got = np.asarray(got, np.float64).transpose(0, 3, 1, 2)
    assert got.shape == want.shape == (2, flags.out_channels, 32, 32)
    # float32 against float64 through ~40 layers whose activations stay O(1): rounding grows
    # to ~1e-5 of the output's scale; a layout error (a transposed kernel, a swapped head,
    # [sin, cos], the wrong padding) moves the output by O(1).
    error = np.max(np.abs(got - want)) / np.max(np.abs(want))
    assert error < 1e-4, error


# ---------------------------------------------------------------------------- the command line

CLI_FLAGS = (
    "--image_size 32 --num_channels 32 --num_res_blocks 1 --num_heads 2 --learn_sigma True "
    "--class_cond True --diffusion_steps 4000 --noise_schedule cosine"
)


def test_cli_converts_a_torch_checkpoint_that_sample_py_samples(tmp_path, capsys):
    flags = id_flags.parse_flags(CLI_FLAGS)
    sd = random_state_dict(their_state_dict_shapes(**_flag_kwargs(flags)), seed=3)
    src = tmp_path / "model.pt"
    torch.save({k: torch.from_numpy(v).float() for k, v in sd.items()}, src)
    out = tmp_path / "workdir"
    argv = ["improved-diffusion", "--src", str(src), "--flags", CLI_FLAGS, "--out", str(out)]
    assert convert_cli.main(argv) == 0
    assert f"wrote {out}" in capsys.readouterr().out
    info = json.loads((out / "data_info.json").read_text())
    assert info == {"kind": "image", "shape": [32, 32, 3], "num_classes": 1000}
    config = json.loads((out / "config.json").read_text())
    # Class-conditional (ImageNet's 1000 classes): not CIFAR-10, so no evaluation data named.
    assert config["model"]["timestep_scale"] == 0.25 and config["data"]["name"] == "converted"
    assert config["diffusion"]["num_timesteps"] == 4000
    assert json.loads((out / "converted_from.json").read_text())["flags"] == CLI_FLAGS
    samples = tmp_path / "samples"
    result = subprocess.run(
        [sys.executable, os.path.join(REPO, "sample.py"), "--workdir", str(out)]
        + shlex.split(f"--method ddpm --steps 3 --num 2 --labels 5 --out {samples}"),
        capture_output=True,
        text=True,
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
        cwd=str(tmp_path),
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    images = np.load(samples / "samples.npz")["images"]
    assert images.shape == (2, 32, 32, 3) and images.dtype == np.uint8


@pytest.mark.parametrize(
    "write, flags, named",
    [
        (lambda path: path.write_text("not a checkpoint"), SMALL, "--src"),
        (lambda path: torch.save([torch.zeros(1)], path), SMALL, "--src"),
        (lambda path: torch.save({"time_embed.0.weight": torch.zeros(1)}, path), SMALL, "key"),
        (lambda path: path.write_text(""), "--lr 1e-4", "--lr"),
    ],
    ids=["not-torch", "not-a-dict", "wrong-dict", "train-flag"],
)
def test_cli_refusals_are_one_error_line(tmp_path, capsys, write, flags, named):
    src = tmp_path / "model.pt"
    write(src)
    argv = ["improved-diffusion", "--src", str(src), "--flags", flags, "--out", str(tmp_path / "w")]
    assert convert_cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and named in err and "\n" not in err
    assert not (tmp_path / "w").exists()
