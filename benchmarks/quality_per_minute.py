"""Quality per minute: digits recipes trained for a fixed wall time, sampled and scored.

Each recipe is a set of overrides of ``configs/digits.py`` (``quality_recipes.py``: one lever
of issue 16 at a time: learning rate and warm-up, batch size, EMA decay and warm-up, eps/v and
min-SNR weighting, timestep sampling, width and depth; the sampler and its steps are scored on
the default recipe's runs, since they need no training of their own). For each (recipe, seed):

1. train ``train_and_evaluate`` in this process for ``--minutes`` of wall time, counted by the
   trainer from the end of its first step (``train.max_seconds``: compilation, data
   preparation and the final save are outside the budget and reported as ``overhead_s``);
   ``train.num_steps``, the length of the learning-rate schedule, is set to the steps the
   recipe reaches in the budget, measured once per recipe by a ``--calibrate_seconds`` run
   (or fixed with ``--schedule_steps``), so a cosine decay ends near the end of the budget;
2. sample ``--num_samples`` digits from the EMA parameters with each of the recipe's samplers
   (``sample.py``'s path, :func:`diffusion_jax.evaluation.sampling.sample_from_workdir`);
3. score them as ``python -m diffusion_jax.evaluation digits`` does
   (:func:`~diffusion_jax.evaluation.digits_check.digits_report`: the recognisable fraction,
   i.e. confident and near a real digit, and the classes present) and by the Frechet distance
   to the held-out digits in PCA space
   (:func:`~diffusion_jax.evaluation.digits_check.digits_frechet_distance`, lower is better);
4. append one JSON row per sampler to ``--results`` (default
   ``benchmarks/results/quality_per_minute.jsonl``), with the machine's load average before
   and after training: a wall-time study is only valid on a quiet machine.

Programs are cached as ``train.py`` caches them (:func:`diffusion_jax._runtime.
use_compilation_cache`; ``DIFFUSION_JAX_COMPILATION_CACHE=off`` turns it off), which shortens
``overhead_s`` but never the budget.

``--table`` prints the markdown table of a results file (``quality_table.py``): per recipe,
sampler, budget and sample size, the mean and the seed spread (max - min over seeds) of each
figure, and the ceiling: real digits' own scores (the held-out digits for the check, the
Frechet distance of ``--num_samples`` real train digits drawn with each seed, the floor a
perfect generator would reach at that N).
The diffusers peer (``benchmarks/peer_quality.py``) appends rows to the same file.

Run from the repository root:
  .venv/bin/python benchmarks/quality_per_minute.py --recipe all --seeds 0 1 --minutes 5
  .venv/bin/python benchmarks/quality_per_minute.py --recipe default lr_2e-3 --seeds 0 1
  .venv/bin/python benchmarks/quality_per_minute.py --table
  .venv/bin/python benchmarks/quality_per_minute.py --list
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax
import ml_collections
import numpy as np

from benchmarks.quality_recipes import HARNESS_OVERRIDES, RECIPES
from benchmarks.quality_table import CEILING_SAMPLES, read_rows, table
from configs import digits as digits_config
from diffusion_jax import _runtime
from diffusion_jax.evaluation import digits_check, sampling
from diffusion_jax.train import config as config_lib
from diffusion_jax.train import loop

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(REPO, "benchmarks", "results", "quality_per_minute.jsonl")


def apply_overrides(config: ml_collections.ConfigDict, overrides: dict[str, Any]):
    """Sets dotted keys of ``config`` (``{"optim.lr": 2e-3}``); returns ``config``.

    Raises:
      KeyError: a key the config does not have.
    """
    for dotted, value in overrides.items():
        node = config
        *parents, leaf = dotted.split(".")
        for name in parents:
            node = node[name]
        if leaf not in node:
            raise KeyError(f"recipe override {dotted!r}: the config has no such field")
        node[leaf] = value
    return config


def recipe_config(
    name: str, *, seed: int = 0, num_steps: int | None = None, max_seconds: float = 0.0
) -> ml_collections.ConfigDict:
    """The training config of recipe ``name`` as the harness runs it.

    Args:
      name: a key of ``quality_recipes.RECIPES``.
      seed: ``config.seed``.
      num_steps: the learning-rate schedule's length (``train.num_steps``); None keeps 3000.
      max_seconds: the wall budget (``train.max_seconds``; 0: none).

    Returns:
      A validated config.

    Example:
      >>> recipe_config("v", seed=1).diffusion.parameterization
      'v'
    """
    if name not in RECIPES:
        raise ValueError(f"unknown recipe {name!r}; --list shows the {len(RECIPES)} recipes.")
    config = digits_config.get_config()
    apply_overrides(config, RECIPES[name][1])
    apply_overrides(config, HARNESS_OVERRIDES)
    config.seed = seed
    if num_steps is not None:
        config.train.num_steps = int(num_steps)
    config.train.max_seconds = float(max_seconds)
    config_lib.validate_config(config)
    return config


def recipe_settings(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """The optimiser and batch settings a row records (the peer follows them too)."""
    return {
        "lr": config.optim.lr,
        "warmup_steps": config.optim.warmup_steps,
        "batch_size": config.data.batch_size,
        "ema_decay": config.optim.ema_decay,
    }


def _steps_reached(workdir: str) -> int:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return max(json.loads(line)["step"] for line in f if line.strip())


def train_for(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """Trains ``config`` into a fresh ``workdir`` within its ``train.max_seconds``.

    Returns:
      ``{"steps", "train_s" (wall of the whole call), "overhead_s" (train_s minus the
      budget: data, init, compilation, the final save), "steps_per_s" (steps after the first
      over the budget), "budget_spent" (False when train.num_steps came first), "params"
      (the network's parameter count), "final_loss",
      "load_before", "load_after"}``.
    """
    if os.path.exists(workdir):
        shutil.rmtree(workdir)
    load_before = os.getloadavg()[0]
    start = time.perf_counter()
    state = loop.train_and_evaluate(config, workdir)
    seconds = time.perf_counter() - start
    steps = _steps_reached(workdir)
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        losses = [r["loss"] for r in map(json.loads, f) if "loss" in r]
    budget = config.train.max_seconds
    spent = steps < config.train.num_steps
    return {
        "steps": steps,
        "train_s": round(seconds, 1),
        "overhead_s": round(seconds - budget, 1) if spent else None,
        "steps_per_s": round((steps - 1) / budget, 2) if spent else None,
        "budget_spent": spent,
        "params": int(sum(x.size for x in jax.tree.leaves(state.params))),
        "final_loss": losses[-1] if losses else None,
        "load_before": round(load_before, 2),
        "load_after": round(os.getloadavg()[0], 2),
    }


def calibrate(name: str, seconds: float, minutes: float, workdir: str) -> int:
    """The steps recipe ``name`` reaches in ``minutes``, extrapolated from a ``seconds`` run."""
    config = recipe_config(name, num_steps=10**7, max_seconds=seconds)
    run = train_for(config, workdir)
    shutil.rmtree(workdir, ignore_errors=True)
    return max(1, math.floor(run["steps_per_s"] * minutes * 60))


def score(images: np.ndarray) -> dict[str, Any]:
    """The digits check and the PCA Frechet distance of uint8 ``[N, 8, 8, 1]`` samples; with
    more than :data:`CEILING_SAMPLES` of them, also the distance of the first
    ``CEILING_SAMPLES`` (``frechet_pca_1500``), the size at which real digits' floor is exact.
    """
    report = digits_check.digits_report(images)
    scores = {
        "num_samples": len(images),
        "recognisable": report["recognisable_fraction"],
        "confident": report["confident_fraction"],
        "near": report["near_fraction"],
        "classes": report["classes_present"],
        "frechet_pca": digits_check.digits_frechet_distance(images),
    }
    if len(images) > CEILING_SAMPLES:
        scores["frechet_pca_1500"] = digits_check.digits_frechet_distance(images[:CEILING_SAMPLES])
    return scores


def sample_and_score(workdir: str, method: str, steps: int, num: int, seed: int) -> dict[str, Any]:
    """Samples ``num`` digits from a run's EMA parameters and scores them."""
    start = time.perf_counter()
    written = sampling.sample_from_workdir(
        workdir,
        out=os.path.join(workdir, "generated", f"{method}_{steps}"),
        num=num,
        method=method,
        steps=steps,
        seed=seed,
        progress=False,
    )
    seconds = time.perf_counter() - start
    with np.load(written["npz"]) as npz:
        images = npz["images"]
    return {"sampler": f"{method}:{steps}", "sample_s": round(seconds, 1), **score(images)}


def git_commit() -> str:
    """The repository's HEAD commit (short), with ``+dirty`` when the tree has changes."""
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=REPO,
            capture_output=True,
            text=True,
        ).stdout.strip()
        return head + ("+dirty" if dirty else "")
    except OSError:
        return "unknown"


def append_row(path: str, row: dict[str, Any]) -> None:
    """Appends one JSON row to ``path`` (created with its directory)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")


def warn_if_loaded() -> None:
    """Says so when the machine is busier than its cores: wall-time figures are then not
    valid for the study (the rows record the load either way)."""
    load, cores = os.getloadavg()[0], os.cpu_count() or 1
    if load > cores:
        print(
            f"WARNING: load average {load:.1f} on {cores} cores: the wall-time budget buys "
            "fewer steps than on a quiet machine; do not use these rows for the study.",
            flush=True,
        )


def run_recipe(name: str, args: argparse.Namespace, scratch: str) -> None:
    """Calibrates, trains, samples and scores one recipe for every seed, appending rows."""
    samplers = RECIPES[name][2]
    if args.samplers:
        samplers = tuple((m, int(s)) for m, s in (item.split(":") for item in args.samplers))
    budget = args.minutes * 60
    horizon = args.schedule_steps or calibrate(
        name, args.calibrate_seconds, args.minutes, os.path.join(scratch, f"{name}_calibrate")
    )
    print(f"{name}: learning-rate schedule of {horizon} steps", flush=True)
    for seed in args.seeds:
        commit = git_commit()  # the code this run trains with (others may commit meanwhile)
        workdir = os.path.join(scratch, f"{name}_seed{seed}")
        config = recipe_config(name, seed=seed, num_steps=horizon, max_seconds=budget)
        trained = train_for(config, workdir)
        print(f"  seed {seed}: {trained}", flush=True)
        for method, steps in samplers:
            row = {
                "recipe": name,
                "seed": seed,
                "minutes": args.minutes,
                "schedule_steps": horizon,
                **recipe_settings(config),
                **trained,
                **sample_and_score(workdir, method, steps, args.num_samples, seed),
                "date": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
                "commit": commit,
                "cores": os.cpu_count(),
            }
            append_row(args.results, row)
            print(
                f"    {row['sampler']}: recognisable {row['recognisable']:.2f}, classes "
                f"{row['classes']}, Frechet {row['frechet_pca']:.3f}",
                flush=True,
            )
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", nargs="+", default=["default"], help="names, or 'all'")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    parser.add_argument("--minutes", type=float, default=5.0, help="training wall budget")
    parser.add_argument("--num_samples", type=int, default=500)
    parser.add_argument(
        "--samplers",
        nargs="+",
        default=None,
        help="method:steps for every recipe (default: the recipe's own)",
    )
    parser.add_argument("--calibrate_seconds", type=float, default=30.0)
    parser.add_argument(
        "--schedule_steps", type=int, default=0, help="fixed train.num_steps (0: calibrate)"
    )
    parser.add_argument("--results", default=RESULTS, help="JSONL file rows are appended to")
    parser.add_argument("--workdir", default=None, help="scratch directory (default: a temp)")
    parser.add_argument("--keep", action="store_true", help="keep the runs' workdirs")
    parser.add_argument("--table", action="store_true", help="print the table of --results")
    parser.add_argument("--list", action="store_true", help="list the recipes")
    args = parser.parse_args(argv)

    if args.list:
        for name, (what, overrides, samplers) in RECIPES.items():
            print(f"{name:22s} {what}: {overrides or '-'}; samplers {samplers}")
        return
    if args.table:
        print(table(read_rows(args.results)))
        return
    names = list(RECIPES) if args.recipe == ["all"] else args.recipe
    for name in names:
        try:
            recipe_config(name)  # unknown names and invalid recipes fail before any training
        except (KeyError, ValueError) as error:
            parser.error(str(error))
    if args.minutes <= 0 or args.num_samples < 2:
        parser.error("--minutes must be > 0 and --num_samples >= 2.")
    scratch = args.workdir or tempfile.mkdtemp(prefix="quality_per_minute_")
    # train.py's persistent compilation cache: a recipe's second seed (and its run after the
    # calibration) reads its programs back instead of compiling them again.
    _runtime.use_compilation_cache()
    # As train.py: this process is ours, so glibc keeps freed heap pages (without it the step
    # gave back and faulted in its buffers every step: 11.4 steps/s instead of 13.1 on digits).
    _runtime.keep_freed_memory()
    print(f"load average {os.getloadavg()}; runs in {scratch}", flush=True)
    warn_if_loaded()
    failed = []
    for name in names:
        try:
            run_recipe(name, args, scratch)
        except Exception as error:  # a long study goes on to the next recipe
            print(f"{name}: FAILED: {type(error).__name__}: {error}", flush=True)
            failed.append(name)
    if failed:
        raise SystemExit(f"recipes that failed (no rows written for them): {failed}")


if __name__ == "__main__":
    main()
