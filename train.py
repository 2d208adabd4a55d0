"""Trains a diffusion model: flags -> ``diffusion_jax.train.train_and_evaluate``.

  python train.py --config configs/digits.py --workdir workdirs/digits
  python train.py --config configs/cifar10.py --workdir W --config.train.num_steps=1000

Running it again on the same workdir resumes from the latest good checkpoint. On several hosts,
start one process per host; ``jax.distributed`` is initialised from the environment (TPU pods,
SLURM) or from ``--coordinator_address/--num_processes/--process_id``. A run the library refuses
(an invalid config, a workdir trained with another config, no readable checkpoint, persistent
non-finite updates) exits with status 2 and one ``error: ...`` line on stderr, which names the
flag to change where the library names an argument of ``train_and_evaluate``.
"""

import logging
import sys

from absl import app, flags
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", "configs/default.py", "Training config file.")
flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and samples.")
flags.DEFINE_bool(
    "allow_config_change", False, "Resume a workdir even though its saved config differs."
)
flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (multi-process runs).")
flags.DEFINE_integer("num_processes", None, "Number of processes (multi-process runs).")
flags.DEFINE_integer("process_id", None, "This process's index (multi-process runs).")
flags.mark_flags_as_required(["workdir"])

# train_and_evaluate's argument names -> these flags, for its error messages.
FLAG_NAMES = {"allow_config_change": "--allow_config_change"}


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    logging.getLogger().setLevel(logging.INFO)
    from diffusion_jax import _runtime, options

    _runtime.quiet_library_logs()
    _runtime.keep_freed_memory()  # this process is ours: keep freed heap pages (faster steps)
    from diffusion_jax import train

    train.sharding.initialize_distributed(
        FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id
    )
    try:
        train.train_and_evaluate(
            FLAGS.config, FLAGS.workdir, allow_config_change=FLAGS.allow_config_change
        )
    except (
        ValueError,
        FileNotFoundError,
        train.checkpoint.CheckpointError,
        train.NonFiniteError,
    ) as err:
        message = err.for_flags(FLAG_NAMES) if isinstance(err, options.ArgumentError) else err
        logging.error("%s", message)
        print(f"error: {message}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    app.run(main)
