"""Trains a diffusion model: flags -> ``diffusion_jax.train.train_and_evaluate``.

  python train.py --config configs/digits.py --workdir workdirs/digits
  python train.py --config configs/cifar10.py --workdir W --config.train.num_steps=1000

Running it again on the same workdir resumes from the latest good checkpoint. On several hosts,
start one process per host; ``jax.distributed`` is initialised from the environment (TPU pods,
SLURM) or from ``--coordinator_address/--num_processes/--process_id``.
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


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    logging.getLogger().setLevel(logging.INFO)
    from diffusion_jax import _runtime

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
    except (ValueError, FileNotFoundError, train.NonFiniteError) as err:
        logging.error("%s", err)
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    app.run(main)
