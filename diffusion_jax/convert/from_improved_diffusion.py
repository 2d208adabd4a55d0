"""Import OpenAI's improved-diffusion checkpoints (Nichol & Dhariwal 2021) into a workdir.

``python -m diffusion_jax.convert improved-diffusion --src model.pt --flags "..." --out WORKDIR``
reads a ``model.pt`` written by ``github.com/openai/improved-diffusion`` (a PyTorch state dict)
together with the flags it was trained with, exactly as their scripts take them (their
``MODEL_FLAGS`` and ``DIFFUSION_FLAGS``, e.g. ``--image_size 32 --num_channels 128
--num_res_blocks 3 --learn_sigma True --dropout 0.3 --diffusion_steps 4000 --noise_schedule
cosine``), and writes a workdir like a trained run (:func:`diffusion_jax.convert.workdir.
write_workdir`) whose config describes the same network and diffusion.

The flags (``script_util.model_and_diffusion_defaults`` gives each default, kept in
:class:`Flags`): ``--name value`` or ``--name=value``, booleans as their ``str2bool`` reads them
(``true/false``, ``yes/no``, ``t/f``, ``y/n``, ``1/0``), the last of a repeated flag winning;
no abbreviations. ``--schedule_sampler`` (a training flag of theirs, published with the L_vlb
models) sets ``diffusion.timestep_sampler``. Any other flag, or a value their code or ours
cannot represent exactly (``--timestep_respacing``: a sampling choice, give ``sample.py
--steps``; ``--num_heads_upsample`` different from ``--num_heads``; an image size other than
32, 64 or 256), is refused with one line naming the flag.

What maps to what (theirs -> ours; torch weights ``[out, in, kh, kw]`` become Flax ``[kh, kw,
in, out]``, linear and 1x1 weights ``[out, in]`` become ``[in, out]``):

- ``time_embed.0/2`` -> ``temb_dense0/1``; ``label_emb`` (``[1000, 4C]``) -> ``label_embed``
  with one more row, the null label of classifier-free guidance. Their class-conditional
  models were never trained without a label, so that row is **zeros** (the label then adds
  nothing to the time embedding); guidance with it is not the published model's behaviour.
- ``input_blocks.0.0`` -> ``conv_in``; ``input_blocks.{i}.0`` (ResBlock) ->
  ``down{l}_block{b}``, ``input_blocks.{i}.1`` (AttentionBlock) -> ``down{l}_attn{b}``,
  ``input_blocks.{i}.0.op`` -> ``down{l}_downsample``; ``middle_block.0/1/2`` ->
  ``mid_block0``, ``mid_attn``, ``mid_block1``; ``output_blocks.{j}.0/1`` -> ``up{l}_block{b}``,
  ``up{l}_attn{b}``, ``output_blocks.{j}.{1|2}.conv`` -> ``up{l}_upsample``; ``out.0/2`` ->
  ``norm_out``, ``conv_out``.
- ResBlock: ``in_layers.0/2`` -> ``norm1``, ``conv1``; ``emb_layers.1`` -> ``temb_proj``;
  ``out_layers.0/3`` -> ``norm2``, ``conv2``; ``skip_connection`` (a 1x1 conv) -> ``skip``.
- AttentionBlock: ``norm`` -> ``norm``; ``qkv`` (a 1x1 conv1d with ``3C`` outputs laid out per
  head as ``[q, k, v]`` blocks of ``C / heads`` channels) -> ``q``, ``k``, ``v``; ``proj_out``
  -> ``proj_out``.
- The U-Net options: ``norm_eps=1e-5`` (torch's GroupNorm), ``downsample_padding=
  "symmetric"`` (their stride-2 conv pads 1 on every side), ``flip_sin_to_cos=True`` and
  ``freq_shift=0`` (their embedding is ``[cos, sin]`` with frequencies ``10000^(-i / half)``),
  ``timestep_scale = 1000 / T`` with ``--rescale_timesteps True`` (else 1), ``num_heads``,
  ``use_scale_shift_norm``, 32 GroupNorm groups, ``ch_mult`` by image size as their
  ``create_model``, attention where their downsampling factor ``image_size // res`` is listed,
  and ``out_channels = 6`` ordered ``[eps (or x0), variance interpolation]`` with
  ``--learn_sigma True``.
- The diffusion: ``--noise_schedule`` cosine or linear at ``--diffusion_steps`` (our
  ``scale_to_num_timesteps`` linear is their ``1000 / T``-scaled range; the cosine is theirs
  with ``s = 0.008`` and betas capped at 0.999); ``--learn_sigma`` -> ``learned_range``, else
  ``fixed_large`` (``fixed_small`` with ``--sigma_small``); ``--predict_xstart`` -> ``x0``, else
  ``eps``; ``--use_kl`` -> loss ``vlb`` (their RESCALED_KL), else ``hybrid`` with a learned
  variance (their RESCALED_MSE, ``mse + vb * T / 1000``) or ``simple``. With
  ``--rescale_learned_sigmas False`` and a learned variance they train ``mse + vb`` unscaled;
  ours has no such weighting, so the config says ``hybrid`` and the difference matters only
  when training the converted model further (sampling and the bound are unaffected).
  ``config.data.name`` (what the bound and FID evaluate on) is ``--dataset``, by default
  ``cifar10`` for an unconditional 32x32 model, else ``converted``.

Their super-resolution model (``SuperResModel``, flags ``--large_size``/``--small_size``) is
not supported: its flags are refused as unknown.

What the tests (``tests/test_convert_improved_diffusion.py``) prove, and what they do not:
they enumerate, independently of this module and from a reading of their ``unet.py``, every
key and shape of the state dict for the published CIFAR-10 and ImageNet-64 flag sets (52.5M
and 121M parameters), and check that the mapping uses each key exactly once, that every shape
matches, and that the result has exactly the parameter shapes of our U-Net built from the
converted config; that our betas equal their ``get_named_beta_schedule``'s in float32; and, on
small flag sets with random weights, that our converted U-Net's output equals a float64 NumPy
forward pass of their network (written from their ``unet.py``/``nn.py``, run on their
torch-layout state dict) to 1e-4 of its scale. They do **not** run improved-diffusion's own
code (it is not installable here) or its published weights, so a misreading of their code
shared by the mapping and the reference would go unseen.
"""

from __future__ import annotations

import argparse
import dataclasses
import pickle
import shlex
from collections.abc import Mapping
from typing import Any

import ml_collections
import numpy as np

from diffusion_jax.convert import workdir
from diffusion_jax.train import config as config_lib

__all__ = [
    "CHANNEL_MULT",
    "NUM_CLASSES",
    "Flags",
    "add_arguments",
    "build_config",
    "convert_state_dict",
    "load_state_dict",
    "parse_flags",
    "run",
    "state_dict_shapes",
]

NUM_CLASSES = 1000  # their class-conditional models are ImageNet's (script_util.NUM_CLASSES)
NUM_GROUPS = 32  # nn.normalization: GroupNorm32(32, channels)
NORM_EPS = 1e-5  # torch.nn.GroupNorm's default
IN_CHANNELS = 3  # create_model: RGB in, 3 or 6 out
# create_model's channel multipliers, chosen by image size (no other size is accepted).
CHANNEL_MULT: dict[int, tuple[int, ...]] = {
    32: (1, 2, 2, 2),
    64: (1, 2, 3, 4),
    256: (1, 1, 2, 2, 4, 4),
}
SCHEDULE_SAMPLERS = {"uniform": "uniform", "loss-second-moment": "loss_second_moment"}


@dataclasses.dataclass(frozen=True)
class Flags:
    """The flags of improved-diffusion's scripts that define a model and its diffusion, with
    the defaults of ``script_util.model_and_diffusion_defaults`` (and ``schedule_sampler``'s
    of ``image_train.py``)."""

    image_size: int = 64
    num_channels: int = 128
    num_res_blocks: int = 2
    num_heads: int = 4
    num_heads_upsample: int = -1
    attention_resolutions: str = "16,8"
    dropout: float = 0.0
    learn_sigma: bool = False
    sigma_small: bool = False
    class_cond: bool = False
    diffusion_steps: int = 1000
    noise_schedule: str = "linear"
    timestep_respacing: str = ""
    use_kl: bool = False
    predict_xstart: bool = False
    rescale_timesteps: bool = True
    rescale_learned_sigmas: bool = True
    use_checkpoint: bool = False
    use_scale_shift_norm: bool = True
    schedule_sampler: str = "uniform"

    @property
    def channel_mult(self) -> tuple[int, ...]:
        """The channel multiplier per level, by image size."""
        return CHANNEL_MULT[self.image_size]

    @property
    def attention_factors(self) -> tuple[int, ...]:
        """Their ``attention_resolutions`` as downsampling factors ``image_size // res``."""
        return tuple(self.image_size // int(r) for r in self.attention_resolutions.split(","))

    @property
    def attention_levels(self) -> tuple[int, ...]:
        """The levels whose feature maps get attention (factor ``2 ** level`` listed)."""
        return tuple(
            level for level in range(len(self.channel_mult)) if 2**level in self.attention_factors
        )

    @property
    def out_channels(self) -> int:
        """3, or 6 with a learned variance."""
        return 2 * IN_CHANNELS if self.learn_sigma else IN_CHANNELS


_FIELD_TYPES = {field.name: type(field.default) for field in dataclasses.fields(Flags)}


def _str2bool(name: str, text: str) -> bool:
    lowered = text.lower()
    if lowered in ("yes", "true", "t", "y", "1"):
        return True
    if lowered in ("no", "false", "f", "n", "0"):
        return False
    raise ValueError(f"--{name} {text!r}: expected a boolean (True/False, yes/no, 1/0).")


def _convert_value(name: str, text: str) -> Any:
    kind = _FIELD_TYPES[name]
    if kind is bool:
        return _str2bool(name, text)
    try:
        return kind(text)
    except ValueError:
        raise ValueError(f"--{name} {text!r}: expected {kind.__name__}.") from None


def _tokens_to_values(text: str) -> dict[str, Any]:
    try:
        tokens = shlex.split(text)
    except ValueError as error:
        raise ValueError(f"--flags {text!r} cannot be split into words: {error}.") from None
    values: dict[str, Any] = {}
    i = 0
    while i < len(tokens):
        token = tokens[i]
        if not token.startswith("--") or token == "--":
            raise ValueError(f"--flags: expected a flag '--name value', got {token!r}.")
        name, has_value, value = token[2:].partition("=")
        if name not in _FIELD_TYPES:
            raise ValueError(
                f"--flags: --{name} is not a model or diffusion flag of improved-diffusion "
                "(pass their MODEL_FLAGS and DIFFUSION_FLAGS; known: "
                f"{', '.join(sorted(_FIELD_TYPES))})."
            )
        if not has_value:
            if i + 1 >= len(tokens) or tokens[i + 1].startswith("--"):
                raise ValueError(f"--flags: --{name} needs a value.")
            i += 1
            value = tokens[i]
        values[name] = _convert_value(name, value)
        i += 1
    return values


def _check_flags(flags: Flags) -> None:
    """Refuses values their code or ours cannot build, naming the flag."""
    if flags.image_size not in CHANNEL_MULT:
        raise ValueError(
            f"--image_size {flags.image_size}: improved-diffusion's create_model only builds "
            f"sizes {sorted(CHANNEL_MULT)}."
        )
    for name in ("num_channels", "num_res_blocks", "num_heads", "diffusion_steps"):
        if getattr(flags, name) < 1:
            raise ValueError(f"--{name} {getattr(flags, name)}: must be a positive integer.")
    if flags.num_channels % NUM_GROUPS:
        raise ValueError(
            f"--num_channels {flags.num_channels}: their GroupNorm has {NUM_GROUPS} groups, so "
            f"it must be a multiple of {NUM_GROUPS}."
        )
    channels = sorted({flags.num_channels * m for m in flags.channel_mult})
    bad = [c for c in channels if c % flags.num_heads]
    if bad:
        raise ValueError(
            f"--num_heads {flags.num_heads}: must divide every channel count {channels}; {bad} "
            "are not divisible."
        )
    if flags.num_heads_upsample not in (-1, flags.num_heads):
        raise ValueError(
            f"--num_heads_upsample {flags.num_heads_upsample}: our U-Net uses one head count "
            f"for every attention block (--num_heads {flags.num_heads}); only -1 or the same "
            "value can be converted."
        )
    try:
        resolutions = [int(r) for r in flags.attention_resolutions.split(",")]
    except ValueError:
        resolutions = []
    if not resolutions or min(resolutions) < 1:
        raise ValueError(
            f"--attention_resolutions {flags.attention_resolutions!r}: expected comma-separated "
            "positive integers (feature-map sizes in pixels, e.g. 16,8)."
        )
    if not 0.0 <= flags.dropout < 1.0:
        raise ValueError(f"--dropout {flags.dropout}: must lie in [0, 1).")
    if flags.noise_schedule not in ("linear", "cosine"):
        raise ValueError(
            f"--noise_schedule {flags.noise_schedule!r}: improved-diffusion has 'linear' and "
            "'cosine'."
        )
    if flags.noise_schedule == "linear" and 0.02 * 1000 / flags.diffusion_steps >= 1:
        raise ValueError(
            f"--diffusion_steps {flags.diffusion_steps}: their linear schedule scaled by "
            "1000 / T has betas of 1 or more below T = 21 (their code refuses it too)."
        )
    if flags.timestep_respacing:
        raise ValueError(
            f"--timestep_respacing {flags.timestep_respacing!r}: respacing is a sampling "
            "choice; convert the full process (leave it out) and give sample.py --steps."
        )
    if flags.schedule_sampler not in SCHEDULE_SAMPLERS:
        raise ValueError(
            f"--schedule_sampler {flags.schedule_sampler!r}: expected one of "
            f"{tuple(SCHEDULE_SAMPLERS)}."
        )


def parse_flags(text: str) -> Flags:
    """Parses improved-diffusion flags as their scripts take them, with their defaults.

    Args:
      text: e.g. ``"--image_size 32 --num_channels 128 --learn_sigma True"``.

    Returns:
      The :class:`Flags`, checked.

    Raises:
      ValueError: one line naming an unknown flag, a malformed value, or a value that cannot
        be converted exactly.

    Example:
      >>> flags = parse_flags("--image_size 32 --learn_sigma True --diffusion_steps 4000")
      >>> flags.channel_mult, flags.out_channels, flags.num_heads
      ((1, 2, 2, 2), 6, 4)
    """
    flags = Flags(**_tokens_to_values(text))
    _check_flags(flags)
    return flags


def model_fields(flags: Flags) -> dict[str, Any]:
    """The ``config.model`` fields of our U-Net that reproduce their network."""
    return {
        "name": "unet",
        "ch": flags.num_channels,
        "ch_mult": flags.channel_mult,
        "num_res_blocks": flags.num_res_blocks,
        "attn_resolutions": tuple(flags.image_size // 2**level for level in flags.attention_levels),
        "dropout": flags.dropout,
        "num_groups": NUM_GROUPS,
        "num_heads": flags.num_heads,
        "conv_resample": True,
        "resblock_updown": False,
        "use_scale_shift_norm": flags.use_scale_shift_norm,
        "remat": flags.use_checkpoint,
        "class_conditional": flags.class_cond,
        "norm_eps": NORM_EPS,
        "downsample_padding": "symmetric",
        "flip_sin_to_cos": True,
        "freq_shift": 0.0,
        "head_dim": None,
        "timestep_scale": 1000.0 / flags.diffusion_steps if flags.rescale_timesteps else 1.0,
    }


def diffusion_fields(flags: Flags) -> dict[str, Any]:
    """The ``config.diffusion`` fields of their ``create_gaussian_diffusion``."""
    if flags.learn_sigma:
        variance = "learned_range"
    else:
        variance = "fixed_small" if flags.sigma_small else "fixed_large"
    if flags.use_kl:
        loss_type = "vlb"
    else:
        loss_type = "hybrid" if flags.learn_sigma else "simple"
    return {
        "schedule": flags.noise_schedule,
        "num_timesteps": flags.diffusion_steps,
        "scale_to_num_timesteps": True,  # their linear range is scaled by 1000 / T
        "zero_terminal_snr": False,
        "parameterization": "x0" if flags.predict_xstart else "eps",
        "variance": variance,
        "loss_type": loss_type,
        "clip_x0": True,  # their samplers' clip_denoised default
        "timestep_sampler": SCHEDULE_SAMPLERS[flags.schedule_sampler],
    }


def build_config(flags: Flags, dataset: str | None = None) -> ml_collections.ConfigDict:
    """A training config (the defaults, with the model and diffusion of ``flags``), validated.

    Args:
      flags: their flags.
      dataset: ``config.data.name`` (what the bound and FID evaluate on); default ``cifar10``
        for their unconditional 32x32 models (CIFAR-10's), else ``converted``.

    Raises:
      ValueError: if the config does not validate (e.g. a schedule that does not reach noise).
    """
    config = config_lib.default_config()
    for name, value in model_fields(flags).items():
        config.model[name] = value
    for name, value in diffusion_fields(flags).items():
        config.diffusion[name] = value
    if dataset is None:
        cifar10 = flags.image_size == 32 and not flags.class_cond
        dataset = "cifar10" if cifar10 else "converted"
    config.data.name = dataset
    config.data.image_size = flags.image_size
    config.train.sample_steps = min(config.train.sample_steps, flags.diffusion_steps)
    config_lib.validate_config(config)
    return config


# --- The state dict -------------------------------------------------------------------------


class _Source:
    """A state dict that hands out each key once, checking its shape."""

    def __init__(self, arrays: Mapping[str, Any]):
        self._arrays = dict(arrays)
        self.taken: dict[str, tuple[int, ...]] = {}

    def take(self, key: str, shape: tuple[int, ...]) -> np.ndarray:
        assert key not in self.taken, f"mapping bug: {key} taken twice"
        if key not in self._arrays:
            raise ValueError(
                f"state dict has no key {key!r} (shape {shape}) that the flags' network needs: "
                "check --flags against the checkpoint's."
            )
        array = np.asarray(self._arrays[key])
        if tuple(array.shape) != shape:
            raise ValueError(
                f"state dict key {key!r} has shape {tuple(array.shape)}, but the flags' network "
                f"needs {shape}: check --flags against the checkpoint's."
            )
        self.taken[key] = shape
        return array.astype(np.float32)

    def check_all_taken(self) -> None:
        unused = sorted(set(self._arrays) - set(self.taken))
        if unused:
            raise ValueError(
                f"state dict key {unused[0]!r} is not part of the network the flags describe "
                f"({len(unused)} unused key(s)): check --flags against the checkpoint's."
            )


class _Shapes(_Source):
    """Stands in for a state dict: hands out zeros of the requested shapes."""

    def __init__(self):
        super().__init__({})

    def take(self, key: str, shape: tuple[int, ...]) -> np.ndarray:
        assert key not in self.taken, f"mapping bug: {key} taken twice"
        self.taken[key] = shape
        return np.broadcast_to(np.float32(0.0), shape)


def _conv(src: _Source, prefix: str, c_in: int, c_out: int, size: int = 3) -> dict:
    """A Conv2d ``[out, in, kh, kw]`` -> Flax Conv ``[kh, kw, in, out]``."""
    weight = src.take(f"{prefix}.weight", (c_out, c_in, size, size))
    bias = src.take(f"{prefix}.bias", (c_out,))
    return {"kernel": np.transpose(weight, (2, 3, 1, 0)), "bias": bias}


def _dense(src: _Source, prefix: str, c_in: int, c_out: int, trailing: tuple = ()) -> dict:
    """A Linear ``[out, in]`` (or a 1x1 conv ``[out, in, 1...]``) -> Flax Dense ``[in, out]``."""
    weight = src.take(f"{prefix}.weight", (c_out, c_in) + trailing)
    bias = src.take(f"{prefix}.bias", (c_out,))
    return {"kernel": weight.reshape(c_out, c_in).T, "bias": bias}


def _norm(src: _Source, prefix: str, channels: int) -> dict:
    return {
        "scale": src.take(f"{prefix}.weight", (channels,)),
        "bias": src.take(f"{prefix}.bias", (channels,)),
    }


def _res_block(
    src: _Source, prefix: str, c_in: int, c_out: int, emb_dim: int, flags: Flags
) -> dict:
    emb_out = 2 * c_out if flags.use_scale_shift_norm else c_out
    params = {
        "norm1": _norm(src, f"{prefix}.in_layers.0", c_in),
        "conv1": _conv(src, f"{prefix}.in_layers.2", c_in, c_out),
        "temb_proj": _dense(src, f"{prefix}.emb_layers.1", emb_dim, emb_out),
        "norm2": _norm(src, f"{prefix}.out_layers.0", c_out),
        "conv2": _conv(src, f"{prefix}.out_layers.3", c_out, c_out),
    }
    if c_in != c_out:
        params["skip"] = _dense(src, f"{prefix}.skip_connection", c_in, c_out, (1, 1))
    return params


def _attn_block(src: _Source, prefix: str, channels: int, num_heads: int) -> dict:
    # qkv's 3C outputs are [q, k, v] blocks of C / heads channels, head after head; ours are
    # three C-wide projections, each head-major (channel = head * head_dim + d).
    head_dim = channels // num_heads
    weight = src.take(f"{prefix}.qkv.weight", (3 * channels, channels, 1))
    bias = src.take(f"{prefix}.qkv.bias", (3 * channels,))
    weight = weight.reshape(num_heads, 3, head_dim, channels)
    bias = bias.reshape(num_heads, 3, head_dim)
    params = {"norm": _norm(src, f"{prefix}.norm", channels)}
    for index, name in enumerate(("q", "k", "v")):
        params[name] = {
            "kernel": weight[:, index].reshape(channels, channels).T,
            "bias": bias[:, index].reshape(channels),
        }
    params["proj_out"] = _dense(src, f"{prefix}.proj_out", channels, channels, (1,))
    return params


def _map(src: _Source, flags: Flags) -> dict[str, Any]:
    """Walks their UNetModel's construction (unet.py), taking each key as it is built."""
    ch, heads = flags.num_channels, flags.num_heads
    emb_dim = 4 * ch
    params: dict[str, Any] = {
        "temb_dense0": _dense(src, "time_embed.0", ch, emb_dim),
        "temb_dense1": _dense(src, "time_embed.2", emb_dim, emb_dim),
    }
    if flags.class_cond:
        table = src.take("label_emb.weight", (NUM_CLASSES, emb_dim))
        # The null label (row NUM_CLASSES) they never trained: zeros (module docstring).
        null_row = np.zeros((1, emb_dim), np.float32)
        params["label_embed"] = {"embedding": np.concatenate([table, null_row])}
    params["conv_in"] = _conv(src, "input_blocks.0.0", IN_CHANNELS, ch)
    skip_channels = [ch]
    channels, index = ch, 1
    levels = len(flags.channel_mult)
    attention = set(flags.attention_levels)
    for level, mult in enumerate(flags.channel_mult):
        for block in range(flags.num_res_blocks):
            prefix = f"input_blocks.{index}"
            params[f"down{level}_block{block}"] = _res_block(
                src, f"{prefix}.0", channels, mult * ch, emb_dim, flags
            )
            channels = mult * ch
            if level in attention:
                params[f"down{level}_attn{block}"] = _attn_block(
                    src, f"{prefix}.1", channels, heads
                )
            skip_channels.append(channels)
            index += 1
        if level != levels - 1:
            params[f"down{level}_downsample"] = _conv(
                src, f"input_blocks.{index}.0.op", channels, channels
            )
            skip_channels.append(channels)
            index += 1
    params["mid_block0"] = _res_block(src, "middle_block.0", channels, channels, emb_dim, flags)
    params["mid_attn"] = _attn_block(src, "middle_block.1", channels, heads)
    params["mid_block1"] = _res_block(src, "middle_block.2", channels, channels, emb_dim, flags)
    index = 0
    for level, mult in reversed(list(enumerate(flags.channel_mult))):
        for block in range(flags.num_res_blocks + 1):
            prefix = f"output_blocks.{index}"
            c_in = channels + skip_channels.pop()
            params[f"up{level}_block{block}"] = _res_block(
                src, f"{prefix}.0", c_in, mult * ch, emb_dim, flags
            )
            channels = mult * ch
            layer = 1
            if level in attention:
                params[f"up{level}_attn{block}"] = _attn_block(src, f"{prefix}.1", channels, heads)
                layer = 2
            if level and block == flags.num_res_blocks:
                params[f"up{level}_upsample"] = _conv(
                    src, f"{prefix}.{layer}.conv", channels, channels
                )
            index += 1
    assert not skip_channels, "mapping bug: every skip connection must be consumed"
    params["norm_out"] = _norm(src, "out.0", channels)
    params["conv_out"] = _conv(src, "out.2", ch, flags.out_channels)
    return params


def convert_state_dict(state_dict: Mapping[str, Any], flags: Flags) -> dict[str, Any]:
    """Maps their state dict onto our U-Net's parameter tree (``variables["params"]``).

    Args:
      state_dict: ``{name: array}`` of their ``UNetModel`` (torch layout, any float dtype).
      flags: the flags the checkpoint was trained with.

    Returns:
      A nested dict of float32 NumPy arrays, the ``params`` collection of
      ``diffusion_jax.models.UNet`` built from :func:`build_config`.

    Raises:
      ValueError: one line naming a key the flags' network needs and the state dict lacks, a
        key whose shape differs, or a key the network does not use.

    Example:
      >>> flags = parse_flags("--image_size 32 --num_channels 32 --num_res_blocks 1")
      >>> params = convert_state_dict(
      ...     {k: np.zeros(s) for k, s in state_dict_shapes(flags).items()}, flags)
      >>> params["conv_in"]["kernel"].shape
      (3, 3, 3, 32)
    """
    src = _Source(state_dict)
    params = _map(src, flags)
    src.check_all_taken()
    return params


def state_dict_shapes(flags: Flags) -> dict[str, tuple[int, ...]]:
    """The keys and torch shapes of the state dict that :func:`convert_state_dict` expects."""
    src = _Shapes()
    _map(src, flags)
    return dict(src.taken)


def load_state_dict(path: str) -> dict[str, np.ndarray]:
    """Reads a ``model.pt`` state dict into float32 NumPy arrays (needs torch).

    Raises:
      ValueError: torch missing, an unreadable file, or not a ``{name: tensor}`` dict.
    """
    try:
        import torch  # only this reader needs torch
    except ImportError:
        raise ValueError(
            f"reading {path} needs PyTorch: pip install torch (CPU is enough)."
        ) from None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, ValueError, EOFError, pickle.UnpicklingError) as error:
        first_line = (str(error).strip() or type(error).__name__).splitlines()[0]
        raise ValueError(
            f"--src {path}: cannot read it as a PyTorch state dict ({first_line})."
        ) from None
    if not isinstance(state, Mapping) or not all(
        isinstance(v, torch.Tensor) for v in state.values()
    ):
        raise ValueError(
            f"--src {path}: expected a state dict {{name: tensor}} as improved-diffusion saves "
            "(model*.pt or ema_*.pt)."
        )
    return {name: tensor.detach().float().numpy() for name, tensor in state.items()}


# --- The command line -----------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Adds ``--src``, ``--flags``, ``--dataset`` and ``--out``."""
    parser.add_argument("--src", required=True, help="improved-diffusion checkpoint (model.pt)")
    parser.add_argument(
        "--flags",
        required=True,
        help='their MODEL_FLAGS and DIFFUSION_FLAGS, quoted: "--image_size 32 ..."',
    )
    parser.add_argument(
        "--dataset",
        default=None,
        help="config.data.name of the workdir (default: cifar10 for a 32x32 model, else "
        "'converted'); the bound and FID evaluate on it",
    )
    parser.add_argument("--out", required=True, help="workdir to write")


def run(args: argparse.Namespace) -> str:
    """Converts ``args.src`` with ``args.flags`` into the workdir ``args.out``.

    Returns:
      The workdir written.

    Raises:
      ValueError: bad flags, a config that does not validate, or a mismatched state dict.
    """
    flags = parse_flags(args.flags)
    config = build_config(flags, args.dataset)
    params = convert_state_dict(load_state_dict(args.src), flags)
    source = {
        "format": "improved-diffusion",
        "src": str(args.src),
        "flags": args.flags,
        "null_label": "zeros (never trained)" if flags.class_cond else None,
    }
    return workdir.write_workdir(args.out, config, params, source=source)
