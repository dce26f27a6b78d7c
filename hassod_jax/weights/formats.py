"""Safetensors reading and hassod_jax's own converted-weights format.

Converted format (written by ``python -m hassod_jax.weights.convert``): a directory with

* ``params.msgpack``: the Flax parameter tree (nested dict of float32 arrays) serialised
  with ``flax.serialization.msgpack_serialize``;
* ``arch.json``: ``{"format": "hassod_jax.converted", "version": 1, "family": "vit",
  "arch": {...}, "source": "<original file>"}``.
"""

from __future__ import annotations

import json
import os
import struct
from typing import Any

import ml_dtypes
import numpy as np

from hassod_jax.weights.errors import CheckpointError

__all__ = [
    "ARCH_FILE",
    "PARAMS_FILE",
    "is_converted_dir",
    "load_converted",
    "read_safetensors",
    "save_converted",
]

PARAMS_FILE = "params.msgpack"
ARCH_FILE = "arch.json"
FORMAT_NAME = "hassod_jax.converted"
FORMAT_VERSION = 1

# safetensors dtype strings (https://github.com/huggingface/safetensors, format spec).
_ST_DTYPES = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
    "I64": np.dtype(np.int64),
    "U64": np.dtype(np.uint64),
    "I32": np.dtype(np.int32),
    "U32": np.dtype(np.uint32),
    "I16": np.dtype(np.int16),
    "U16": np.dtype(np.uint16),
    "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}


def _read_safetensors_header(path: str) -> tuple[int, dict]:
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) != 8:
            raise CheckpointError(f"{path}: truncated safetensors header")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8:
            raise CheckpointError(f"{path}: safetensors header length {n} exceeds the file")
        try:
            header = json.loads(f.read(n))
        except ValueError as e:
            raise CheckpointError(f"{path}: corrupt safetensors header ({e})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: safetensors header is not a JSON object")
    data_size = size - 8 - n
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = _ST_DTYPES[info["dtype"]]
            shape = tuple(int(s) for s in info["shape"])
            begin, end = (int(v) for v in info["data_offsets"])
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"{path}: bad safetensors entry {name!r}: {info!r}") from e
        if not 0 <= begin <= end <= data_size or end - begin != (
            int(np.prod(shape)) * dtype.itemsize
        ):
            raise CheckpointError(
                f"{path}: safetensors entry {name!r} (shape {shape}, {info['dtype']}) has "
                f"byte range [{begin}, {end}) inconsistent with the data size {data_size}"
            )
    return 8 + n, header


def read_safetensors(path) -> dict[str, np.ndarray]:
    """Reads a ``.safetensors`` file into ``{name: ndarray}`` (own copies, native dtypes).

    Standard dtypes go through the ``safetensors`` package's NumPy API; BF16/F8 (which
    NumPy lacks) are read from the documented byte ranges as ml_dtypes arrays.
    Raises CheckpointError (a ValueError) naming the file if it is malformed.
    """
    path = os.fspath(path)
    base, header = _read_safetensors_header(path)
    from safetensors import safe_open

    out: dict[str, np.ndarray] = {}
    special = {
        k
        for k, v in header.items()
        if k != "__metadata__" and v["dtype"] in ("BF16", "F8_E4M3", "F8_E5M2")
    }
    try:
        with safe_open(path, framework="np") as f:
            for name in f.keys():
                if name not in special:
                    out[name] = np.array(f.get_tensor(name), copy=True)
    except Exception as e:  # noqa: BLE001 - the package raises its own error types
        raise CheckpointError(f"{path}: cannot read safetensors file ({e})") from None
    if special:
        with open(path, "rb") as fh:
            for name in sorted(special):
                info = header[name]
                begin, end = info["data_offsets"]
                fh.seek(base + begin)
                raw = fh.read(end - begin)
                dtype = _ST_DTYPES[info["dtype"]]
                # safetensors data is little endian, as are all hosts we run on.
                arr = np.frombuffer(raw, dtype=dtype).reshape(info["shape"])
                out[name] = arr.copy()
    return out


def is_converted_dir(path) -> bool:
    path = os.fspath(path)
    return os.path.isdir(path) and os.path.exists(os.path.join(path, ARCH_FILE))


def save_converted(directory, params: Any, arch: dict, family: str, source: str = "") -> None:
    """Writes ``params`` (nested dict of arrays) and ``arch`` to ``directory`` (created)."""
    from flax import serialization

    directory = os.fspath(directory)
    os.makedirs(directory, exist_ok=True)
    params = _to_numpy(params)
    with open(os.path.join(directory, PARAMS_FILE), "wb") as f:
        f.write(serialization.msgpack_serialize(params))
    meta = {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "family": family,
        "arch": arch,
        "source": source,
    }
    with open(os.path.join(directory, ARCH_FILE), "w") as f:
        json.dump(meta, f, indent=2, sort_keys=True)


def load_converted(directory, family: str | None = None) -> tuple[dict, dict]:
    """Reads a converted directory; returns ``(arch, params)`` with NumPy leaves.

    Raises CheckpointError (a ValueError) naming the directory when a file is missing or
    corrupt, or when ``family`` is given and differs from the stored one.
    """
    from flax import serialization

    directory = os.fspath(directory)
    arch_path = os.path.join(directory, ARCH_FILE)
    params_path = os.path.join(directory, PARAMS_FILE)
    for p in (arch_path, params_path):
        if not os.path.exists(p):
            raise CheckpointError(f"{directory}: converted weights lack {os.path.basename(p)}")
    try:
        with open(arch_path) as f:
            meta = json.load(f)
    except ValueError as e:
        raise CheckpointError(f"{arch_path}: corrupt JSON ({e})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT_NAME:
        raise CheckpointError(f"{arch_path}: not a hassod_jax converted-weights description")
    if meta.get("version") != FORMAT_VERSION:
        raise CheckpointError(f"{arch_path}: unsupported version {meta.get('version')!r}")
    if family is not None and meta.get("family") != family:
        raise CheckpointError(
            f"{directory}: holds {meta.get('family')!r} weights, expected {family!r}"
        )
    try:
        with open(params_path, "rb") as f:
            params = serialization.msgpack_restore(f.read())
    except Exception as e:  # noqa: BLE001 - msgpack raises several error types
        raise CheckpointError(f"{params_path}: corrupt msgpack data ({e})") from None
    if not isinstance(params, dict):
        raise CheckpointError(f"{params_path}: does not hold a parameter tree")
    return meta["arch"], params


def _to_numpy(tree):
    if isinstance(tree, dict):
        return {str(k): _to_numpy(v) for k, v in tree.items()}
    return np.asarray(tree)
