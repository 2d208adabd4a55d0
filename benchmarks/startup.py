"""Start-up time of ``train.py`` on digits, phase by phase, and the commands of ``make demo``'s
tail, with a cold, a warm and no persistent compilation cache.

What it measures:
  * ``--part startup``: a fresh process per case doing, in order, what ``train.py --config
    configs/digits.py`` does before and around its first step, each phase timed from the
    process's launch (``time.time()`` in the parent just before it starts the child):

      python + imports    the interpreter, absl, ml_collections, ``diffusion_jax.train``
      cache               ``_runtime.use_compilation_cache`` (a directory check)
      check               ``validate_config`` and ``preflight.check_data`` (the dataset's files)
      build               mesh, model, optimiser, the abstract state and the jitted functions
                          (``train.loop._build``: traces the model's init once, compiles nothing)
      data                the training iterator (grain) and its first batch
      init                the initial state: ``jax.jit(init, out_shardings=...)``, compiled + run
      step 1              the first train step: trace, lower, compile (or load), run
      step 2              the second step (the steady state, for comparison)
      eval                the first held-out batch of ``train.eval_every``: compile (or load) + run
      grid                the first sample grid of ``train.sample_every`` (64 DDIM-50 samples)
      grid again          the same grid again in the same process

    Cases: ``cold`` (an empty cache directory), ``warm`` (the same directory, second process),
    ``off`` (no persistent cache). ``--background`` adds cases where a thread compiles the eval
    step and the grid's sampler (``lower().compile()``) while the first ``--steps`` steps run,
    to see whether that hides their compilation on this machine's 2 cores.
  * ``--part tail``: each command of ``make demo`` after ``train.py``, as ``make`` runs it
    (a fresh process each), timed from launch to exit, with a cold and a warm cache; and, for
    reference, the launch of ``python -c "import jax; jax.devices()"``.

Run (from the repository root; the tail needs a trained workdir, e.g. ``make demo``'s):
  .venv/bin/python benchmarks/startup.py --part startup
  .venv/bin/python benchmarks/startup.py --part tail --workdir out/digits
  .venv/bin/python benchmarks/startup.py --part startup --background --steps 200

Read it: seconds from launch at the end of each phase, each phase's own wall time, and the
process's CPU seconds in it (all threads; the first phase's CPU excludes the interpreter's
start). The machine is shared (load average printed with each case): wall times stretch with
the load, CPU seconds much less, so compare CPU seconds across cases measured at different
loads. Results go to ``benchmarks/results/startup.json`` and ``startup_tail.json``.
"""

from __future__ import annotations

import time

_T0 = time.time()  # the child's own clock, for imports measured in process

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import resource  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PHASES = [
    "python + imports",
    "cache",
    "check",
    "build",
    "data",
    "init",
    "step 1",
    "step 2",
    "eval",
    "grid",
    "grid again",
]


def _child(args: argparse.Namespace) -> None:
    """One start-up, in this fresh process; prints one JSON line of phase end times."""

    class Stamps(dict):
        """name -> (wall, process CPU) at the moment the name is set (to anything)."""

        def __setitem__(self, name, _):
            super().__setitem__(name, (time.time(), time.process_time()))

    stamps = Stamps()
    from absl import logging as absl_logging  # noqa: F401  (train.py imports absl first)
    from ml_collections import config_dict  # noqa: F401

    from diffusion_jax import _runtime, train

    stamps["python + imports"] = time.time()
    import jax

    from configs import digits as digits_config
    from diffusion_jax.train import config as config_lib
    from diffusion_jax.train import generate, loop, preflight, sharding

    _runtime.keep_freed_memory()
    _runtime.use_compilation_cache(args.cache)
    stamps["cache"] = time.time()
    config = digits_config.get_config()
    config_lib.validate_config(config)
    info, data_shape = preflight.check_data(config)
    stamps["check"] = time.time()
    mesh = sharding.make_mesh()
    run = loop._build(config, info, data_shape, mesh)
    stamps["build"] = time.time()
    train_iter = loop._iterator(config, train=True)
    batch = sharding.global_batch(next(train_iter), mesh)
    stamps["data"] = time.time()
    state = jax.block_until_ready(run.init())
    stamps["init"] = time.time()

    eval_batch = sharding.global_batch(next(iter(loop._iterator(config, train=False))), mesh)
    background = None
    if args.background:

        def compile_ahead():
            # What step 1 does not need: the eval step, and the grid's sampler (its
            # compiled program lands in the persistent cache, when there is one).
            run.eval_step.lower(state.ema_params, eval_batch, 0).compile()
            generate.write_training_samples(
                config, run.model, run.schedule, state.ema_params, info, data_shape,
                tempfile.mkdtemp(), 0, mesh,
            )  # fmt: skip

        background = threading.Thread(target=compile_ahead, daemon=True)
        background.start()
    state, out = run.train_step(state, batch)
    jax.block_until_ready(out)
    stamps["step 1"] = time.time()
    state, out = run.train_step(state, batch)
    jax.block_until_ready(out)
    stamps["step 2"] = time.time()
    for _ in range(max(args.steps - 2, 0)):
        state, out = run.train_step(state, sharding.global_batch(next(train_iter), mesh))
    jax.block_until_ready(out)
    stamps["steps"] = time.time()
    if background is not None:
        background.join()
    stamps["background joined"] = time.time()
    jax.block_until_ready(run.eval_step(state.ema_params, eval_batch, 0))
    stamps["eval"] = time.time()
    workdir = tempfile.mkdtemp()
    for name in ("grid", "grid again"):
        generate.write_training_samples(
            config, run.model, run.schedule, state.ema_params, info, data_shape, workdir, 1, mesh
        )
        stamps[name] = time.time()
    shutil.rmtree(workdir, ignore_errors=True)
    del train
    print(json.dumps({"child_t0": _T0, "stamps": stamps}))


def _load() -> float:
    return os.getloadavg()[0]


def _run_child(cache: str, background: bool, steps: int) -> dict:
    command = [sys.executable, os.path.abspath(__file__), "--child", "--cache", cache]
    command += ["--steps", str(steps)] + (["--background"] if background else [])
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    load = _load()
    launched = time.time()
    proc = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, check=False)
    if proc.returncode:
        raise SystemExit(f"child failed:\n{proc.stderr[-3000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    ends = {name: wall - launched for name, (wall, _) in result["stamps"].items()}
    cpu = {name: seconds for name, (_, seconds) in result["stamps"].items()}
    return {"load": load, "ends": ends, "cpu": cpu}


def _print_startup(name: str, case: dict) -> None:
    ends, cpu = case["ends"], case["cpu"]
    print(f"\n{name} (load {case['load']:.1f})")
    print(f"  {'phase':<20} {'ends at s':>9} {'takes s':>8} {'CPU s':>6}")
    previous, previous_cpu = 0.0, 0.0
    rows = list(PHASES)
    if ends["steps"] - ends["step 2"] > 0.05 or ends["background joined"] - ends["steps"] > 0.05:
        rows[rows.index("eval") : rows.index("eval")] = ["steps", "background joined"]
    for phase in rows:
        print(
            f"  {phase:<20} {ends[phase]:9.1f} {ends[phase] - previous:8.1f} "
            f"{cpu[phase] - previous_cpu:6.1f}"
        )
        previous, previous_cpu = ends[phase], cpu[phase]


def _startup(args: argparse.Namespace) -> dict:
    results = {}
    cache = tempfile.mkdtemp(prefix="startup-cache-")
    cases = [("cold", cache, False), ("warm", cache, False), ("off", "off", False)]
    if args.background:
        background_cache = tempfile.mkdtemp(prefix="startup-cache-bg-")
        cases += [
            ("off, background", "off", True),
            ("cold, background", background_cache, True),
        ]
    for name, directory, background in cases:
        case = _run_child(directory, background, args.steps)
        results[name] = case
        _print_startup(name, case)
    shutil.rmtree(cache, ignore_errors=True)
    if args.background:
        shutil.rmtree(background_cache, ignore_errors=True)
    return results


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _timed(command: list[str], env: dict) -> tuple[float, float]:
    """(wall, CPU) seconds of one command, from launch to exit."""
    start, start_cpu = time.time(), _children_cpu()
    proc = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, check=False)
    if proc.returncode not in (0, 1):  # the digits check exits 1 on too few recognisable
        raise SystemExit(f"{' '.join(command)} failed:\n{proc.stderr[-3000:]}")
    return time.time() - start, _children_cpu() - start_cpu


def _tail(args: argparse.Namespace) -> dict:
    py = sys.executable
    out = tempfile.mkdtemp(prefix="startup-tail-")
    w = args.workdir
    commands = {
        "python -c 'import jax; jax.devices()'": [py, "-c", "import jax; jax.devices()"],
        "sample.py (100, DDIM 50)": [py, "sample.py", f"--workdir={w}", "--num=100",
                                     "--method=ddim", "--steps=50", f"--out={out}/generated"],
        "evaluation digits": [py, "-m", "diffusion_jax.evaluation", "digits",
                              f"--samples={out}/generated/samples.npz"],
        "plots loss": [py, "-m", "diffusion_jax.plots", "loss", f"--workdir={w}",
                       f"--out={out}/loss.png"],
        "plots trajectory": [py, "-m", "diffusion_jax.plots", "trajectory", f"--workdir={w}",
                             f"--out={out}/trajectory.png"],
        "plots schedules": [py, "-m", "diffusion_jax.plots", "schedules",
                            f"--out={out}/schedules.png"],
        "plots noising": [py, "-m", "diffusion_jax.plots", "noising", f"--out={out}/noising.png"],
    }  # fmt: skip
    cache = tempfile.mkdtemp(prefix="startup-tail-cache-")
    results = {}
    for case in ("cold", "warm"):
        env = dict(os.environ, DIFFUSION_JAX_COMPILATION_CACHE=cache)
        env.pop("JAX_COMPILATION_CACHE_DIR", None)
        rows = {}
        print(f"\ntail, {case} cache")
        for name, command in commands.items():
            load = _load()
            wall, cpu = _timed(command, env)
            rows[name] = {"seconds": wall, "cpu_seconds": cpu, "load": load}
            print(f"  {name:<38} {wall:6.1f} s  CPU {cpu:5.1f} s  (load {load:.1f})")
        tail = [r for n, r in rows.items() if not n.startswith("python -c")]
        wall, cpu = sum(r["seconds"] for r in tail), sum(r["cpu_seconds"] for r in tail)
        print(f"  {'total (the demo tail)':<38} {wall:6.1f} s  CPU {cpu:5.1f} s")
        results[case] = rows
    shutil.rmtree(cache, ignore_errors=True)
    shutil.rmtree(out, ignore_errors=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=["startup", "tail", "both"], default="startup")
    parser.add_argument("--workdir", default="out/digits", help="a trained digits workdir")
    parser.add_argument("--background", action="store_true", help="also the background cases")
    parser.add_argument("--steps", type=int, default=2, help="steps before the eval and grid")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--cache", default="off", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        _child(args)
        return
    sys.path.insert(0, REPO)
    from benchmarks import common

    if args.part in ("startup", "both"):
        payload = {"machine": common.machine(), "startup": _startup(args)}
        print("\nwrote", common.write_json("startup", payload))
    if args.part in ("tail", "both"):
        payload = {"machine": common.machine(), "tail": _tail(args)}
        print("\nwrote", common.write_json("startup_tail", payload))


if __name__ == "__main__":
    main()
