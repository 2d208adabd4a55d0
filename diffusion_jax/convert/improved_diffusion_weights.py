"""An improved-diffusion ``UNetModel`` state dict as the parameters of our U-Net.

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

Every key is used exactly once and every shape checked, else one line names the key.
"""

from __future__ import annotations

import pickle
from collections.abc import Mapping
from typing import Any

import numpy as np

from diffusion_jax.convert.improved_diffusion_flags import IN_CHANNELS, NUM_CLASSES, Flags

__all__ = ["convert_state_dict", "load_state_dict", "state_dict_shapes"]


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
      >>> from diffusion_jax.convert.improved_diffusion_flags import parse_flags
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
