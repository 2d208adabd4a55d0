"""Meshes, shardings and multi-host set-up: the only module that knows about devices.

Training is data parallel over a 1-D mesh with one axis, ``data``, spanning every device of
every process: the global batch is split along its first axis, parameters and optimiser state
are replicated. ``jax.pmap`` is in maintenance mode since JAX 0.8; this is the ``jax.jit`` +
``NamedSharding`` way, and the same code runs on 1 CPU, 8 GPUs or a TPU pod slice.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from diffusion_jax import options

__all__ = [
    "DATA_AXIS",
    "broadcast_from_process_0",
    "check_distributed_args",
    "data_sharding",
    "global_batch",
    "initialize_distributed",
    "make_mesh",
    "replicated",
    "to_host",
]

DATA_AXIS = "data"


def make_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A 1-D ``data`` mesh over ``devices`` (default: all devices of all processes).

    The axis type is ``Auto`` (``jax.make_mesh`` defaults to ``Explicit`` now, under which
    ``flax.linen.Dropout`` inside a sharded step fails with a ``ShardingTypeError``).
    """
    devices = jax.devices() if devices is None else list(devices)
    return jax.make_mesh(
        (len(devices),),
        (DATA_AXIS,),
        axis_types=(jax.sharding.AxisType.Auto,),
        devices=devices,
    )


def replicated(mesh: Mesh) -> NamedSharding:
    """The sharding of a value held whole on every device (parameters, optimiser state)."""
    return NamedSharding(mesh, PartitionSpec())


def data_sharding(mesh: Mesh) -> NamedSharding:
    """The sharding of a batch: first axis split over the ``data`` axis."""
    return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def global_batch(local_batch: Mapping[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Assembles each process's share of a batch into global arrays sharded over ``data``.

    Args:
      local_batch: dict of host arrays ``[B_local, ...]``, this process's contiguous share of the
        global batch (``B_local = B / process_count``).
      mesh: the ``data`` mesh.

    Returns:
      dict of global ``jax.Array`` ``[B, ...]``.

    Raises:
      ValueError: when the global batch does not divide over the devices.
    """
    sharding = data_sharding(mesh)
    out = {}
    for name, value in local_batch.items():
        value = np.asarray(value)
        global_shape = (value.shape[0] * jax.process_count(), *value.shape[1:])
        if global_shape[0] % mesh.size:
            raise ValueError(
                f"The global batch of {global_shape[0]} ({name!r}) does not divide over "
                f"{mesh.size} devices; choose a batch size that is a multiple of {mesh.size}."
            )
        out[name] = jax.make_array_from_process_local_data(sharding, value, global_shape)
    return out


def to_host(array: jax.Array) -> np.ndarray:
    """The whole of a (possibly multi-process) sharded array, as NumPy on every process."""
    if array.is_fully_addressable:
        return np.asarray(jax.device_get(array))
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(array, tiled=True))


def check_distributed_args(
    coordinator_address: str | None, num_processes: int | None, process_id: int | None
) -> None:
    """Refuses multi-process arguments that do not add up, which would otherwise train
    single-process without a word (a ``num_processes`` without a coordinator is ignored).

    All three go together: with ``coordinator_address``, ``num_processes >= 1`` and
    ``0 <= process_id < num_processes``; without it, neither of the others (the environment of
    a cluster JAX detects on its own then says how many processes there are).

    Raises:
      options.ArgumentError: naming the argument to add, remove or correct.
    """
    if not coordinator_address:
        for name, value in (("num_processes", num_processes), ("process_id", process_id)):
            if value is not None:
                raise options.ArgumentError(
                    "coordinator_address",
                    f"{name} = {value} is given without {{name}}: a multi-process run needs "
                    "{name}=HOST:PORT of process 0 (or neither, to run as one process).",
                )
        return
    if num_processes is None or num_processes < 1:
        raise options.ArgumentError(
            "num_processes",
            "{name} must be the number of processes (>= 1) when coordinator_address is "
            f"given; got {num_processes}.",
        )
    if process_id is None or not 0 <= process_id < num_processes:
        raise options.ArgumentError(
            "process_id",
            "{name} must be this process's index in [0, "
            f"{num_processes - 1}] (num_processes = {num_processes}); got {process_id}.",
        )


def broadcast_from_process_0(flag: bool) -> bool:
    """Process 0's ``flag`` on every process (a collective: every process must call it), so
    that a decision taken by process 0 alone (the workdir's lock) is followed by all."""
    if jax.process_count() == 1:
        return bool(flag)
    from jax.experimental import multihost_utils

    return bool(multihost_utils.broadcast_one_to_all(np.int32(bool(flag))))


def initialize_distributed(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    cpu_collectives: str | None = None,
    timeout_seconds: int = 300,
) -> bool:
    """Starts ``jax.distributed`` when the run spans several processes.

    With an explicit ``coordinator_address`` (and ``num_processes``, ``process_id``) it
    initialises with those; with none, it initialises only where the environment describes a
    cluster JAX can detect on its own (TPU pods, SLURM, ``JAX_COORDINATOR_ADDRESS``). On CPU,
    several processes exchange data over ``gloo`` collectives.

    It logs what it waits for (the coordinator and the number of processes), so a missing peer
    is not silent; JAX's runtime aborts the process if the group has not formed within
    ``timeout_seconds``.

    Returns:
      Whether ``jax.distributed`` was initialised.

    Raises:
      options.ArgumentError: the arguments do not add up (:func:`check_distributed_args`).
    """
    check_distributed_args(coordinator_address, num_processes, process_id)
    kwargs: dict[str, Any] = {}
    if coordinator_address:
        kwargs = dict(
            coordinator_address=coordinator_address,
            num_processes=num_processes,
            process_id=process_id,
        )
    elif not any(
        os.environ.get(name)
        for name in ("JAX_COORDINATOR_ADDRESS", "SLURM_JOB_ID", "TPU_WORKER_HOSTNAMES")
    ):
        return False
    # Only the CPU backend reads this; GPUs and TPUs keep their own collectives. Without it,
    # CPU processes cannot exchange data at all.
    jax.config.update("jax_cpu_collectives_implementation", cpu_collectives or "gloo")
    where = coordinator_address or "the address the environment gives"
    logging.info("jax.distributed: waiting for %s processes at %s.", num_processes or "all", where)
    # On a timeout JAX's runtime aborts the process (it cannot be caught here): a CLI that
    # wants one clear line watches the clock itself (train.py does).
    jax.distributed.initialize(**kwargs, initialization_timeout=int(timeout_seconds))
    logging.info(
        "jax.distributed: process %d of %d, %d local / %d global devices",
        jax.process_index(),
        jax.process_count(),
        jax.local_device_count(),
        jax.device_count(),
    )
    return True
