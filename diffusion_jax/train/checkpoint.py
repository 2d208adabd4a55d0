"""Checkpoints: the only module that talks to orbax.

It stays one module (about 600 lines, over the house's ~400) because keeping every orbax call
in one place is the point: saving, restoring, the readers, the fallback past unreadable steps
and the quarantine of corrupt ones share the orbax manager set-up and its item layout. The JSON and
digest encoding is in :mod:`diffusion_jax.train.checkpoint_codec`.

A checkpoint is one orbax step directory ``<directory>/<step>/`` with three items:

- ``state``: the training state, any pytree of ``jax.Array`` (orbax ``StandardSave``, OCDBT);
  its orbax custom metadata holds one integrity digest per leaf (see below);
- ``data_state``: the data iterator's state, JSON, with the SHA-256 of its canonical text;
- ``config``: the run's config, JSON, with the SHA-256 of its canonical text.

Saves are asynchronous by default: :meth:`CheckpointManager.save` returns once the arrays are
copied off the device, and orbax writes them in a background thread into a temporary directory
that it renames into place when complete, so a killed save leaves no visible step.

**Corruption.** Orbax reports missing or truncated array files, but a flipped bit inside
compressed array data restores silently to wrong values. So each save records, per leaf, the
dtype and a 32-bit digest ``sum_i bits_i * w_i mod 2**32`` (``bits`` the leaf's raw bits as
uint32, ``w_i`` an odd weight of the flat index, so any single-bit change alters it), in integer
arithmetic that gives the same result under any sharding (on the host for the leaves this
process holds whole, on their devices for the others). A restore
recomputes the digests and treats a mismatch like an unreadable file: with ``step=None`` it warns,
names the step and falls back to the previous one. The two JSON items are checked the same way
against their SHA-256 (an edited data position would otherwise resume silently from other data);
a config that is not a JSON object is refused too. Checkpoints written before the JSON digests
existed still load, unchecked. A non-finite state is never saved, so none is ever restored
either.

**One rule for every reader.** :meth:`CheckpointManager.restore` (the trainer's resume),
:meth:`CheckpointManager.read_config`, :func:`read_config`, :func:`restore_params` and
:func:`restore_params_with_config` (sampling, evaluation) all skip an unreadable newest
checkpoint (any item: arrays, digests, data position, config) with one warning naming it, and
use the newest readable one; only an explicitly requested ``step`` fails without falling back.
The writer (:meth:`CheckpointManager.restore`) also moves the skipped steps to ``corrupt/``.

**JSON values** (``data_state`` and ``config``) may nest dicts with ``str`` keys, lists, ``str``,
``int``, ``float``, ``bool`` and ``None``, and also ``bytes`` (stored as
``{"__bytes_base64__": "<base64>"}``) and tuples (stored as ``{"__tuple__": [...]}``); both come
back as they went in. NumPy scalars come back as Python scalars. Dicts may not use those two
reserved keys.

**Several processes** (``jax.distributed``): every process makes the same calls. Each writes its
shards of the arrays; ``data_state`` and ``config`` are written by process 0 alone, and every
process restores process 0's (the data pipeline's state is the same on every process).

Example:
  >>> with CheckpointManager(workdir + "/checkpoints", max_to_keep=3) as manager:
  ...     manager.save(step, state, data_state=iterator.get_state(), config=config_dict)
  >>> restored = CheckpointManager(workdir + "/checkpoints").restore(abstract_state)
  >>> restored.step, restored.state, restored.data_state, restored.config
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Iterator, Mapping
from typing import Any, NamedTuple, TypeVar

import jax
import orbax.checkpoint as ocp

from diffusion_jax import options
from diffusion_jax.train.checkpoint_codec import (
    json_item,
    leaf_digests,
    read_json_item,
    verify_digests,
)

__all__ = [
    "PARAMS_KEYS",
    "CheckpointError",
    "CheckpointManager",
    "Restored",
    "read_config",
    "restore_params",
    "restore_params_with_config",
]

logger = logging.getLogger(__name__)

_STATE, _DATA_STATE, _CONFIG = "state", "data_state", "config"
_DIGESTS = "leaf_digests"  # key in the state item's orbax custom metadata
_CORRUPT_DIR = "corrupt"  # where a writer moves steps it could not restore
_T = TypeVar("_T")


class CheckpointError(RuntimeError):
    """No readable checkpoint: none was ever saved, or every one tried is corrupt."""


class _CallerError(Exception):
    """A restore that fails because of the request, not the checkpoint: never falls back."""


class _CallerFailure(Exception):
    """An error of the caller's own code run on a step's config during a restore.

    The config may be what is wrong (an old checkpoint without digests), so the previous step
    is tried; if no step works, the newest such error is re-raised as it is.
    """

    def __init__(self, error: Exception):
        super().__init__(str(error))
        self.error = error


class _MissingSubtree(_CallerError, KeyError):
    """The saved state has no such top-level entry."""


class Restored(NamedTuple):
    """What :meth:`CheckpointManager.restore` returns."""

    step: int  # the checkpoint's step
    state: Any  # pytree like the abstract state, arrays with its shardings
    data_state: Any  # the data iterator state saved with it, or None
    config: dict | None  # the config saved with it, or None


# ----------------------------------------------------------------------------- integrity


def _read_item(items: Any, name: str) -> Any:
    """The checked value of JSON item ``name`` of a restored step (ValueError if corrupt; the
    warning or error that reports it names the step's path)."""
    return read_json_item(items[name], f"the {name} item", mapping=name == _CONFIG)


_JSON_ITEMS = ocp.args.Composite(
    **{_DATA_STATE: ocp.args.JsonRestore(), _CONFIG: ocp.args.JsonRestore()}
)


def _read_config(manager: ocp.CheckpointManager, step: int) -> dict | None:
    """A step's config, after checking both JSON items (a step is readable as a whole or not)."""
    items = manager.restore(step, args=_JSON_ITEMS)
    _read_item(items, _DATA_STATE)
    return _read_item(items, _CONFIG)


# ----------------------------------------------------------------------------- fallback


def _first_good(
    directory: str,
    steps: list[int],
    read: Callable[[int], _T],
    *,
    fall_back: bool,
    warn: bool = True,
) -> tuple[int, _T, list[int]]:
    """Calls ``read(step)`` on ``steps`` (newest first) until one succeeds.

    Returns:
      (step, read(step), the steps that failed before it).
    """
    if not steps:
        raise CheckpointError(f"No checkpoint found in {directory}.")
    failures: list[tuple[int, Exception]] = []
    for step in steps if fall_back else steps[:1]:
        try:
            value = read(step)
        except _CallerError:
            raise
        except Exception as error:  # any read error means this step is unusable
            failures.append((step, error))
            continue
        # Warned only once a step is found: a request no step can satisfy gets one error.
        for failed, error in failures if warn else []:
            cause = error.error if isinstance(error, _CallerFailure) else error
            first_line = (str(cause).strip().splitlines() or [""])[0][:300]
            logger.warning(
                "Checkpoint %s is unreadable or corrupt (%s: %s); skipped it, using step %d.",
                os.path.join(directory, str(failed)),
                type(cause).__name__,
                first_line,
                step,
            )
        return step, value, [s for s, _ in failures]
    caller = [e for _, e in failures if isinstance(e, _CallerFailure)]
    if caller:  # most likely the request, not the checkpoints: the caller's own error
        raise caller[0].error from None
    details = "; ".join(
        f"{os.path.join(directory, str(s))}: {type(e).__name__}: {str(e).strip()[:300]}"
        for s, e in failures
    )
    raise CheckpointError(
        f"No readable checkpoint in {directory}; tried steps {[s for s, _ in failures]}: {details}"
    ) from failures[-1][1]


class _DropReadOnlyNotice(logging.Filter):
    """Drops orbax's "Given directory is read only" warning, which every reader would print."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Given directory is read only")


@contextlib.contextmanager
def _quiet_read_only_notice() -> Iterator[None]:
    # orbax logs it through absl at construction; the filter is on only while constructing.
    absl_logger, notice = logging.getLogger("absl"), _DropReadOnlyNotice()
    absl_logger.addFilter(notice)
    try:
        yield
    finally:
        absl_logger.removeFilter(notice)


def _open_reader(directory: str) -> ocp.CheckpointManager:
    """A read-only orbax manager whose ``state`` item supports partial restores."""
    if not os.path.isdir(directory):
        raise CheckpointError(f"No checkpoint found in {directory}: the directory does not exist.")
    with _quiet_read_only_notice():
        return _reader_manager(directory)


def _reader_manager(directory: str) -> ocp.CheckpointManager:
    return ocp.CheckpointManager(
        directory,
        options=ocp.CheckpointManagerOptions(read_only=True, create=False, save_interval_steps=0),
        item_handlers={
            _STATE: ocp.PyTreeCheckpointHandler(),
            _DATA_STATE: ocp.JsonCheckpointHandler(),
            _CONFIG: ocp.JsonCheckpointHandler(),
        },
    )


def _available_steps(manager: ocp.CheckpointManager, directory: str, step: int | None) -> list[int]:
    """The reader's steps, newest first; a ValueError if ``step`` is given and not among them."""
    available = sorted(manager.all_steps(), reverse=True)
    if step is not None and available and int(step) not in available:
        raise ValueError(
            f"No checkpoint at step {step} in {directory}; available: {sorted(available)}."
        )
    return available


def _saved_digests(manager: ocp.CheckpointManager, step: int) -> dict[str, Any] | None:
    custom = manager.item_metadata(step)[_STATE].custom_metadata or {}
    return custom.get(_DIGESTS)


# ----------------------------------------------------------------------------- public API


class CheckpointManager:
    """Saves and restores training checkpoints in one directory, one orbax step each.

    Args:
      directory: where the step directories live; created if missing.
      max_to_keep: how many of the newest checkpoints to keep (older ones are deleted).
      async_save: write in a background thread (call :meth:`wait_until_finished` or
        :meth:`close` before reading back or exiting).

    Use it as a context manager, or call :meth:`close` when done.
    """

    def __init__(self, directory: str, *, max_to_keep: int = 3, async_save: bool = True):
        if max_to_keep < 1:
            raise ValueError(f"max_to_keep must be at least 1, got {max_to_keep=}.")
        self.directory = os.path.abspath(os.fspath(directory))
        self._max_to_keep, self._async_save = max_to_keep, async_save
        self._manager = self._open(cleanup=False)
        self._cleaned_up = False

    def _open(self, *, cleanup: bool) -> ocp.CheckpointManager:
        return ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(
                max_to_keep=self._max_to_keep,
                enable_async_checkpointing=self._async_save,
                cleanup_tmp_directories=cleanup,
            ),
            item_handlers={
                _STATE: ocp.StandardCheckpointHandler(),
                _DATA_STATE: ocp.JsonCheckpointHandler(),
                _CONFIG: ocp.JsonCheckpointHandler(),
            },
        )

    def save(
        self,
        step: int,
        state: Any,
        *,
        data_state: Any = None,
        config: Mapping[str, Any] | None = None,
        force: bool = False,
    ) -> bool:
        """Saves ``state`` (and the iterator state and config) as checkpoint ``step``.

        Args:
          step: the training step; must be newer than the latest saved step.
          state: pytree of ``jax.Array`` (any sharding; NumPy arrays are accepted too).
          data_state: the data iterator's state: JSON-like (see the module docstring), or None.
          config: the run's config as a JSON-like dict, or None.
          force: save even if orbax's save policy would skip this step (orbax raises if the
            step already exists).

        Returns:
          True if a save was started (it completes in the background when async), False if
          orbax skipped it (e.g. ``step`` is not newer than the latest checkpoint).

        Raises:
          ValueError: if a floating-point leaf of ``state`` holds a NaN or an infinity; nothing
            is saved then.
          TypeError: if ``data_state`` or ``config`` cannot be stored as JSON.
        """
        leaves = leaf_digests(state)
        nonfinite = [name for name, (_, finite, _) in leaves.items() if not finite]
        if nonfinite:
            raise ValueError(
                f"Refusing to save a non-finite state at step {step}: leaves {nonfinite} hold "
                "NaN or inf."
            )
        if config is not None and not isinstance(config, Mapping):
            raise TypeError(f"config must be a dict or None, got {type(config).__name__}.")
        digests = {name: [dtype, digest] for name, (dtype, _, digest) in leaves.items()}
        args = ocp.args.Composite(
            **{
                _STATE: ocp.args.StandardSave(state, custom_metadata={_DIGESTS: digests}),
                _DATA_STATE: ocp.args.JsonSave(json_item(data_state, "data_state")),
                _CONFIG: ocp.args.JsonSave(json_item(config, "config")),
            }
        )
        if not self._cleaned_up:
            # Temporary directories left by a killed save are deleted by the run that saves
            # here next, not on opening: a reader (sample.py during training) must not delete
            # the trainer's save in flight.
            self._manager.close()
            self._manager = self._open(cleanup=True)
            self._cleaned_up = True
        with self._save_errors(f"save checkpoint {step}"):
            return bool(self._manager.save(int(step), args=args, force=force))

    @contextlib.contextmanager
    def _save_errors(self, what: str):
        """Turns a failed write (a full disk, a lost mount) into one CheckpointError that says
        the checkpoints already on disk are intact: orbax writes each into a temporary
        directory and renames it into place only when complete."""
        try:
            yield
        except Exception as error:
            first_line = (str(error).strip().splitlines() or [""])[0][:300]
            finished = self._manager.all_steps()
            kept = f"steps {sorted(finished)}" if finished else "none yet"
            raise CheckpointError(
                f"Could not {what} in {self.directory} ({type(error).__name__}: {first_line}). "
                f"The checkpoints already there are intact ({kept}); free space or fix the "
                "directory, then run again to resume from the newest."
            ) from error

    def all_steps(self) -> list[int]:
        """Returns: the steps of all finished checkpoints, ascending."""
        return sorted(self._manager.all_steps())

    def latest_step(self) -> int | None:
        """Returns: the newest finished checkpoint's step, or None if there is none.

        It may be corrupt; :meth:`restore` falls back past it.
        """
        return self._manager.latest_step()

    def _candidates(self, step: int | None) -> list[int]:
        self._manager.wait_until_finished()
        return [int(step)] if step is not None else self.all_steps()[::-1]

    def restore(
        self,
        abstract_state: Any,
        step: int | None = None,
        *,
        check: Callable[[Restored], None] | None = None,
    ) -> Restored:
        """Restores a checkpoint onto the shardings of ``abstract_state``.

        Args:
          abstract_state: pytree like the saved state, of ``jax.ShapeDtypeStruct`` with
            ``sharding`` set (e.g. from ``jax.eval_shape`` plus the state's shardings); the
            device count and layout may differ from the saving run's. A different dtype casts.
          step: the step to restore; None for the newest good one.
          check: called with each candidate; an error it raises makes that step unreadable
            (e.g. ``lambda r: iterator.set_state(r.data_state)``, so that a data position the
            pipeline refuses falls back instead of blocking the resume).

        Returns:
          ``Restored(step, state, data_state, config)``.

        Raises:
          CheckpointError: no checkpoint exists, the requested ``step`` is unreadable, or (for
            ``step=None``) every checkpoint is. With ``step=None`` a corrupt newest checkpoint
            is logged as a warning and the previous one is tried; the corrupt ones are moved to
            ``<directory>/corrupt/`` so that the resumed run can save those steps again.
        """
        restore_args = ocp.args.Composite(
            **{
                _STATE: ocp.args.StandardRestore(abstract_state),
                _DATA_STATE: ocp.args.JsonRestore(),
                _CONFIG: ocp.args.JsonRestore(),
            }
        )

        def read(s: int) -> Restored:
            saved = _saved_digests(self._manager, s)
            items = self._manager.restore(s, args=restore_args)
            verify_digests(items[_STATE], saved)
            restored = Restored(
                s,
                items[_STATE],
                _read_item(items, _DATA_STATE),
                _read_item(items, _CONFIG),
            )
            if check is not None:
                check(restored)
            return restored

        found, restored, failed = _first_good(
            self.directory, self._candidates(step), read, fall_back=step is None
        )
        if failed:
            self._quarantine([s for s in failed if s > found])
        return restored

    def _quarantine(self, steps: list[int]) -> None:
        """Moves unreadable steps to ``<directory>/corrupt/`` (kept for inspection)."""
        if jax.process_index() == 0:
            for step in steps:
                source = os.path.join(self.directory, str(step))
                target = os.path.join(self.directory, _CORRUPT_DIR, str(step))
                suffix = 1
                while os.path.exists(target):
                    target = os.path.join(self.directory, _CORRUPT_DIR, f"{step}.{suffix}")
                    suffix += 1
                os.makedirs(os.path.dirname(target), exist_ok=True)
                os.replace(source, target)
                logger.warning("Moved corrupt checkpoint %s to %s.", source, target)
        ocp.multihost.sync_global_processes("diffusion_jax_checkpoint_quarantine")
        self._manager.reload()

    def read_config(self, step: int | None = None) -> dict | None:
        """Reads the config saved with a checkpoint, without reading its arrays.

        Args:
          step: the checkpoint's step; None for the newest one whose JSON items (data position
            and config) are intact (a damaged one is skipped with a warning; its arrays are not
            read).

        Returns:
          The config dict, or None if the checkpoint was saved without one.

        Raises:
          CheckpointError: as for :meth:`restore`.
        """

        def read(s: int) -> dict | None:
            return _read_config(self._manager, s)

        _, config, _ = _first_good(
            self.directory, self._candidates(step), read, fall_back=step is None
        )
        return config

    def wait_until_finished(self) -> None:
        """Blocks until every pending asynchronous save is written.

        Raises:
          CheckpointError: a pending save failed (the earlier checkpoints are intact).
        """
        with self._save_errors("finish writing a checkpoint"):
            self._manager.wait_until_finished()

    def close(self) -> None:
        """Waits for pending saves and releases orbax's resources.

        Raises:
          CheckpointError: a pending save failed (the earlier checkpoints are intact).
        """
        try:
            self.wait_until_finished()
        finally:
            self._manager.close()

    def __enter__(self) -> CheckpointManager:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


# The trainer's state keys of the two parameter sets a reader may ask for.
PARAMS_KEYS: dict[str, str] = {"ema": "ema_params", "raw": "params"}


def restore_params(
    directory: str,
    abstract_params: Any | None,
    *,
    which: options.ParamsChoice = "ema",
    step: int | None = None,
) -> Any:
    """Restores one parameter set of a saved state (the EMA or the raw params) and nothing else.

    The rest of the state (optimiser moments, the other params) is neither read nor allocated,
    so sampling and fine-tuning need no random initialisation first.

    Args:
      directory: a :class:`CheckpointManager` directory.
      abstract_params: pytree of ``jax.ShapeDtypeStruct`` with shardings for the params, or
        None to restore them with the saved shapes and dtypes onto this process's first device.
      which: ``"ema"`` or ``"raw"``.
      step: the checkpoint's step; None for the newest good one (falling back past unreadable
        ones with a warning, as :meth:`CheckpointManager.restore` does; nothing is moved).

    Returns:
      The params: a pytree of ``jax.Array``.

    Raises:
      CheckpointError: no checkpoint in ``directory``, or none readable.
      ValueError: an unknown ``which``, or a ``step`` that is not in ``directory``.
      KeyError: the saved state has no such parameter set.
    """
    return restore_params_with_config(directory, lambda _: abstract_params, which=which, step=step)[
        1
    ]


def restore_params_with_config(
    directory: str,
    abstract_for: Callable[[dict | None], Any | None],
    *,
    which: options.ParamsChoice = "ema",
    step: int | None = None,
) -> tuple[int, Any]:
    """Like :func:`restore_params`, with the target built from the same checkpoint's config.

    ``abstract_for(config_dict)`` gets the config saved with a step and returns the abstract
    params to restore onto (or None, as in :func:`restore_params`). A step whose config or params
    cannot be read is skipped as one unit, so a reader never pairs one step's config with
    another's params.

    Returns:
      ``(step, params)``.
    """
    options.check("params", which)
    key = PARAMS_KEYS[which]
    # orbax needs absolute paths; a relative one fails only when the arrays are read.
    directory = os.path.abspath(os.fspath(directory))
    manager = _open_reader(directory)
    try:
        available = _available_steps(manager, directory, step)

        def read(s: int) -> Any:
            saved_config = _read_config(manager, s)
            try:
                target = abstract_for(saved_config)
            except Exception as error:  # the caller's or the config's: see _CallerFailure
                raise _CallerFailure(error) from error
            tree = manager.item_metadata(s)[_STATE].tree
            if not isinstance(tree, Mapping) or key not in tree:
                raise _MissingSubtree(
                    f"The state saved in {os.path.join(directory, str(s))} has no entry {key!r}; "
                    f"it has {sorted(tree) if isinstance(tree, Mapping) else type(tree)}."
                )
            if target is None:
                device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
                target = jax.tree.map(
                    lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), tree[key]
                )
            item = {key: target}
            args = ocp.args.PyTreeRestore(
                item,
                restore_args=ocp.checkpoint_utils.construct_restore_args(item),
                partial_restore=True,
            )
            saved = _saved_digests(manager, s)
            params = manager.restore(s, args=ocp.args.Composite(**{_STATE: args}))[_STATE][key]
            verify_digests({key: params}, saved)
            return params

        steps = [int(step)] if step is not None else available
        found, params, _ = _first_good(directory, steps, read, fall_back=step is None)
        return found, params
    finally:
        manager.close()


def read_config(directory: str, step: int | None = None, *, warn: bool = True) -> dict | None:
    """The config saved with a checkpoint, read without its arrays and without writing.

    The readers' counterpart of :meth:`CheckpointManager.read_config` (which opens the
    directory for writing): a tool checks a request against the run's config with it before
    restoring anything heavy.

    Args:
      directory: a :class:`CheckpointManager` directory.
      step: the checkpoint's step; None for the newest one whose JSON items are intact (a
        damaged one is skipped with a warning).
      warn: log the skipped steps; False when a restore of the same directory follows (it
        skips them too, and warns).

    Returns:
      The config dict, or None if the checkpoint was saved without one.

    Raises:
      CheckpointError: no checkpoint in ``directory``, or none readable.
      ValueError: a ``step`` that is not in ``directory``.
    """
    directory = os.path.abspath(os.fspath(directory))
    manager = _open_reader(directory)
    try:
        available = _available_steps(manager, directory, step)
        steps = [int(step)] if step is not None else available
        _, config, _ = _first_good(
            directory,
            steps,
            lambda s: _read_config(manager, s),
            fall_back=step is None,
            warn=warn,
        )
        return config
    finally:
        manager.close()
