"""Write `torch.save`-format checkpoints (the zip format of PyTorch >= 1.6) without torch.

The layout is the one `hassod_jax.weights.torch_reader` reads and `torch.load` expects (see
PyTorch's `torch/serialization.py`): a zip archive `<name>/data.pkl` whose pickle rebuilds
each tensor with `torch._utils._rebuild_tensor_v2(storage, offset, size, stride,
requires_grad, backward_hooks)`, every storage referenced by the persistent id
`("storage", torch.<Type>Storage, key, "cpu", numel)` and stored raw, little endian, in
`<name>/data/<key>`, plus the `<name>/byteorder` and `<name>/version` records. Records are
stored uncompressed and their data aligned to 64 bytes, as PyTorch's own writer does.

Only what checkpoints need is supported: dicts / OrderedDicts / lists / tuples of NumPy arrays,
numbers, strings and None. An independent implementation written from the format description;
the tests check the files with `torch.load` itself.
"""

from __future__ import annotations

import collections
import io
import os
import pickle
import struct
import tempfile
import zipfile

import numpy as np

__all__ = ["save_torch_checkpoint"]

_STORAGE_NAMES = {
    np.dtype(np.float64): "DoubleStorage",
    np.dtype(np.float32): "FloatStorage",
    np.dtype(np.float16): "HalfStorage",
    np.dtype(np.int64): "LongStorage",
    np.dtype(np.int32): "IntStorage",
    np.dtype(np.int16): "ShortStorage",
    np.dtype(np.int8): "CharStorage",
    np.dtype(np.uint8): "ByteStorage",
    np.dtype(np.bool_): "BoolStorage",
}
_ALIGN = 64


class _Global:
    """A `module.name` reference written as a pickle GLOBAL (torch need not be importable)."""

    def __init__(self, module: str, name: str):
        self.module, self.name = module, name

    def __call__(self, *args):  # pickle requires reduce functions to be callable
        raise TypeError(f"{self.module}.{self.name} is a placeholder for pickling only")


class _Storage:
    def __init__(self, key: str, array: np.ndarray):
        self.key, self.array = key, array


class _Tensor:
    def __init__(self, storage: _Storage):
        self.storage = storage

    def __reduce__(self):
        a = self.storage.array
        shape = tuple(int(s) for s in a.shape)
        stride = tuple(int(s) // a.itemsize for s in a.strides) if a.ndim else ()
        return (
            _Global("torch._utils", "_rebuild_tensor_v2"),
            (self.storage, 0, shape, stride, False, collections.OrderedDict()),
        )


class _Pickler(pickle._Pickler):  # the pure-Python pickler lets us write GLOBALs by name
    dispatch = pickle._Pickler.dispatch.copy()

    def persistent_id(self, obj):
        if isinstance(obj, _Storage):
            name = _STORAGE_NAMES[obj.array.dtype]
            return ("storage", _Global("torch", name), obj.key, "cpu", int(obj.array.size))
        return None

    def _save_global_ref(self, obj):
        self.write(pickle.GLOBAL + f"{obj.module}\n{obj.name}\n".encode("ascii"))
        self.memoize(obj)

    dispatch[_Global] = _save_global_ref


def _wrap(obj, storages: list):
    """Replaces every array by a _Tensor over its own storage (a C-contiguous copy)."""
    if isinstance(obj, np.ndarray) or isinstance(obj, np.generic):
        a = np.array(obj, order="C", copy=True)  # (ascontiguousarray would make 0-d 1-d)
        if a.dtype not in _STORAGE_NAMES:
            raise ValueError(f"save_torch_checkpoint: unsupported dtype {a.dtype}")
        a = a.astype(a.dtype.newbyteorder("<"), copy=False)
        st = _Storage(str(len(storages)), a)
        storages.append(st)
        return _Tensor(st)
    if isinstance(obj, collections.OrderedDict):
        return collections.OrderedDict((k, _wrap(v, storages)) for k, v in obj.items())
    if isinstance(obj, dict):
        return {k: _wrap(v, storages) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_wrap(v, storages) for v in obj)
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise ValueError(f"save_torch_checkpoint: cannot store a {type(obj).__name__}")


def _write_record(zf: zipfile.ZipFile, name: str, data: bytes) -> None:
    info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
    info.compress_type = zipfile.ZIP_STORED
    # Local header: 30 bytes + name + extra; pad the extra field so the data starts aligned.
    start = zf.fp.tell() + 30 + len(name.encode()) + 4
    pad = (-start) % _ALIGN
    info.extra = b"FB" + struct.pack("<H", pad) + b"Z" * pad
    zf.writestr(info, data)


def save_torch_checkpoint(path, obj, archive_name: str = "archive") -> None:
    """Writes `obj` (nested containers of NumPy arrays) as a `torch.save` zip file.

    The file is written to a temporary name beside `path` and renamed into place, with the
    permissions a plain `open(path, "w")` would give (the umask is respected).
    """
    path = os.fspath(path)
    storages: list[_Storage] = []
    wrapped = _wrap(obj, storages)
    buf = io.BytesIO()
    _Pickler(buf, protocol=2).dump(wrapped)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp_", suffix=".pth", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f, zipfile.ZipFile(f, "w", zipfile.ZIP_STORED) as zf:
            _write_record(zf, f"{archive_name}/data.pkl", buf.getvalue())
            _write_record(zf, f"{archive_name}/byteorder", b"little")
            for st in storages:
                _write_record(zf, f"{archive_name}/data/{st.key}", st.array.tobytes())
            _write_record(zf, f"{archive_name}/version", b"3\n")
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
