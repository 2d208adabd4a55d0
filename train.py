"""Trains a diffusion model: flags -> ``diffusion_jax.train.train_and_evaluate``.

  python train.py --config configs/digits.py --workdir workdirs/digits
  python train.py --config configs/cifar10.py --workdir W --config.train.num_steps=1000

Running it again on the same workdir resumes from the latest good checkpoint. Compiled programs
are cached in ``~/.cache/diffusion_jax/jax`` (``--compilation_cache=DIR|off``, or the
environment variable ``DIFFUSION_JAX_COMPILATION_CACHE``), so a second run starts sooner. On
several hosts, start one process per host; ``jax.distributed`` is initialised from the
environment (TPU pods, SLURM) or from ``--coordinator_address/--num_processes/--process_id``
(all three, or none).

Exit status: 0 when the run is complete; ``128 + signal`` (143 for SIGTERM, 130 for Ctrl-C)
when a signal stopped it after saving its checkpoint (run again to resume); 2 when it is
refused: a missing or broken config file, an unknown config key (the nearest known one is
named), an invalid value, a config that does not fit the data, an empty or unwritable workdir,
a workdir another process is training (named), multi-process flags that do not add up, a
workdir trained with another config, no readable checkpoint, persistent non-finite updates, a
full disk. A refusal is one ``error: ...`` line on stderr, naming the flag to change, with no
traceback unless ``--verbose`` or ``DIFFUSION_JAX_TRACEBACK=1``.
"""

import difflib
import importlib.util
import logging
import os
import sys
import threading
import traceback

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
flags.DEFINE_integer(
    "distributed_timeout", 300, "Seconds to wait for every process to join (multi-process runs)."
)
flags.DEFINE_bool("verbose", False, "Print the traceback of a refused run too.")
flags.DEFINE_string(
    "compilation_cache",
    None,
    "Directory of JAX's persistent compilation cache, or 'off' (default: "
    "$DIFFUSION_JAX_COMPILATION_CACHE, else $XDG_CACHE_HOME/diffusion_jax/jax).",
)
flags.mark_flags_as_required(["workdir"])

# train_and_evaluate's (and initialize_distributed's) argument names -> these flags.
FLAG_NAMES = {
    name: f"--{name}"
    for name in (
        "allow_config_change",
        "workdir",
        "coordinator_address",
        "num_processes",
        "process_id",
    )
}
TRACEBACK_ENV = "DIFFUSION_JAX_TRACEBACK"


def _tracebacks_wanted(argv: list[str]) -> bool:
    """``--verbose`` (read from argv: it must work when the flags themselves do not parse) or
    ``DIFFUSION_JAX_TRACEBACK=1``."""
    verbose = any(arg in ("--verbose", "--verbose=true", "--verbose=True") for arg in argv)
    return verbose or os.environ.get(TRACEBACK_ENV, "") not in ("", "0")


def _watch_group_forming(seconds: int) -> threading.Event:
    """Exits with one ``error:`` line (status 2) unless the returned event is set within
    ``seconds``: a multi-process run whose peers never join would otherwise wait, then abort in
    JAX's runtime with a C++ stack trace."""
    joined = threading.Event()

    def watch() -> None:
        if not joined.wait(seconds):
            if FLAGS.coordinator_address:
                what = (
                    f"process {FLAGS.process_id} of {FLAGS.num_processes} could not form the "
                    f"group at {FLAGS.coordinator_address}"
                )
                fix = (
                    "Start every process with the same --coordinator_address and "
                    "--num_processes, and a --process_id of its own."
                )
            else:
                what = "the processes of this cluster (found in the environment) did not all join"
                fix = "Check that every process of the job started."
            print(
                f"error: {what} within {seconds} s (--distributed_timeout). {fix}",
                file=sys.stderr,
                flush=True,
            )
            os._exit(2)

    threading.Thread(target=watch, daemon=True, name="distributed-watch").start()
    return joined


def _refuse(message: str, argv: list[str]) -> int:
    """Prints the one line of a refusal (after the traceback, if wanted); returns 2."""
    if _tracebacks_wanted(argv):
        traceback.print_exc()
    print(f"error: {' '.join(str(message).split())}", file=sys.stderr)
    return 2


def _config_path(argv: list[str]) -> str:
    """The ``--config`` file named in argv (the flag's default if none)."""
    for i, arg in enumerate(argv):
        if arg.startswith("--config="):
            return arg.split("=", 1)[1]
        if arg == "--config" and i + 1 < len(argv):
            return argv[i + 1]
    return FLAGS["config"].default_as_str.strip("'\"")


def _config_keys(config, prefix: str = "") -> list[str]:
    keys = []
    for name, value in config.items():
        if hasattr(value, "items"):
            keys += _config_keys(value, f"{prefix}{name}.")
        keys.append(f"{prefix}{name}")
    return keys


def _describe_flag_error(err: Exception, argv: list[str]) -> str:
    """What is wrong with the command line, in one sentence: a missing or broken config file,
    an override of a key the config does not have (with the nearest known key), or absl's own
    message."""
    path = _config_path(argv)
    if not os.path.isfile(path):
        return f"--config={path}: no such config file."
    try:
        spec = importlib.util.spec_from_file_location("train_config_file", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        config = module.get_config()
    except Exception as load_error:  # any error of the user's file is reported, not raised
        if isinstance(load_error, SyntaxError):
            where = f"line {load_error.lineno}: {load_error.msg}"
        else:
            where = f"{type(load_error).__name__}: {load_error}"
        return f"--config={path} does not load ({where})."
    known = _config_keys(config)
    for arg in argv:
        if arg.startswith("--config.") or arg.startswith("--noconfig."):
            key = arg.split("=", 1)[0].split("config.", 1)[1]
            if key not in known:
                nearest = difflib.get_close_matches(key, known, n=1, cutoff=0.5)
                hint = f"; did you mean {nearest[0]!r}?" if nearest else "."
                return (
                    f"{arg}: the config has no key {key!r}{hint} (every field is declared in "
                    "diffusion_jax/train/defaults.py)"
                )
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return " ".join(lines) or type(err).__name__


def parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing, with a command line that does not parse (or a config that does not
    load) reported as one ``error:`` line and exit status 2."""
    try:
        rest = FLAGS(argv)
        FLAGS.config.keys()  # a config that failed to load raises on first use: now
    except Exception as err:
        sys.exit(_refuse(_describe_flag_error(err, argv), argv))
    return rest


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    logging.getLogger().setLevel(logging.INFO)
    from diffusion_jax import _runtime, options

    _runtime.quiet_library_logs()
    _runtime.keep_freed_memory()  # this process is ours: keep freed heap pages (faster steps)
    _runtime.use_compilation_cache(FLAGS.compilation_cache)  # a second run skips compiling
    from diffusion_jax import train

    try:
        joined = _watch_group_forming(FLAGS.distributed_timeout)
        train.sharding.initialize_distributed(
            FLAGS.coordinator_address,
            FLAGS.num_processes,
            FLAGS.process_id,
            # JAX aborts the process at its own timeout: ours fires first, with one line.
            timeout_seconds=FLAGS.distributed_timeout + 30,
        )
        joined.set()
        train.train_and_evaluate(
            FLAGS.config, FLAGS.workdir, allow_config_change=FLAGS.allow_config_change
        )
    except train.Preempted as stop:  # saved; the loop has logged where
        return stop.exit_status
    except KeyboardInterrupt:  # a second Ctrl-C: the latest complete checkpoint stands
        print("error: interrupted; run again to resume from the last checkpoint.", file=sys.stderr)
        return 130
    except (
        ValueError,
        OSError,  # FileNotFoundError (a dataset not prepared), a full disk, a permission
        train.checkpoint.CheckpointError,
        train.NonFiniteError,
        train.lock.WorkdirLockedError,
    ) as err:
        message = err.for_flags(FLAG_NAMES) if isinstance(err, options.ArgumentError) else err
        return _refuse(message, sys.argv)
    return 0


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
