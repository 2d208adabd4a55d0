"""The training tool: config defaults and validation, the train state and step, the loop,
resuming, checkpoints, device placement, metrics and the periodic sample grids, the start-up
checks and the workdir's lock.

``train_and_evaluate(config, workdir)`` is the whole job (``train.py`` only parses flags).
"""

from diffusion_jax.train import (
    checkpoint,
    config,
    defaults,
    generate,
    lock,
    metrics,
    monitor,
    periodic,
    preemption,
    preflight,
    resume,
    sharding,
    step,
)
from diffusion_jax.train.loop import train_and_evaluate
from diffusion_jax.train.monitor import NonFiniteError
from diffusion_jax.train.preemption import Preempted

__all__ = [
    "NonFiniteError",
    "Preempted",
    "checkpoint",
    "config",
    "defaults",
    "generate",
    "lock",
    "metrics",
    "monitor",
    "periodic",
    "preemption",
    "preflight",
    "resume",
    "sharding",
    "step",
    "train_and_evaluate",
]
