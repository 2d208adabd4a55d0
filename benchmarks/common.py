"""Shared pieces of the benchmark scripts: the model sizes, the machine record, timing helpers,
the matmul peak, peak host memory and the JSON results.

Not a library module and not part of the test suite: ``benchmarks/*.py`` import it as
``from benchmarks import common`` (run them from the repository root).
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from configs import cifar10 as cifar10_config
from configs import default as default_config
from diffusion_jax import _runtime

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def _digits() -> ml_collections.ConfigDict:
    return default_config.get_config()


def _c64() -> ml_collections.ConfigDict:
    """32x32x3 with ch 64: the CIFAR-10 network at half width and one ResNet block per level."""
    config = cifar10_config.get_config()
    config.model.ch = 64
    config.model.num_res_blocks = 1
    return config


def _issue() -> ml_collections.ConfigDict:
    """The issue's 1.5M-parameter shape (``benchmarks/unet_formulations.py`` section unet)."""
    config = default_config.get_config()
    config.model.ch_mult = (1, 2, 2, 2)
    config.model.attn_resolutions = (16,)
    return config


# name -> (config factory, data shape [H, W, C], one-line description)
SIZES: dict[str, tuple[Callable[[], ml_collections.ConfigDict], tuple[int, int, int], str]] = {
    "digits": (_digits, (8, 8, 1), "configs/digits.py: ch 32, ch_mult (1,2), 1 block, 8x8x1"),
    "issue": (
        _issue,
        (32, 32, 1),
        "issue 8 shape: ch 32, ch_mult (1,2,2,2), 1 block, attn 16, GN 8, 32x32x1",
    ),
    "c64": (_c64, (32, 32, 3), "ch 64, ch_mult (1,2,2,2), 1 block, attn 16, GN 32, 32x32x3"),
    "cifar10": (
        cifar10_config.get_config,
        (32, 32, 3),
        "configs/cifar10.py: ch 128, ch_mult (1,2,2,2), 2 blocks, attn 16, 32x32x3",
    ),
}


def size_config(
    name: str, dtype: str = "float32", batch_size: int | None = None
) -> tuple[ml_collections.ConfigDict, tuple[int, int, int]]:
    """The config and data shape of a named size, with the compute dtype and batch set."""
    factory, shape, _ = SIZES[name]
    config = factory()
    config.train.compute_dtype = dtype
    if batch_size is not None:
        config.data.batch_size = batch_size
    return config, shape


def count_params(params: Any) -> int:
    """Number of scalars in a pytree of arrays."""
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(params)))


def load_average() -> tuple[float, float, float]:
    """The 1, 5 and 15 minute load averages."""
    return os.getloadavg()


def peak_rss_mb() -> float:
    """This process's peak resident set size (VmHWM) in MiB; it only grows over a process."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def machine() -> dict[str, Any]:
    """What the figures were measured on: CPU, cores, versions, date and load."""
    import flax
    import optax

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if "model name" in line)
    except (OSError, StopIteration):
        pass
    return {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "machine": platform.machine(),
        "python": platform.python_version(),
        "jax": jax.__version__,
        "flax": flax.__version__,
        "optax": optax.__version__,
        "backend": jax.default_backend(),
        "devices": [str(d) for d in jax.devices()],
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        # The library's per-executable XLA:CPU options (diffusion_jax._runtime); None = XLA's
        # defaults (DIFFUSION_JAX_XLA_DEFAULTS=1 measures the "before" of that change).
        "compiler_options": _runtime.compiler_options(),
        "load_average": load_average(),
        "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
    }


def summarize(seconds: list[float]) -> dict[str, float]:
    """min / median / max / number of a list of timings, in seconds."""
    return {
        "min": min(seconds),
        "median": statistics.median(seconds),
        "max": max(seconds),
        "n": len(seconds),
    }


def time_calls(fn: Callable[[], Any], repeats: int) -> list[float]:
    """Wall seconds of ``repeats`` blocking calls of ``fn`` (already compiled)."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return times


def matmul_peak_gflops(n: int = 2048, repeats: int = 5) -> float:
    """Best float32 GFLOP/s of an ``[n, n] @ [n, n]`` jitted ``jnp.dot`` (the reference peak)."""
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
    dot = jax.jit(jnp.dot)
    jax.block_until_ready(dot(a, b))
    best = min(time_calls(lambda: dot(a, b), repeats))
    return 2 * n**3 / best / 1e9


def compiled_flops(compiled) -> float | None:
    """The FLOPs XLA's cost analysis counts for a compiled executable (None if unavailable)."""
    try:
        analysis = compiled.cost_analysis()
    except Exception:
        return None
    if isinstance(analysis, list | tuple):
        analysis = analysis[0] if analysis else {}
    flops = (analysis or {}).get("flops")
    return None if flops is None or flops < 0 else float(flops)


def run_isolated(script: str, args: list[str], timeout: float = 3600) -> dict[str, Any]:
    """Runs ``python script args`` in a fresh process (own peak RSS, own compile caches) and
    returns the JSON object it prints on its last stdout line."""
    proc = subprocess.run(
        [sys.executable, script, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
        check=False,
    )
    if proc.returncode != 0:
        return {"error": proc.stderr.strip().splitlines()[-5:]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def write_json(name: str, payload: dict[str, Any]) -> str:
    """Writes ``benchmarks/results/<name>.json`` and returns its path."""
    os.makedirs(RESULTS_DIR, exist_ok=True)
    path = os.path.join(RESULTS_DIR, f"{name}.json")
    with open(path, "w") as f:
        json.dump(payload, f, indent=2, default=float)
        f.write("\n")
    return path


def print_table(rows: list[dict[str, Any]], columns: list[tuple[str, str, str]]) -> None:
    """Prints rows as a fixed-width table; ``columns`` are ``(key, header, format)``."""
    cells = [[header for _, header, _ in columns]]
    for row in rows:
        line = []
        for key, _, fmt in columns:
            value = row.get(key)
            line.append("-" if value is None else format(value, fmt))
        cells.append(line)
    widths = [max(len(r[i]) for r in cells) for i in range(len(columns))]
    for r in cells:
        print("  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)), flush=True)
