"""The training tool: config defaults and validation, the train state and step, the loop,
resuming, checkpoints, device placement, metrics and the periodic sample grids.

``train_and_evaluate(config, workdir)`` is the whole job (``train.py`` only parses flags).
"""

from diffusion_jax.train import (
    checkpoint,
    config,
    defaults,
    generate,
    metrics,
    monitor,
    periodic,
    preemption,
    resume,
    sharding,
    step,
)
from diffusion_jax.train.loop import train_and_evaluate
from diffusion_jax.train.monitor import NonFiniteError

__all__ = [
    "NonFiniteError",
    "checkpoint",
    "config",
    "defaults",
    "generate",
    "metrics",
    "monitor",
    "periodic",
    "preemption",
    "resume",
    "sharding",
    "step",
    "train_and_evaluate",
]
