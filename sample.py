"""Turns a checkpoint into samples: flags -> ``evaluation.sampling.sample_from_workdir``.

  python sample.py --workdir workdirs/digits --num 64 --method ddim --steps 50 --out out/samples
  python sample.py --workdir W --guidance 3 --labels 0,1,2 --method dpm_solver++ --steps 20
  python sample.py --workdir W --method heun --steps 18 --sigma_max 80 --S_churn 40

Writes ``grid.png`` and ``samples.npz`` (uint8 images, or float points for 2-D data with a
``scatter.png``), and with ``--individual`` one PNG per sample. The same ``--seed`` gives the
same samples at any ``--batch_size`` and on any number of devices. Compiled samplers are cached
as ``train.py`` caches its steps (``--compilation_cache=DIR|off``). A request the library
refuses exits with status 2 and one ``error: ...`` line on stderr that names the flag.
"""

import logging
import sys

from absl import app, flags

flags.DEFINE_string("workdir", None, "Training workdir holding checkpoints/.")
flags.DEFINE_string("out", None, "Output directory (default: WORKDIR/generated).")
flags.DEFINE_integer("checkpoint_step", None, "Checkpoint step (default: the latest good one).")
flags.DEFINE_enum("params", "ema", ["ema", "raw"], "EMA or raw parameters.")
flags.DEFINE_integer("num", 64, "Number of samples.")
flags.DEFINE_integer("batch_size", None, "Samples per compiled call (default: min(num, 64)).")
flags.DEFINE_string("method", "ddim", "ddpm | ddim | dpm_solver++ | heun | euler")
flags.DEFINE_integer("steps", 50, "Sampler steps (model evaluations).")
flags.DEFINE_float("eta", 0.0, "DDIM stochasticity in [0, 1].")
flags.DEFINE_string(
    "timestep_spacing", "linspace", "Timesteps of a shortened run: linspace | leading | "
    "trailing | quadratic (ddpm, ddim, dpm_solver++)."
)  # fmt: skip
# EDM's sampler settings (heun, euler; samplers.EDMOptions); unset flags keep EDM's defaults.
flags.DEFINE_float("sigma_min", None, "heun/euler: smallest sigma (default: the schedule's).")
flags.DEFINE_float("sigma_max", None, "heun/euler: largest sigma (default: 80, EDM's).")
flags.DEFINE_float("rho", None, "heun/euler: the sigma grid's exponent (default 7).")
flags.DEFINE_float("S_churn", None, "heun/euler: total churn; > 0 is the stochastic sampler.")
flags.DEFINE_float("S_tmin", None, "heun/euler: churn applies from this sigma (default 0).")
flags.DEFINE_float("S_tmax", None, "heun/euler: churn applies up to this sigma (default inf).")
flags.DEFINE_float("S_noise", None, "heun/euler: scale of the churn noise (default 1).")
flags.DEFINE_integer("seed", 0, "Samples are a function of (seed, sample index).")
flags.DEFINE_float("guidance", None, "Classifier-free guidance weight (needs --labels).")
flags.DEFINE_string("labels", None, "Comma-separated class labels, repeated to --num.")
flags.DEFINE_bool("individual", False, "Also write one PNG per sample.")
flags.DEFINE_string(
    "compilation_cache",
    None,
    "Directory of JAX's persistent compilation cache, or 'off' (default: "
    "$DIFFUSION_JAX_COMPILATION_CACHE, else $XDG_CACHE_HOME/diffusion_jax/jax).",
)
flags.mark_flags_as_required(["workdir"])
FLAGS = flags.FLAGS

# evaluation.sampling's argument names -> these flags, for its error messages.
FLAG_NAMES = {
    "which": "--params",
    "batch_size": "--batch_size",
    "checkpoint_step": "--checkpoint_step",
    "eta": "--eta",
    "guidance": "--guidance",
    "labels": "--labels",
    "method": "--method",
    "num": "--num",
    "out": "--out",
    "steps": "--steps",
    "timestep_spacing": "--timestep_spacing",
    "edm": "--sigma_min/--sigma_max/--rho/--S_*",
}
EDM_FLAGS = ("sigma_min", "sigma_max", "rho", "S_churn", "S_tmin", "S_tmax", "S_noise")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    logging.getLogger().setLevel(logging.INFO)
    from diffusion_jax import _runtime, options

    _runtime.quiet_library_logs()
    _runtime.keep_freed_memory()  # this process is ours: keep freed heap pages (faster steps)
    _runtime.use_compilation_cache(FLAGS.compilation_cache)  # a second run skips compiling
    import os

    from diffusion_jax import samplers
    from diffusion_jax.evaluation import sampling
    from diffusion_jax.train.checkpoint import CheckpointError

    edm_values = {name: FLAGS[name].value for name in EDM_FLAGS if FLAGS[name].value is not None}
    edm = samplers.EDMOptions(**edm_values) if edm_values else None
    try:
        written = sampling.sample_from_workdir(
            FLAGS.workdir,
            out=FLAGS.out or os.path.join(FLAGS.workdir, "generated"),
            num=FLAGS.num,
            batch_size=FLAGS.batch_size,
            method=FLAGS.method,
            steps=FLAGS.steps,
            eta=FLAGS.eta,
            timestep_spacing=FLAGS.timestep_spacing,
            edm=edm,
            seed=FLAGS.seed,
            which=FLAGS.params,
            checkpoint_step=FLAGS.checkpoint_step,
            guidance=FLAGS.guidance,
            labels=FLAGS.labels,
            individual=FLAGS.individual,
        )
    except options.ArgumentError as err:
        print(f"error: {err.for_flags(FLAG_NAMES)}", file=sys.stderr)
        return 2
    except (ValueError, FileNotFoundError, CheckpointError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for kind, path in written.items():
        print(f"wrote {kind}: {path}")
    return 0


if __name__ == "__main__":
    app.run(main)
