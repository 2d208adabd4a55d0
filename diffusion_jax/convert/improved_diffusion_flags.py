"""improved-diffusion's flags (Nichol & Dhariwal 2021) as a config of this library.

Their scripts take a model and its diffusion as flags (``MODEL_FLAGS`` and ``DIFFUSION_FLAGS``,
e.g. ``--image_size 32 --num_channels 128 --num_res_blocks 3 --learn_sigma True --dropout 0.3
--diffusion_steps 4000 --noise_schedule cosine``); :func:`parse_flags` reads them as they do
and :func:`build_config` writes the config of the same network and diffusion.

The flags (``script_util.model_and_diffusion_defaults`` gives each default, kept in
:class:`Flags`): ``--name value`` or ``--name=value``, booleans as their ``str2bool`` reads them
(``true/false``, ``yes/no``, ``t/f``, ``y/n``, ``1/0``), the last of a repeated flag winning;
no abbreviations. ``--schedule_sampler`` (a training flag of theirs, published with the L_vlb
models) sets ``diffusion.timestep_sampler``. Any other flag, or a value their code or ours
cannot represent exactly (``--timestep_respacing``: a sampling choice, give ``sample.py
--steps``; ``--num_heads_upsample`` different from ``--num_heads``; an image size other than
32, 64 or 256), is refused with one line naming the flag. Their super-resolution model
(``SuperResModel``, flags ``--large_size``/``--small_size``) is not supported: its flags are
refused as unknown.

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
"""

from __future__ import annotations

import dataclasses
import shlex
from typing import Any

import ml_collections

from diffusion_jax.train import config as config_lib

__all__ = [
    "CHANNEL_MULT",
    "IN_CHANNELS",
    "NUM_CLASSES",
    "Flags",
    "build_config",
    "diffusion_fields",
    "model_fields",
    "parse_flags",
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
