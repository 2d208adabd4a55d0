"""What a checkpoint stores beside orbax's arrays: a checksum per leaf, and JSON-safe values.

Orbax alone restores a bit-flipped array silently, so each save records a 32-bit digest per
leaf (exact integer arithmetic, so the same under any sharding: hashed with NumPy on the host
for the leaves this process holds whole, on the devices otherwise) and each restore checks it.
The data iterator's state and the config are stored as JSON, with bytes and tuples encoded so
that they come back as they went in, beside the SHA-256 of their canonical JSON text, so that an
edited or damaged item is refused like a damaged array.
:mod:`diffusion_jax.train.checkpoint` (the only module that talks to orbax) uses both.
"""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "decode_json",
    "encode_json",
    "json_item",
    "leaf_digests",
    "read_json_item",
    "verify_digests",
]

_BYTES_TAG, _TUPLE_TAG = "__bytes_base64__", "__tuple__"
_VALUE, _SHA256 = "value", "sha256"  # the keys of a stored JSON item


def _path_name(path: tuple) -> str:
    # Dict keys and dataclass/namedtuple fields print alike, so digests saved from a dict match
    # a restore into an equivalent dataclass.
    return jax.tree_util.keystr(path, simple=True, separator="/")


def _as_uint32(x: jax.Array) -> jax.Array:
    """The raw bits of ``x`` as a flat uint32 vector (wider types give several words)."""
    if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
        x = jax.random.key_data(x)
    if jnp.issubdtype(x.dtype, jnp.complexfloating):
        x = jnp.stack([x.real, x.imag])
    if x.dtype == jnp.bool_:
        x = x.astype(jnp.uint8)
    itemsize = x.dtype.itemsize
    if itemsize >= 4:
        return jax.lax.bitcast_convert_type(x, jnp.uint32).reshape(-1)
    narrow = {1: jnp.uint8, 2: jnp.uint16}[itemsize]
    return jax.lax.bitcast_convert_type(x, narrow).astype(jnp.uint32).reshape(-1)


# Odd weights: a change of 2**b in one word changes the sum by 2**b * odd != 0 mod 2**32.
_WEIGHT = 0x9E3779B1


@jax.jit
def _inspect_leaves(leaves: list[jax.Array]) -> list[tuple[jax.Array, jax.Array]]:
    """Per leaf: (all finite [] bool, digest [] uint32), on the leaves' devices."""
    out = []
    for x in leaves:
        x = jnp.asarray(x)
        floating = jnp.issubdtype(x.dtype, jnp.inexact)
        finite = jnp.all(jnp.isfinite(x)) if floating else jnp.bool_(True)
        bits = _as_uint32(x)
        index = jnp.arange(bits.shape[0], dtype=jnp.uint32)
        weights = (index * jnp.uint32(_WEIGHT)) | jnp.uint32(1)
        out.append((finite, jnp.sum(bits * weights, dtype=jnp.uint32)))
    return out


def _inspect_on_host(x: Any) -> tuple[bool, int] | None:
    """(all finite, digest) of one leaf computed with NumPy, as :func:`_inspect_leaves` does
    on the device (one copy to the host at most), or None for the dtypes NumPy does not lay out
    in words as XLA does (wider than 32 bits, complex): those take the device path."""
    if isinstance(x, jax.Array) and jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
        x = jax.random.key_data(x)
    host = np.ascontiguousarray(x).reshape(-1)
    if host.dtype == np.bool_:
        host = host.view(np.uint8)
    itemsize = host.dtype.itemsize
    if not jnp.issubdtype(host.dtype, jnp.number) or itemsize > 4 or host.dtype.kind == "c":
        return None
    if itemsize == 4:
        words = host.view(np.uint32)
    else:
        words = host.view({1: np.uint8, 2: np.uint16}[itemsize]).astype(np.uint32)
    weights = (np.arange(words.size, dtype=np.uint32) * np.uint32(_WEIGHT)) | np.uint32(1)
    digest = int(np.sum(words * weights, dtype=np.uint32))
    finite = True
    if jnp.issubdtype(host.dtype, jnp.inexact):
        finite = bool(np.isfinite(host.astype(np.float32, copy=False)).all())
    return finite, digest


def leaf_digests(tree: Any) -> dict[str, tuple[str, bool, int]]:
    """Maps each leaf's path to (dtype name, all finite, digest).

    Leaves this process holds whole (NumPy arrays, and jax.Arrays on one host) are hashed with
    NumPy, one leaf at a time: a jitted program over a state's ~1,400 leaves took a minute to
    compile. The others (arrays spread over several processes) are inspected in one jitted
    call per set of devices they live on. Both paths give the same digest.
    """
    named = [(_path_name(p), x) for p, x in jax.tree_util.tree_leaves_with_path(tree)]
    result: dict[str, tuple[str, bool, int]] = {}
    groups: dict[tuple, list[int]] = {}
    for i, (name, x) in enumerate(named):
        dtype = x.dtype if hasattr(x, "dtype") else jnp.asarray(x).dtype
        whole = not isinstance(x, jax.Array) or x.is_fully_addressable
        inspected = _inspect_on_host(x) if whole else None
        if inspected is not None:
            result[name] = (str(dtype), *inspected)
            continue
        devices = (
            tuple(sorted(d.id for d in x.sharding.device_set)) if isinstance(x, jax.Array) else ()
        )
        groups.setdefault(devices, []).append(i)
    for indices in groups.values():
        values = jax.device_get(_inspect_leaves([named[i][1] for i in indices]))
        for i, (finite, digest) in zip(indices, values, strict=True):
            name, x = named[i]
            dtype = x.dtype if hasattr(x, "dtype") else jnp.asarray(x).dtype
            result[name] = (str(dtype), bool(finite), int(digest))
    return {name: result[name] for name, _ in named}


def verify_digests(tree: Any, saved: Mapping[str, Any] | None) -> None:
    """Raises ValueError if a restored leaf's digest differs from the one saved with it.

    Leaves restored to another dtype than they were saved with (a deliberate cast) are skipped.
    """
    if not saved:
        return
    bad = [
        name
        for name, (dtype, _, digest) in leaf_digests(tree).items()
        if name in saved and saved[name][0] == dtype and saved[name][1] != digest
    ]
    if bad:
        raise ValueError(f"array data does not match the digests saved with it: {bad}")


# ----------------------------------------------------------------------------- JSON values


def encode_json(value: Any, where: str = "value") -> Any:
    """``value`` as plain JSON types; bytes and tuples tagged so they round-trip."""
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, bytes):
        return {_BYTES_TAG: base64.b64encode(value).decode("ascii")}
    if isinstance(value, tuple):
        return {_TUPLE_TAG: [encode_json(v, f"{where}[{i}]") for i, v in enumerate(value)]}
    if isinstance(value, list):
        return [encode_json(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, Mapping):
        encoded = {}
        for key, item in value.items():
            if not isinstance(key, str):
                raise TypeError(
                    f"{where} has a key {key!r} of type {type(key).__name__}; "
                    "JSON keys must be str."
                )
            if key in (_BYTES_TAG, _TUPLE_TAG):
                raise ValueError(f"{where} uses the reserved key {key!r}.")
            encoded[key] = encode_json(item, f"{where}[{key!r}]")
        return encoded
    raise TypeError(
        f"{where} has type {type(value).__name__}, which cannot be checkpointed as JSON "
        "(allowed: dict with str keys, list, tuple, str, int, float, bool, None, bytes)."
    )


def decode_json(value: Any) -> Any:
    """Inverse of :func:`encode_json`."""
    if isinstance(value, list):
        return [decode_json(v) for v in value]
    if isinstance(value, dict):
        if value.keys() == {_BYTES_TAG}:
            return base64.b64decode(value[_BYTES_TAG])
        if value.keys() == {_TUPLE_TAG}:
            return tuple(decode_json(v) for v in value[_TUPLE_TAG])
        return {k: decode_json(v) for k, v in value.items()}
    return value


# ----------------------------------------------------------------------------- JSON items


def _sha256(encoded: Any) -> str:
    """The SHA-256 of ``encoded``'s canonical JSON text (sorted keys, no spaces)."""
    text = json.dumps(encoded, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def json_item(value: Any, where: str = "value") -> dict[str, Any]:
    """What a checkpoint stores for a JSON value: ``{"value": encoded, "sha256": digest}``.

    Raises:
      TypeError, ValueError: ``value`` cannot be stored (see :func:`encode_json`).
    """
    encoded = encode_json(value, where)
    return {_VALUE: encoded, _SHA256: _sha256(encoded)}


def read_json_item(item: Any, where: str = "value", *, mapping: bool = False) -> Any:
    """The value stored by :func:`json_item`, checked against its digest.

    Items written before digests existed (``{"value": ...}`` alone) are accepted as they are.

    Args:
      item: the JSON object read back.
      where: the item's name, for the message.
      mapping: the value must be a dict or None (a config).

    Raises:
      ValueError: the item is not of the stored form, its digest does not match its value, or
        (with ``mapping``) the value is not a dict or None.
    """
    if not isinstance(item, Mapping) or _VALUE not in item or not set(item) <= {_VALUE, _SHA256}:
        shown = sorted(item) if isinstance(item, Mapping) else type(item).__name__
        raise ValueError(f"{where} is not a stored JSON item (found {shown}).")
    encoded = item[_VALUE]
    if _SHA256 in item and item[_SHA256] != _sha256(encoded):
        raise ValueError(f"{where} does not match the SHA-256 digest saved with it (edited?).")
    value = decode_json(encoded)
    if mapping and value is not None and not isinstance(value, dict):
        raise ValueError(f"{where} must be a JSON object, found {type(value).__name__}.")
    return value
