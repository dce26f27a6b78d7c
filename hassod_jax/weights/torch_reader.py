"""Read PyTorch and detectron2 checkpoints into NumPy without importing torch.

Formats (detected from the file's content, not its extension):

* ``torch.save`` zip format (PyTorch >= 1.6): a zip archive ``<name>/data.pkl`` whose
  pickle refers to storages by persistent id, each storage stored raw in
  ``<name>/data/<key>`` (optional ``<name>/byteorder`` record, little endian if absent).
* ``torch.save(..., _use_new_zipfile_serialization=False)`` legacy format: five pickles in
  a row (magic number, protocol version, system info, the object, the list of storage
  keys), then each storage as an int64 element count followed by its raw bytes.
* ``.safetensors`` (read through :mod:`hassod_jax.weights.formats`).
* detectron2 / Caffe2 ``.pkl``: a plain pickle of ``{"model": {name: ndarray}, ...}``.

All pickles go through :class:`_RestrictedUnpickler`: only a whitelist of globals is
resolved to real objects (tensor rebuild functions, storage types, ``OrderedDict``, NumPy
array reconstruction, torch dtypes); any other global (e.g. ``argparse.Namespace`` in a
DINO training checkpoint) becomes an inert :class:`OpaqueObject` that records its
arguments and state. Nothing from an unknown module is imported or executed.

The storage / rebuild semantics follow PyTorch's ``torch/serialization.py`` and
``torch/_utils.py`` (``_rebuild_tensor_v2``: storage, element offset, size, stride);
this is an independent re-implementation on NumPy.
"""

from __future__ import annotations

import collections
import io
import os
import pickle
import struct
import zipfile
from typing import Any

import ml_dtypes
import numpy as np

from hassod_jax.weights.errors import CheckpointError
from hassod_jax.weights.formats import read_safetensors

__all__ = [
    "OpaqueObject",
    "TorchStorage",
    "detect_format",
    "flatten_tree",
    "read_checkpoint",
    "read_pickle_checkpoint",
    "read_state_dict",
    "read_torch_checkpoint",
]

# torch storage class name -> NumPy dtype (little-endian element layout as torch writes it).
_STORAGE_DTYPES = {
    "DoubleStorage": np.dtype(np.float64),
    "FloatStorage": np.dtype(np.float32),
    "HalfStorage": np.dtype(np.float16),
    "BFloat16Storage": np.dtype(ml_dtypes.bfloat16),
    "LongStorage": np.dtype(np.int64),
    "IntStorage": np.dtype(np.int32),
    "ShortStorage": np.dtype(np.int16),
    "CharStorage": np.dtype(np.int8),
    "ByteStorage": np.dtype(np.uint8),
    "BoolStorage": np.dtype(np.bool_),
    "ComplexFloatStorage": np.dtype(np.complex64),
    "ComplexDoubleStorage": np.dtype(np.complex128),
    "UntypedStorage": np.dtype(np.uint8),
    "Float8_e4m3fnStorage": np.dtype(ml_dtypes.float8_e4m3fn),
    "Float8_e5m2Storage": np.dtype(ml_dtypes.float8_e5m2),
}

# torch dtype name (as pickled: GLOBAL torch <name>) -> NumPy dtype.
_TORCH_DTYPES = {
    "float64": np.dtype(np.float64),
    "double": np.dtype(np.float64),
    "float32": np.dtype(np.float32),
    "float": np.dtype(np.float32),
    "float16": np.dtype(np.float16),
    "half": np.dtype(np.float16),
    "bfloat16": np.dtype(ml_dtypes.bfloat16),
    "int64": np.dtype(np.int64),
    "long": np.dtype(np.int64),
    "int32": np.dtype(np.int32),
    "int": np.dtype(np.int32),
    "int16": np.dtype(np.int16),
    "short": np.dtype(np.int16),
    "int8": np.dtype(np.int8),
    "uint8": np.dtype(np.uint8),
    "bool": np.dtype(np.bool_),
    "complex64": np.dtype(np.complex64),
    "complex128": np.dtype(np.complex128),
    "float8_e4m3fn": np.dtype(ml_dtypes.float8_e4m3fn),
    "float8_e5m2": np.dtype(ml_dtypes.float8_e5m2),
    "uint16": np.dtype(np.uint16),
    "uint32": np.dtype(np.uint32),
    "uint64": np.dtype(np.uint64),
}

_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_LEGACY_PROTOCOL = 1001


class OpaqueObject:
    """Inert stand-in for a pickled object whose class is not whitelisted.

    Each non-whitelisted global becomes a fresh subclass of this (``qualname`` is the
    global's dotted name); constructing it only records the arguments and the pickled
    state, so a caller can still inspect e.g. a training checkpoint's ``args`` namespace.
    """

    qualname = "?"

    def __new__(cls, *args, **kwargs):
        obj = object.__new__(cls)
        obj.args = args
        obj.state = None
        return obj

    def __init__(self, *args, **kwargs):
        self.args = args

    def __setstate__(self, state):
        self.state = state

    def __repr__(self):
        return f"OpaqueObject({self.qualname})"


_OPAQUE_TYPES: dict[str, type] = {}


def _opaque_type(qualname: str) -> type:
    if qualname not in _OPAQUE_TYPES:
        _OPAQUE_TYPES[qualname] = type("Opaque", (OpaqueObject,), {"qualname": qualname})
    return _OPAQUE_TYPES[qualname]


def _opaque_reconstructor(cls, base=None, state=None):
    # copyreg._reconstructor(cls, base, state) is how protocol-0/1 pickles of plain
    # Python objects are rebuilt; only our inert placeholders are ever instantiated.
    if isinstance(cls, type) and issubclass(cls, OpaqueObject):
        return cls.__new__(cls)
    return _opaque_type(repr(cls)).__new__(_opaque_type(repr(cls)))


class TorchStorage:
    """A torch storage read from a checkpoint: a flat 1-D NumPy array of its elements."""

    def __init__(self, dtype: np.dtype, data: np.ndarray | None, key: str):
        self.dtype = dtype
        self.data = data
        self.key = key


class _StorageType:
    """Placeholder for ``torch.FloatStorage`` & co. (only its dtype matters)."""

    def __init__(self, name: str):
        self.name = name
        self.dtype = _STORAGE_DTYPES[name]


class _TorchDtype:
    def __init__(self, name: str):
        self.name = name
        self.np_dtype = _TORCH_DTYPES[name]


def _rebuild_tensor(storage, storage_offset, size, stride, *_ignored, dtype=None):
    """NumPy version of ``torch._utils._rebuild_tensor``: a strided view, copied out."""
    if not isinstance(storage, TorchStorage):
        raise CheckpointError(f"tensor refers to a non-storage object {type(storage).__name__}")
    data = storage.data
    if data is None:
        raise CheckpointError(f"storage {storage.key!r} has no data")
    if dtype is not None and dtype != storage.dtype:
        data = data.view(np.uint8).view(dtype)
    size = tuple(int(s) for s in size)
    stride = tuple(int(s) for s in stride)
    if len(size) != len(stride):
        raise CheckpointError(f"tensor size {size} and stride {stride} differ in rank")
    offset = int(storage_offset)
    numel = int(np.prod(size)) if size else 1
    if numel == 0:
        return np.zeros(size, data.dtype)
    if any(s < 0 for s in stride) or offset < 0:
        raise CheckpointError(f"negative stride {stride} or offset {offset}")
    last = offset + sum((n - 1) * s for n, s in zip(size, stride))
    if last >= data.size:
        raise CheckpointError(
            f"tensor (offset {offset}, size {size}, stride {stride}) reads element {last} of "
            f"storage {storage.key!r} which has only {data.size} elements (truncated file?)"
        )
    dtype = data.dtype
    item = dtype.itemsize
    if dtype.isbuiltin != 1:  # ml_dtypes (bfloat16, float8): stride over the raw bits
        data = data.view({1: np.uint8, 2: np.uint16, 4: np.uint32}[item])
    view = np.lib.stride_tricks.as_strided(
        data[offset:], shape=size, strides=tuple(s * item for s in stride), writeable=False
    )
    return np.array(view, copy=True, order="C").view(dtype)


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False, *rest):
    return _rebuild_tensor(storage, storage_offset, size, stride)


def _rebuild_tensor_v3(
    storage, storage_offset, size, stride, requires_grad, backward_hooks, dtype, *rest
):
    np_dtype = dtype.np_dtype if isinstance(dtype, _TorchDtype) else None
    return _rebuild_tensor(storage, storage_offset, size, stride, dtype=np_dtype)


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None, *rest):
    return data


def _rebuild_device_tensor_from_numpy(data, dtype, device, requires_grad):
    arr = np.asarray(data)
    if isinstance(dtype, _TorchDtype):
        arr = arr.astype(dtype.np_dtype, copy=False)
    return arr


def _rebuild_from_type_v2(func, new_type, args, state):
    # Tensor subclasses (e.g. nn.Parameter in some versions) pickle through this.
    return func(*args)


_SAFE_GLOBALS = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_tensor_v3"): _rebuild_tensor_v3,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("torch._utils", "_rebuild_device_tensor_from_numpy"): _rebuild_device_tensor_from_numpy,
    ("torch._tensor", "_rebuild_from_type_v2"): _rebuild_from_type_v2,
    ("copyreg", "_reconstructor"): _opaque_reconstructor,
    ("copy_reg", "_reconstructor"): _opaque_reconstructor,
    ("__builtin__", "set"): set,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("builtins", "slice"): slice,
    ("builtins", "complex"): complex,
    ("__builtin__", "complex"): complex,
    ("builtins", "bytearray"): bytearray,
    ("_codecs", "encode"): lambda s, enc="latin1": s.encode(enc),
}

# NumPy's array / scalar / dtype reconstruction (module moved to numpy._core in NumPy 2).
for _mod in ("numpy.core.multiarray", "numpy._core.multiarray"):
    _SAFE_GLOBALS[(_mod, "_reconstruct")] = np._core.multiarray._reconstruct
    _SAFE_GLOBALS[(_mod, "scalar")] = np._core.multiarray.scalar
_SAFE_GLOBALS[("numpy", "ndarray")] = np.ndarray
_SAFE_GLOBALS[("numpy", "dtype")] = np.dtype


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickler resolving only whitelisted globals; storages come from ``load_storage``."""

    def __init__(self, file, load_storage=None, encoding="ASCII"):
        super().__init__(file, encoding=encoding)
        self._load_storage = load_storage

    def find_class(self, module, name):
        key = (module, name)
        if key in _SAFE_GLOBALS:
            return _SAFE_GLOBALS[key]
        if module in ("torch", "torch.storage") and name in _STORAGE_DTYPES:
            return _StorageType(name)
        if module == "torch" and name in _TORCH_DTYPES:
            return _TorchDtype(name)
        if module == "numpy" and name in ("float32", "float64", "int64", "int32", "uint8"):
            return getattr(np, name)
        return _opaque_type(f"{module}.{name}")

    def persistent_load(self, pid):
        if self._load_storage is None:
            raise pickle.UnpicklingError(f"unexpected persistent id {pid!r} in a plain pickle")
        return self._load_storage(pid)


def _unpickle(data: bytes | io.BufferedIOBase, path: str, load_storage=None, encoding="ASCII"):
    f = io.BytesIO(data) if isinstance(data, bytes) else data
    try:
        return _RestrictedUnpickler(f, load_storage=load_storage, encoding=encoding).load()
    except CheckpointError as e:
        raise CheckpointError(f"{path}: {e}") from None
    except (pickle.UnpicklingError, EOFError, TypeError, AttributeError, ValueError) as e:
        raise CheckpointError(f"{path}: corrupt or unsupported pickle data ({e})") from e


def _storage_dtype(storage_type, pid, path) -> np.dtype:
    if isinstance(storage_type, _StorageType):
        return storage_type.dtype
    raise CheckpointError(f"{path}: unsupported storage type {storage_type!r} in {pid!r}")


def _frombuffer(raw: bytes, dtype: np.dtype, big_endian: bool) -> np.ndarray:
    usable = len(raw) - len(raw) % dtype.itemsize
    arr = np.frombuffer(raw[:usable], dtype=dtype)
    if big_endian and dtype.itemsize > 1:
        arr = arr.byteswap()
    return arr


def _read_zip(path: str) -> Any:
    try:
        zf = zipfile.ZipFile(path)
    except zipfile.BadZipFile as e:
        raise CheckpointError(f"{path}: corrupt zip archive ({e})") from None
    with zf:
        names = zf.namelist()
        pkl = [n for n in names if n.endswith("data.pkl") and n.count("/") == 1]
        if len(pkl) != 1:
            hint = (
                " (a TorchScript archive? use torch.save on a state dict)"
                if any(n.endswith("constants.pkl") for n in names)
                else ""
            )
            raise CheckpointError(
                f"{path}: zip archive without exactly one '<name>/data.pkl' record; "
                f"not a torch.save checkpoint{hint}"
            )
        prefix = pkl[0][: -len("data.pkl")]
        big_endian = False
        if prefix + "byteorder" in names:
            order = zf.read(prefix + "byteorder").decode("ascii", "replace").strip()
            if order not in ("little", "big"):
                raise CheckpointError(f"{path}: unknown byte order record {order!r}")
            big_endian = order == "big"
        storages: dict[str, TorchStorage] = {}

        def load_storage(pid):
            if not isinstance(pid, tuple) or len(pid) < 5 or pid[0] not in ("storage", b"storage"):
                raise CheckpointError(f"unexpected persistent id {pid!r}")
            _, storage_type, key, _location, _numel = pid[:5]
            key = key.decode() if isinstance(key, bytes) else str(key)
            dtype = _storage_dtype(storage_type, pid, path)
            if key not in storages:
                name = f"{prefix}data/{key}"
                try:
                    raw = zf.read(name)
                except KeyError:
                    raise CheckpointError(f"storage record {name!r} is missing") from None
                except (zipfile.BadZipFile, OSError) as e:
                    raise CheckpointError(f"storage record {name!r} is corrupt ({e})") from None
                storages[key] = TorchStorage(dtype, _frombuffer(raw, dtype, big_endian), key)
            return storages[key]

        try:
            data = zf.read(pkl[0])
        except (zipfile.BadZipFile, OSError) as e:
            raise CheckpointError(f"{path}: record {pkl[0]!r} is corrupt ({e})") from None
        return _unpickle(data, path, load_storage)


def _read_legacy(path: str, f) -> Any:
    """The pre-1.6 format; see ``_legacy_load`` in PyTorch's ``serialization.py``."""

    def plain(what):
        try:
            return _RestrictedUnpickler(f).load()
        except Exception as e:  # noqa: BLE001 - any failure here means a corrupt header
            raise CheckpointError(f"{path}: cannot read the legacy {what} ({e})") from None

    magic = plain("magic number")
    if magic != _LEGACY_MAGIC:
        raise CheckpointError(f"{path}: not a PyTorch checkpoint (bad legacy magic number)")
    version = plain("protocol version")
    if version != _LEGACY_PROTOCOL:
        raise CheckpointError(f"{path}: unsupported legacy protocol version {version!r}")
    plain("system info")
    pending: dict[str, TorchStorage] = {}
    views: dict[str, tuple[str, int, int]] = {}

    def load_storage(pid):
        if not isinstance(pid, tuple) or len(pid) < 5:
            raise CheckpointError(f"unexpected persistent id {pid!r}")
        kind = pid[0].decode() if isinstance(pid[0], bytes) else pid[0]
        if kind == "module":  # a pickled nn.Module class: the source is not needed
            return _opaque_type("torch.nn.Module")
        if kind != "storage":
            raise CheckpointError(f"unexpected persistent id {pid!r}")
        storage_type, root_key, _location, _numel = pid[1:5]
        view_metadata = pid[5] if len(pid) > 5 else None
        dtype = _storage_dtype(storage_type, pid, path)
        root_key = str(root_key)
        if root_key not in pending:
            pending[root_key] = TorchStorage(dtype, None, root_key)
        if view_metadata is None:
            return pending[root_key]
        view_key, offset, size = view_metadata
        view_key = str(view_key)
        if view_key not in pending:
            pending[view_key] = TorchStorage(dtype, None, view_key)
            views[view_key] = (root_key, int(offset), int(size))
        return pending[view_key]

    # Tensors are rebuilt lazily: storages are filled only after the object pickle, so the
    # object is unpickled with deferred tensors and resolved afterwards.
    def deferred_rebuild(storage, storage_offset, size, stride, *rest):
        return _Deferred(storage, storage_offset, size, stride)

    def deferred_rebuild_v3(storage, storage_offset, size, stride, grad, hooks, dtype, *rest):
        cell = _Deferred(storage, storage_offset, size, stride)
        cell.dtype = dtype.np_dtype if isinstance(dtype, _TorchDtype) else None
        return cell

    global_overrides = {
        ("torch._utils", "_rebuild_tensor"): deferred_rebuild,
        ("torch._utils", "_rebuild_tensor_v2"): deferred_rebuild,
        ("torch._utils", "_rebuild_tensor_v3"): deferred_rebuild_v3,
    }

    class _Legacy(_RestrictedUnpickler):
        def find_class(self, module, name):
            if (module, name) in global_overrides:
                return global_overrides[(module, name)]
            return super().find_class(module, name)

    try:
        obj = _Legacy(f, load_storage=load_storage).load()
    except CheckpointError as e:
        raise CheckpointError(f"{path}: {e}") from None
    except Exception as e:  # noqa: BLE001
        raise CheckpointError(f"{path}: corrupt legacy checkpoint object ({e})") from None
    keys = plain("storage key list")
    for key in keys:
        key = str(key)
        if key not in pending:
            raise CheckpointError(f"{path}: storage key {key!r} listed but never referenced")
        st = pending[key]
        header = f.read(8)
        if len(header) != 8:
            raise CheckpointError(f"{path}: truncated before storage {key!r}")
        (numel,) = struct.unpack("<q", header)
        nbytes = numel * st.dtype.itemsize
        raw = f.read(nbytes)
        if numel < 0 or len(raw) != nbytes:
            raise CheckpointError(f"{path}: storage {key!r} is truncated")
        st.data = _frombuffer(raw, st.dtype, False)
    for view_key, (root_key, offset, size) in views.items():
        root = pending[root_key]
        if root.data is None:
            raise CheckpointError(f"{path}: view {view_key!r} of unread storage {root_key!r}")
        pending[view_key].data = root.data[offset : offset + size]
    try:
        return _resolve_deferred(obj)
    except CheckpointError as e:
        raise CheckpointError(f"{path}: {e}") from None


class _Deferred:
    """A tensor of a legacy file whose storage bytes come after the object pickle."""

    def __init__(self, storage, storage_offset, size, stride):
        self.args = (storage, storage_offset, size, stride)
        self.dtype = None


def _resolve_deferred(obj):
    if isinstance(obj, _Deferred):
        return _rebuild_tensor(*obj.args, dtype=obj.dtype)
    if isinstance(obj, collections.OrderedDict):
        return collections.OrderedDict((k, _resolve_deferred(v)) for k, v in obj.items())
    if isinstance(obj, dict):
        return {k: _resolve_deferred(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_resolve_deferred(v) for v in obj]
    if isinstance(obj, tuple):
        return tuple(_resolve_deferred(v) for v in obj)
    if isinstance(obj, OpaqueObject):
        obj.args = _resolve_deferred(obj.args)
        obj.state = _resolve_deferred(obj.state)
    return obj


def _check_file(path) -> str:
    path = os.fspath(path)
    if not os.path.exists(path):
        raise CheckpointError(f"{path}: no such file")
    if os.path.isdir(path):
        raise CheckpointError(f"{path}: is a directory, not a checkpoint file")
    return path


def detect_format(path) -> str:
    """Returns 'torch_zip', 'torch_legacy', 'safetensors' or 'pickle' from the file's bytes.

    Raises CheckpointError (a ValueError) naming the file if it is none of these.
    """
    path = _check_file(path)
    with open(path, "rb") as f:
        head = f.read(16)
    if len(head) == 0:
        raise CheckpointError(f"{path}: empty file")
    if head[:4] == b"PK\x03\x04":
        return "torch_zip"
    if len(head) >= 9:
        (n,) = struct.unpack("<Q", head[:8])
        if head[8:9] == b"{" and 2 <= n <= os.path.getsize(path) - 8:
            return "safetensors"
    if head[0] == 0x80:  # pickle protocol >= 2
        # A legacy torch file starts with the pickled magic number, a long integer.
        try:
            first = _RestrictedUnpickler(io.BytesIO(_read_prefix(path, 64))).load()
        except Exception:  # noqa: BLE001 - not a complete small first pickle
            first = None
        if first == _LEGACY_MAGIC:
            return "torch_legacy"
        return "pickle"
    if head[:1] in (b"(", b"}", b"]", b")", b"c"):  # protocol 0/1 pickles (Python 2 era)
        return "pickle"
    raise CheckpointError(
        f"{path}: not a checkpoint (neither a torch zip/legacy file, a safetensors file, "
        f"nor a pickle); first bytes {head[:8]!r}"
    )


def _read_prefix(path, n):
    with open(path, "rb") as f:
        return f.read(n)


def read_torch_checkpoint(path) -> Any:
    """Reads a ``torch.save`` file (zip or legacy format) without torch.

    Returns the saved object with every tensor (and ``nn.Parameter``) replaced by a
    C-contiguous NumPy array of the same shape and dtype (bfloat16 / float8 as ml_dtypes);
    dicts, OrderedDicts, lists and tuples are kept. Views are honoured (storage offset and
    strides) and copied out, so arrays sharing a storage do not alias. Unknown pickled
    classes become :class:`OpaqueObject`.

    Raises CheckpointError (a ValueError) naming the file for anything unreadable.
    """
    path = _check_file(path)
    fmt = detect_format(path)
    if fmt == "torch_zip":
        return _read_zip(path)
    if fmt == "torch_legacy":
        with open(path, "rb") as f:
            return _read_legacy(path, f)
    raise CheckpointError(f"{path}: not a torch.save checkpoint (detected {fmt})")


def read_pickle_checkpoint(path) -> Any:
    """Reads a plain pickle (detectron2 ``.pkl``: ``{'model': {name: ndarray}, ...}``).

    Python-2 pickles (Caffe2-era detectron files) are read with latin1 encoding, as
    detectron2's own checkpointer does. Only whitelisted globals are resolved.
    """
    path = _check_file(path)
    with open(path, "rb") as f:
        data = f.read()
    return _unpickle(data, path, None, encoding="latin1")


def read_checkpoint(path) -> Any:
    """Reads any supported checkpoint into a tree of dicts/lists with NumPy leaves."""
    fmt = detect_format(path)
    if fmt == "safetensors":
        return read_safetensors(path)
    if fmt == "pickle":
        return read_pickle_checkpoint(path)
    return read_torch_checkpoint(path)


def flatten_tree(tree: Any, prefix: str = "", sep: str = ".") -> dict[str, np.ndarray]:
    """Flattens nested dicts/lists/tuples into ``{dotted.name: ndarray}``.

    Array leaves are kept (NumPy scalars become 0-d arrays); every other leaf (ints,
    strings, OpaqueObject, None) is dropped.
    """
    out: dict[str, np.ndarray] = {}

    def visit(node, name):
        if isinstance(node, np.ndarray):
            out[name] = node
        elif isinstance(node, np.generic):
            out[name] = np.asarray(node)
        elif isinstance(node, dict):
            for k, v in node.items():
                visit(v, f"{name}{sep}{k}" if name else str(k))
        elif isinstance(node, (list, tuple)):
            for i, v in enumerate(node):
                visit(v, f"{name}{sep}{i}" if name else str(i))

    visit(tree, prefix)
    return out


def read_state_dict(path, key: str | None = None) -> dict[str, np.ndarray]:
    """Reads a checkpoint and returns its tensors as ``{name: ndarray}``.

    Handles ``.pth/.pt/.pth.tar`` (torch zip or legacy), ``.safetensors`` and detectron2
    ``.pkl`` files (format detected from content). ``key`` selects one top-level entry
    first (e.g. ``'teacher'`` of a DINO training checkpoint, ``'model'`` of a detectron2
    file); nested containers are flattened with dotted names and non-array leaves dropped.

    Raises CheckpointError (a ValueError) naming the file when it is unreadable, when
    ``key`` is absent, or when the file holds no arrays at all.
    """
    path = _check_file(path)
    tree = read_checkpoint(path)
    if key is not None:
        if not isinstance(tree, dict) or key not in tree:
            have = sorted(map(str, tree)) if isinstance(tree, dict) else type(tree).__name__
            raise CheckpointError(f"{path}: has no top-level entry {key!r} (has {have})")
        tree = tree[key]
    flat = flatten_tree(tree)
    if not flat:
        raise CheckpointError(f"{path}: contains no tensors")
    return flat
