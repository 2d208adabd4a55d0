"""A converted network written as a workdir like a trained run.

:func:`write_workdir` writes, under ``out``:

- ``checkpoints/0/``: one checkpoint (step 0) of the full training state, with the raw and the
  EMA parameters both set to the converted weights, a fresh optimiser state and the run's
  config, as :class:`~diffusion_jax.train.checkpoint.CheckpointManager` saves them;
- ``config.json``: the config, as ``train.py`` writes it;
- ``data_info.json`` (:data:`~diffusion_jax.evaluation.runs.DATA_INFO_FILE`): the data's shape
  and classes, so that ``sample.py`` and the pictures run with no dataset prepared (the bound
  and FID still read their evaluation data or statistics by ``config.data.name``);
- ``converted_from.json``: where the weights came from (the converter's ``source``).

Example:
  >>> write_workdir("workdirs/ddpm_cifar10", config, params, source={"format": "diffusers"})
  'workdirs/ddpm_cifar10'
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from diffusion_jax.evaluation.runs import DATA_INFO_FILE
from diffusion_jax.models import example_inputs
from diffusion_jax.train import checkpoint as checkpoint_lib
from diffusion_jax.train import config as config_lib
from diffusion_jax.train import resume
from diffusion_jax.train.step import TrainState

__all__ = ["SOURCE_FILE", "check_params", "data_shape_of", "write_workdir"]

SOURCE_FILE = "converted_from.json"


def data_shape_of(config: ml_collections.ConfigDict, params: Mapping[str, Any]) -> tuple:
    """``((H, W, C), num_classes)`` of a converted U-Net: ``H = W = config.data.image_size``,
    ``C`` the input channels of ``conv_in``, the classes ``label_embed``'s rows minus the null
    label (None without it).

    Raises:
      ValueError: ``config.data.image_size`` unset, no ``conv_in`` kernel, or labels that
        disagree with ``config.model.class_conditional``.
    """
    size = config.data.image_size
    if not isinstance(size, int) or size < 1:
        raise ValueError(
            f"config.data.image_size = {size!r}: a converted workdir needs the image size."
        )
    try:
        channels = int(np.shape(params["conv_in"]["kernel"])[2])
    except (KeyError, IndexError, TypeError):
        raise ValueError("the converted parameters have no conv_in/kernel [3, 3, C, ch]") from None
    num_classes = None
    if "label_embed" in params:
        num_classes = int(np.shape(params["label_embed"]["embedding"])[0]) - 1
    if (num_classes is not None) != bool(config.model.class_conditional):
        raise ValueError(
            f"config.model.class_conditional = {config.model.class_conditional} but the "
            f"parameters {'have' if num_classes is not None else 'have no'} label_embed."
        )
    return (size, size, channels), num_classes


def _paths(tree: Any) -> dict[str, tuple]:
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {
        "/".join(str(getattr(k, "key", k)) for k in path): tuple(np.shape(leaf))
        for path, leaf in leaves
    }


def check_params(model, data_shape: tuple, num_classes: int | None, params: Any) -> None:
    """Checks that ``params`` has exactly the parameter tree and shapes of ``model``.

    Raises:
      ValueError: one line naming the first missing, unexpected or mis-shaped parameter.
    """
    x, t, kwargs = example_inputs(data_shape, conditional=num_classes is not None)
    expected = _paths(jax.eval_shape(model.init, jax.random.key(0), x, t, **kwargs)["params"])
    got = _paths(params)
    missing = sorted(set(expected) - set(got))
    if missing:
        raise ValueError(f"the converted parameters miss {missing[0]} {expected[missing[0]]}")
    extra = sorted(set(got) - set(expected))
    if extra:
        raise ValueError(f"the converted parameters have {extra[0]}, which the U-Net has not")
    for path in sorted(expected):
        if expected[path] != got[path]:
            raise ValueError(
                f"the converted parameter {path} has shape {got[path]}; the U-Net of the config "
                f"needs {expected[path]}"
            )


def write_workdir(out: str, config: ml_collections.ConfigDict, params: Any, *, source: dict) -> str:
    """Writes a converted network as a workdir that ``sample.py`` and evaluation accept.

    Args:
      out: the workdir to create; it must not exist or be empty.
      config: the full training config describing the network and the diffusion
        (``config.data.image_size`` set); it is validated first.
      params: the converted parameters (NumPy or JAX arrays), exactly the tree of
        ``build_model(config, ...)``.
      source: JSON-able description of the weights' origin, written to ``converted_from.json``.

    Returns:
      ``out``.

    Raises:
      ValueError: an invalid config, parameters that do not fit it, or an ``out`` that exists
        and is not empty.
    """
    if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
        raise ValueError(f"--out {out} exists and is not empty: give a new workdir.")
    config_lib.validate_config(config)
    data_shape, num_classes = data_shape_of(config, params)
    model = config_lib.build_model(config, data_shape, num_classes)
    check_params(model, data_shape, num_classes, params)
    params = jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), params)
    tx, _ = config_lib.build_optimizer(config)
    state = TrainState.initial(params, tx, config.diffusion.num_timesteps)
    os.makedirs(out, exist_ok=True)
    with checkpoint_lib.CheckpointManager(
        os.path.join(out, "checkpoints"), max_to_keep=1, async_save=False
    ) as manager:
        manager.save(0, state.to_dict(), config=config_lib.config_to_dict(config))
        manager.wait_until_finished()
    resume.write_config(config, out)
    info = {"kind": "image", "shape": list(data_shape), "num_classes": num_classes}
    with open(os.path.join(out, DATA_INFO_FILE), "w") as f:
        json.dump(info, f, indent=2)
    with open(os.path.join(out, SOURCE_FILE), "w") as f:
        json.dump(source, f, indent=2, default=str)
    return out
