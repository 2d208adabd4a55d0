"""Tests of the U-Net, the shared layers and the model glue (``make_model_fn``, ``get_model``).

Kept fast on 2 CPU cores: tiny networks (ch=8, GroupNorm(4), 8x8 inputs); shapes and parameter
counts through ``jax.eval_shape`` (no compilation); parameters drawn on the host with NumPy
instead of a compiled ``init``. The drawn parameters are generic (no zero-initialised output
layer), so outputs, label effects and gradients are non-trivial.
"""

import math

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax import diffusion, losses, schedules
from diffusion_jax.models import UNet, get_model, make_model_fn, timestep_embedding
from diffusion_jax.models.layers import GroupNorm, avg_pool_2x, upsample_nearest_2x
from diffusion_jax.models.unet import AttnBlock
from diffusion_jax.train import config as config_lib

TINY = dict(
    ch=8,
    ch_mult=(1, 2),
    num_res_blocks=1,
    attn_resolutions=(4,),
    dropout=0.0,
    out_channels=3,
    num_groups=4,
)


def rbg_key(seed):
    """A key for compiled tests: XLA:CPU compiles rbg's generator ~2x faster than threefry's."""
    return jax.random.key(seed, impl="rbg")


def compile_for_test(fn, *args):
    """``jax.jit(fn)`` compiled for ``args`` with XLA's LLVM optimisation off.

    These tests check values, not speed, and XLA:CPU then compiles a U-Net gradient ~40%
    faster. The result is called with arguments shaped like ``args``.
    """
    return jax.jit(fn).lower(*args).compile({"xla_backend_optimization_level": 0})


def random_params(model, *args, seed=0, **kwargs):
    """Generic parameters for ``model`` drawn on the host: no XLA compile of ``init``."""
    shapes = jax.eval_shape(model.init, jax.random.key(0), *args, **kwargs)["params"]
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        values = rng.standard_normal(leaf.shape)
        name = path[-1].key
        if name == "scale":
            values = 1.0 + 0.1 * values
        elif name == "bias":
            values = 0.1 * values
        elif name == "kernel":
            values = values / math.sqrt(math.prod(leaf.shape[:-1]))
        return jnp.asarray(values, leaf.dtype)

    return jax.tree_util.tree_map_with_path(draw, shapes)


def inputs(batch=2, size=8, channels=3, seed=0):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.standard_normal((batch, size, size, channels)), jnp.float32)
    t = jnp.asarray(rng.integers(0, 1000, batch), jnp.int32)
    return x, t


def count(tree):
    return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(tree))


# ---------------------------------------------------------------------------------- layers


def test_timestep_embedding_matches_float64_reference():
    t = np.array([0, 1, 17, 999])
    dim = 10
    half = dim // 2
    freqs = np.exp(-np.log(10000.0) * np.arange(half) / (half - 1))
    args = t[:, None].astype(np.float64) * freqs[None]
    expected = np.concatenate([np.sin(args), np.cos(args)], axis=1)
    got = timestep_embedding(jnp.asarray(t, jnp.int32), dim)
    chex.assert_type(got, jnp.float32)
    # float32 arguments up to 999 rad: absolute error ~ 999 * 2**-24 per unit of frequency.
    chex.assert_trees_all_close(got, expected, rtol=1e-7, atol=1e-4)
    chex.assert_shape(timestep_embedding(jnp.array([3]), 7), (1, 7))


def test_resampling_matches_reference_ops():
    x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 4, 6, 3)), jnp.float32)
    resized = jax.image.resize(x, (2, 8, 12, 3), "nearest")
    chex.assert_trees_all_equal(upsample_nearest_2x(x), resized)
    expected = x.reshape(2, 2, 2, 3, 2, 3).mean(axis=(2, 4))
    chex.assert_trees_all_close(avg_pool_2x(x), expected, rtol=1e-6)


@pytest.mark.parametrize("shape, groups", [((2, 4, 6, 8), 4), ((3, 5, 6), 6)])
def test_group_norm_matches_flax(shape, groups):
    rng = np.random.default_rng(0)
    x = jnp.asarray(3.0 + 2.0 * rng.standard_normal(shape), jnp.float32)  # mean far from 0
    params = {
        "scale": jnp.asarray(1 + 0.1 * rng.standard_normal(shape[-1]), jnp.float32),
        "bias": jnp.asarray(0.1 * rng.standard_normal(shape[-1]), jnp.float32),
    }
    reference = nn.GroupNorm(num_groups=groups, epsilon=1e-6, dtype=jnp.float32)
    ours = GroupNorm(num_groups=groups, epsilon=1e-6)
    key = jax.random.key(0)
    assert jax.tree.structure(jax.eval_shape(ours.init, key, x)) == jax.tree.structure(
        jax.eval_shape(reference.init, key, x)
    )

    @jax.jit
    def normalise(params, x):
        variables = {"params": params}
        return (
            reference.apply(variables, x),
            ours.apply(variables, x),
            ours.apply(variables, x.astype(jnp.bfloat16)),
        )

    expected, got, got16 = normalise(params, x)
    chex.assert_trees_all_close(got, expected, rtol=1e-7, atol=2e-5)
    chex.assert_type(got16, jnp.float32)
    # bf16 input: 2**-9 of |x| ~ 5.
    chex.assert_trees_all_close(got16, expected, rtol=1e-7, atol=0.05)
    with pytest.raises(ValueError, match="not divisible"):
        jax.eval_shape(GroupNorm(num_groups=5).init, key, x)


# ---------------------------------------------------------------------------------- shapes


@pytest.mark.parametrize(
    "overrides, input_shape, out_channels",
    [
        ({}, (2, 8, 8, 3), 3),
        ({"out_channels": 6}, (2, 8, 8, 3), 6),  # learned variance: 2C
        ({"ch_mult": (1, 2, 2), "attn_resolutions": (8,)}, (3, 16, 16, 1), 3),
        ({"attn_resolutions": (8,)}, (2, 16, 8, 3), 3),  # non-square: attention at height 8
        ({"num_res_blocks": 2, "num_heads": 2, "use_scale_shift_norm": True}, (2, 8, 8, 3), 3),
        ({"resblock_updown": True}, (2, 8, 8, 3), 3),
        ({"conv_resample": False, "attn_resolutions": ()}, (2, 8, 8, 3), 3),
        ({"dtype": jnp.bfloat16}, (2, 8, 8, 3), 3),
        ({"remat": True}, (2, 8, 8, 3), 3),
    ],
)
def test_output_shapes(overrides, input_shape, out_channels):
    model = UNet(**{**TINY, **overrides})
    x = jax.ShapeDtypeStruct(input_shape, jnp.float32)
    t = jax.ShapeDtypeStruct(input_shape[:1], jnp.int32)
    out, variables = jax.eval_shape(model.init_with_output, jax.random.key(0), x, t)
    chex.assert_type(jax.tree.leaves(variables), jnp.float32)
    chex.assert_shape(out, (*input_shape[:3], out_channels))
    chex.assert_type(out, jnp.float32)


def test_class_conditional_output_shape():
    model = UNet(**TINY, num_classes=5)
    x, t = inputs()
    variables = jax.eval_shape(model.init, jax.random.key(0), x, t, jnp.array([0, 5]))
    assert variables["params"]["label_embed"]["embedding"].shape == (6, 4 * TINY["ch"])
    assert jax.eval_shape(model.apply, variables, x, t, jnp.array([1, 5])).shape == x.shape


def test_cifar10_ddpm_parameter_count():
    model = UNet(
        ch=128,
        ch_mult=(1, 2, 2, 2),
        num_res_blocks=2,
        attn_resolutions=(16,),
        dropout=0.1,
        out_channels=3,
    )
    x = jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32)
    t = jax.ShapeDtypeStruct((1,), jnp.int32)
    params = jax.eval_shape(model.init, jax.random.key(0), x, t)["params"]
    # Ho et al. (2020) report 35.7M; the reference code's network has exactly 35,746,307.
    assert count(params) == 35_746_307
    assert abs(count(params) - 35.7e6) < 0.1e6
    attention = sorted(name for name in params if "attn" in name)
    assert attention == ["down1_attn0", "down1_attn1", "mid_attn"] + [
        f"up1_attn{i}" for i in range(3)
    ]


# ---------------------------------------------------------------------------------- numerics

# The smallest network for the compile-heavy tests (gradients, init): one level and no
# ResNet block on the way down, so the middle (ResNet, attention, ResNet) and one up-block.
# XLA:CPU compiles GroupNorm backward passes slowly (~0.25 s each), so size matters here.
SMALL = {**TINY, "ch_mult": (1,), "num_res_blocks": 0, "attn_resolutions": ()}


@pytest.fixture(scope="module")
def conditional():
    """A class-conditional network with dropout, generic parameters and a jitted apply."""
    model = UNet(**{**TINY, "dropout": 0.5}, num_classes=3)
    x, t = inputs()
    variables = {"params": random_params(model, x, t, jnp.array([0, 0]))}
    apply = jax.jit(model.apply, static_argnames="train")
    return model, variables, apply


def test_init_is_float32_and_starts_at_zero_output():
    # A real (compiled) init.
    model = UNet(**SMALL, dtype=jnp.bfloat16)
    x, t = inputs()
    out, variables = compile_for_test(model.init_with_output, rbg_key(0), x, t)(rbg_key(0), x, t)
    chex.assert_type(jax.tree.leaves(variables), jnp.float32)
    # DDPM initialises the last layer of every residual branch and the output conv at zero.
    chex.assert_trees_all_equal(out, jnp.zeros_like(out))


def test_deterministic(conditional):
    _, variables, apply = conditional
    x, t = inputs()
    y = jnp.array([0, 1])
    out = apply(variables, x, t, y)
    chex.assert_trees_all_equal(apply(variables, x, t, y), out)
    assert float(jnp.std(out)) > 0.1  # generic parameters give a non-trivial output


def test_dropout_only_in_training_with_a_key(conditional):
    model, variables, apply = conditional
    x, t = inputs()
    y = jnp.array([0, 1])
    key1, key2 = rbg_key(1), rbg_key(2)
    eval_out = apply(variables, x, t, y)
    # train=False ignores a dropout key.
    chex.assert_trees_all_equal(apply(variables, x, t, y, rngs={"dropout": key1}), eval_out)
    train1 = apply(variables, x, t, y, train=True, rngs={"dropout": key1})
    chex.assert_trees_all_equal(
        apply(variables, x, t, y, train=True, rngs={"dropout": key1}), train1
    )
    train2 = apply(variables, x, t, y, train=True, rngs={"dropout": key2})
    assert not np.allclose(train1, eval_out)
    assert not np.allclose(train1, train2)
    with pytest.raises(ValueError, match=r"rngs=\{'dropout': key\}"):
        jax.eval_shape(lambda: model.apply(variables, x, t, y, train=True))
    # Without dropout, training needs no key (and then equals evaluation, by construction).
    jax.eval_shape(lambda: model.clone(dropout=0.0).apply(variables, x, t, y, train=True))


def test_bfloat16_forward_is_finite_and_close_to_float32(conditional):
    model, variables, apply = conditional
    x, t = inputs()
    y = jnp.array([0, 3])
    out32 = apply(variables, x, t, y)
    apply16 = model.clone(dtype=jnp.bfloat16).apply
    out16 = compile_for_test(apply16, variables, x, t, y)(variables, x, t, y)
    chex.assert_type(out16, jnp.float32)
    chex.assert_tree_all_finite(out16)
    # bf16 rounds to 8 significant bits (relative 2**-9 ~ 0.2%) at every layer of ~20, with a
    # bf16 residual stream. Measured over 5 parameter draws: mean error 0.7-1.0% of the
    # output's RMS, max 3-5%. Tolerance: mean < 2% and max < 10% of the RMS.
    rms = float(jnp.sqrt(jnp.mean(out32**2)))
    error = jnp.abs(out16 - out32)
    assert float(jnp.mean(error)) < 0.02 * rms
    assert float(jnp.max(error)) < 0.10 * rms


def primitive_input_dtypes(jaxpr):
    """``(primitive name, input dtypes)`` of every equation, nested jaxprs (remat) included."""
    for eqn in jaxpr.eqns:
        yield eqn.primitive.name, {str(var.aval.dtype) for var in eqn.invars}
        for param in eqn.params.values():
            inner = getattr(param, "jaxpr", param)  # ClosedJaxpr -> Jaxpr
            if hasattr(inner, "eqns"):
                yield from primitive_input_dtypes(inner)


def test_bfloat16_computes_in_bfloat16_with_float32_norms_and_softmax():
    model = UNet(**TINY, dtype=jnp.bfloat16, remat=True)
    x, t = inputs()
    variables = jax.eval_shape(model.init, jax.random.key(0), x, t)
    ops = list(primitive_input_dtypes(jax.make_jaxpr(model.apply)(variables, x, t).jaxpr))
    convs_and_matmuls = [
        dtypes for name, dtypes in ops if name in ("conv_general_dilated", "dot_general")
    ]
    assert len(convs_and_matmuls) > 20 and all(d == {"bfloat16"} for d in convs_and_matmuls)
    # exp: the softmaxes (and the timestep embedding); rsqrt: the GroupNorms.
    float32_ops = [dtypes for name, dtypes in ops if name in ("exp", "rsqrt", "reduce_max")]
    assert len(float32_ops) > 10 and all(d == {"float32"} for d in float32_ops)


def test_class_conditioning_and_null_label(conditional):
    model, variables, apply = conditional
    x, t = inputs()
    conditional_out = apply(variables, x, t, jnp.array([0, 1]))
    mixed = apply(variables, x, t, jnp.array([0, 3]))  # example 1 takes the null label
    chex.assert_trees_all_equal(mixed[0], conditional_out[0])  # labels act per example
    assert not np.allclose(mixed[1], conditional_out[1])
    # An out-of-range label cannot raise under jit; it poisons its own example with NaN.
    bad = apply(variables, x, t, jnp.array([0, 4]))
    assert bool(jnp.all(jnp.isnan(bad[1]))) and bool(jnp.all(jnp.isfinite(bad[0])))
    with pytest.raises(ValueError, match="null label"):
        jax.eval_shape(lambda: model.apply(variables, x, t))
    with pytest.raises(ValueError, match="unconditional"):
        jax.eval_shape(lambda: UNet(**TINY).apply(variables, x, t, jnp.array([0, 1])))


def test_remat_gives_same_output_and_gradients():
    config = {**SMALL, "dropout": 0.3, "use_scale_shift_norm": True}
    model, remat_model = UNet(**config), UNet(**config, remat=True)
    x, t = inputs()
    params = random_params(model, x, t)
    assert jax.tree.structure(params) == jax.tree.structure(random_params(remat_model, x, t))
    rngs = {"dropout": rbg_key(3)}

    def value_and_grads(model):
        def loss(params, x):
            out = model.apply({"params": params}, x, t, train=True, rngs=rngs)
            return jnp.mean(out**2)

        return compile_for_test(jax.value_and_grad(loss, argnums=(0, 1)), params, x)(params, x)

    value, grads = value_and_grads(model)
    remat_value, remat_grads = value_and_grads(remat_model)
    chex.assert_trees_all_close(remat_value, value, rtol=1e-5)
    chex.assert_trees_all_close(remat_grads, grads, rtol=1e-4, atol=1e-6)
    assert float(jnp.max(jnp.abs(grads[1]))) > 0


def test_clear_errors():
    def init(model, x, t):  # traces only: the checks run before any compilation
        return jax.eval_shape(model.init, jax.random.key(0), x, t)

    x, t = inputs(size=10)
    three_levels = UNet(**{**TINY, "ch_mult": (1, 2, 2)})
    with pytest.raises(ValueError, match=r"divisible by 2\*\*\(len\(ch_mult\) - 1\) = 4.*10x10"):
        init(three_levels, x, t)
    x, t = inputs()
    with pytest.raises(ValueError, match=r"num_groups=4.*counts \[6\]"):
        init(UNet(**{**TINY, "ch": 6}), x, t)
    with pytest.raises(ValueError, match="num_heads=3"):
        init(UNet(**TINY, num_heads=3), x, t)
    with pytest.raises(ValueError, match=r"attn_resolutions \(16,\) contains \[16\].*\[8, 4\]"):
        init(UNet(**{**TINY, "attn_resolutions": (16,)}), x, t)
    with pytest.raises(ValueError, match=r"t must have shape \[B\]"):
        init(UNet(**TINY), x, t[:1])
    with pytest.raises(ValueError, match=r"\[B, H, W, C\]"):
        init(UNet(**TINY), x[0], t)


# ---------------------------------------------------------------------------------- glue


def test_make_model_fn_drives_the_core_loss_and_a_reverse_step():
    schedule = schedules.get_schedule("linear", num_timesteps=100)
    model = UNet(**{**SMALL, "dropout": 0.1, "out_channels": 6}, num_classes=2)
    x0, _ = inputs(batch=4, seed=1)
    x0 = jnp.tanh(x0)
    labels = jnp.array([0, 1, 2, 1], jnp.int32)  # 2 is the null label
    params = random_params(model, x0, jnp.zeros(4, jnp.int32), labels)
    train_fn = make_model_fn(model, train=True)
    sample_fn = make_model_fn(model, train=False)

    @jax.value_and_grad
    def loss_and_grads(params, key):
        loss_key, dropout_key = jax.random.split(key)
        loss, _ = losses.training_loss(
            train_fn,
            params,
            schedule,
            x0,
            loss_key,
            variance="learned_range",
            loss_type="hybrid",
            model_kwargs={"y": labels, "rngs": {"dropout": dropout_key}},
        )
        return loss

    key = rbg_key(0)
    loss_and_grads = compile_for_test(loss_and_grads, params, key)
    loss, grads = loss_and_grads(params, key)
    assert np.isfinite(float(loss))
    step = jax.tree.map(lambda p, g: p - 1e-3 * g, params, grads)
    assert float(loss_and_grads(step, key)[0]) < float(loss)  # a small step lowers the loss

    def reverse_step(params, x_t, t, noise):
        output = sample_fn(params, x_t, t, y=labels)
        return diffusion.p_sample(schedule, output, x_t, t, noise, variance="learned_range")

    x_t, _ = inputs(batch=4, seed=2)
    t = jnp.array([99, 50, 1, 0], jnp.int32)
    reverse_step = compile_for_test(reverse_step, step, x_t, t, x_t)
    x_prev = reverse_step(step, x_t, t, jnp.ones_like(x_t))
    chex.assert_equal_shape((x_prev, x_t))
    chex.assert_tree_all_finite(x_prev)
    # At t = 0 the step adds no noise: the same call with other noise agrees there.
    other = reverse_step(step, x_t, t, -jnp.ones_like(x_t))
    chex.assert_trees_all_close(x_prev[3], other[3], rtol=1e-7, atol=1e-6)
    assert not np.allclose(x_prev[0], other[0])


def test_get_model():
    model = get_model("unet", **{**TINY, "ch_mult": [1, 2], "dtype": "bfloat16"})
    assert isinstance(model, UNet) and model.ch_mult == (1, 2) and model.dtype == jnp.bfloat16
    with pytest.raises(ValueError, match="unknown model"):
        get_model("transformer")


# ---------------------------------------------------------------------------------- options
# The options that let the U-Net run published networks (diffusion_jax.convert).


@pytest.mark.parametrize("flip, shift", [(False, 1.0), (True, 0.0), (True, 1.0), (False, 0.5)])
def test_timestep_embedding_flip_and_shift_match_float64_reference(flip, shift):
    t = np.array([0.0, 1.0, 17.0, 999.0, 2.5])
    dim = 12
    half = dim // 2
    freqs = np.exp(-np.log(10000.0) * np.arange(half) / (half - shift))
    args = t[:, None] * freqs[None]
    waves = [np.cos(args), np.sin(args)] if flip else [np.sin(args), np.cos(args)]
    expected = np.concatenate(waves, axis=1)
    got = timestep_embedding(
        jnp.asarray(t, jnp.float32), dim, flip_sin_to_cos=flip, freq_shift=shift
    )
    # As above: float32 arguments up to 999 rad.
    chex.assert_trees_all_close(got, expected, rtol=1e-7, atol=1e-4)


def test_default_options_keep_the_parameter_tree():
    # Old checkpoints must restore: no option adds, removes or reshapes a parameter.
    x, t = inputs()
    shapes = jax.eval_shape(UNet(**TINY).init, jax.random.key(0), x, t)
    for options in (
        {"norm_eps": 1e-5, "downsample_padding": "symmetric", "flip_sin_to_cos": True},
        {"freq_shift": 0.0, "head_dim": 4, "timestep_scale": 0.25},
    ):
        other = jax.eval_shape(UNet(**TINY, **options).init, jax.random.key(0), x, t)
        chex.assert_trees_all_equal_shapes_and_dtypes(other, shapes)
    assert sorted(shapes["params"]) == sorted(
        ["temb_dense0", "temb_dense1", "conv_in", "down0_block0", "down0_downsample"]
        + ["down1_block0", "down1_attn0", "mid_block0", "mid_attn", "mid_block1"]
        + [f"up{level}_block{block}" for level in (0, 1) for block in (0, 1)]
        + ["up1_attn0", "up1_attn1", "up1_upsample", "norm_out", "conv_out"]
    )


def conv3x3_stride2_reference(x, kernel, bias, pad):
    """float64 3x3 stride-2 convolution of ``x`` [B, H, W, C] padded by hand, ``pad`` =
    ((top, bottom), (left, right))."""
    x = np.pad(np.asarray(x, np.float64), ((0, 0), *pad, (0, 0)))
    kernel = np.asarray(kernel, np.float64)
    rows, cols = (x.shape[1] - 3) // 2 + 1, (x.shape[2] - 3) // 2 + 1
    out = np.zeros((x.shape[0], rows, cols, kernel.shape[-1]))
    for i in range(rows):
        for j in range(cols):
            window = x[:, 2 * i : 2 * i + 3, 2 * j : 2 * j + 3, :]
            out[:, i, j] = np.einsum("bhwc,hwco->bo", window, kernel)
    return out + np.asarray(bias, np.float64)


@pytest.mark.parametrize("padding, pad", [("same", (0, 1)), ("symmetric", (1, 1))])
def test_downsample_padding_matches_hand_padded_conv(padding, pad):
    model = UNet(**TINY, downsample_padding=padding)
    x, t = inputs()
    params = random_params(model, x, t)
    _, state = jax.jit(lambda p: model.apply({"params": p}, x, t, capture_intermediates=True))(
        params
    )
    features = state["intermediates"]
    h = features["down0_block0"]["__call__"][0]  # the downsampling conv's input (no attention)
    got = features["down0_downsample"]["__call__"][0]
    conv = params["down0_downsample"]
    expected = conv3x3_stride2_reference(h, conv["kernel"], conv["bias"], (pad, pad))
    chex.assert_shape(got, (2, 4, 4, 8))
    # float32 sums of 72 products of O(1) terms.
    chex.assert_trees_all_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("num_heads, head_dim", [(1, None), (4, None), (7, 2), (1, 4)])
def test_attention_heads_match_float64_reference(num_heads, head_dim):
    channels = 8
    block = AttnBlock(num_heads, num_groups=4, head_dim=head_dim, norm_eps=1e-5)
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 3, 2, channels))
    params = random_params(block, jnp.asarray(x, jnp.float32))
    got = jax.jit(block.apply)({"params": params}, jnp.asarray(x, jnp.float32))
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
    groups = x.reshape(2, 6, 4, 2)
    mean = groups.mean(axis=(1, 3), keepdims=True)
    var = groups.var(axis=(1, 3), keepdims=True)
    normed = ((groups - mean) / np.sqrt(var + 1e-5)).reshape(2, 6, channels)
    normed = normed * p["norm"]["scale"] + p["norm"]["bias"]
    heads = channels // head_dim if head_dim else num_heads
    width = channels // heads
    q, k, v = ((normed @ p[n]["kernel"] + p[n]["bias"]).reshape(2, 6, heads, width) for n in "qkv")
    logits = np.einsum("bqnd,bknd->bnqk", q, k) / np.sqrt(width)
    weights = np.exp(logits - logits.max(-1, keepdims=True))
    weights /= weights.sum(-1, keepdims=True)
    h = np.einsum("bnqk,bknd->bqnd", weights, v).reshape(2, 6, channels)
    expected = x + (h @ p["proj_out"]["kernel"] + p["proj_out"]["bias"]).reshape(x.shape)
    chex.assert_trees_all_close(got, expected, rtol=1e-5, atol=1e-5)
    if head_dim is not None:
        with pytest.raises(ValueError, match="head_dim=3 must divide"):
            jax.eval_shape(block.clone(head_dim=3).apply, {"params": params}, x)


def test_norm_eps_and_timestep_scale():
    x, t = inputs()
    params = random_params(UNet(**TINY), x, t)
    t_even = 2 * (t // 2)

    def run(t, **options):
        return jax.jit(UNet(**TINY, **options).apply)({"params": params}, x, t)

    default = run(t_even)
    assert not np.allclose(run(t_even, norm_eps=0.5), default, atol=1e-3)
    # timestep_scale=0.5 at t is the default network at t / 2 (even t: exact in float32).
    chex.assert_trees_all_close(run(t_even, timestep_scale=0.5), run(t_even // 2), rtol=1e-6)
    assert not np.allclose(run(t_even, timestep_scale=0.5), default, atol=1e-3)


def test_config_passes_the_options_and_refuses_bad_values():
    config = config_lib.default_config()
    options = {
        "norm_eps": 1e-5,
        "downsample_padding": "symmetric",
        "flip_sin_to_cos": True,
        "freq_shift": 0.0,
        "head_dim": 8,
        "timestep_scale": 0.25,
    }
    for name, value in options.items():
        config.model[name] = value
    config_lib.validate_config(config)
    model = config_lib.build_model(config, (8, 8, 1), None)
    assert {name: getattr(model, name) for name in options} == options
    # A config saved before the options existed builds the DDPM network.
    old = config_lib.default_config()
    for name in options:
        del old.model[name]
    defaults = config_lib.build_model(old, (8, 8, 1), None)
    assert (defaults.norm_eps, defaults.downsample_padding, defaults.head_dim) == (
        1e-6,
        "same",
        None,
    )
    for name, value, message in [
        ("downsample_padding", "valid", "downsample_padding = 'valid'"),
        ("head_dim", 0, "head_dim = 0"),
        ("norm_eps", 0.0, "norm_eps = 0.0"),
        ("timestep_scale", -1.0, "timestep_scale = -1.0"),
        ("freq_shift", float("nan"), "freq_shift = nan"),
    ]:
        bad = config_lib.default_config()
        bad.model[name] = value
        with pytest.raises(ValueError, match=f"config.model.{message}"):
            config_lib.validate_config(bad)
