"""The torch-free checkpoint reader against torch.save / torch.load as the oracle."""

import argparse
import collections
import io
import os
import pickle
import zipfile

import numpy as np
import pytest
import torch

from hassod_jax.weights.formats import read_safetensors
from hassod_jax.weights.torch_reader import (
    OpaqueObject,
    detect_format,
    flatten_tree,
    read_checkpoint,
    read_pickle_checkpoint,
    read_state_dict,
    read_torch_checkpoint,
)


def _bits(x):
    """Bit pattern of a torch tensor or a NumPy array, for bitwise comparison."""
    if isinstance(x, torch.Tensor):
        x = x.detach().contiguous()
        if x.dtype == torch.bfloat16:
            return x.view(torch.int16).numpy()
        if x.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
            return x.view(torch.uint8).numpy()
        return x.numpy()
    if x.dtype.name == "bfloat16":
        return x.view(np.int16)
    if x.dtype.name.startswith("float8"):
        return x.view(np.uint8)
    return x


def _assert_same(ours, ref):
    ref_np = _bits(ref)
    got = _bits(ours)
    assert got.shape == ref_np.shape
    assert got.dtype == ref_np.dtype
    if got.dtype.kind == "f":
        # bitwise: compare the raw bytes so NaNs and signed zeros count too
        assert got.tobytes() == np.ascontiguousarray(ref_np).tobytes()
    else:
        np.testing.assert_array_equal(got, ref_np)


def _sample_object():
    g = torch.Generator().manual_seed(0)
    base = torch.randn(6, 10, generator=g)
    return {
        "f32": base,
        "slice": base[1:5, 2:9:3],  # non-contiguous view sharing base's storage
        "transpose": base.t(),
        "offset_row": base[4],
        "f64": torch.randn(3, 2, dtype=torch.float64, generator=g),
        "f16": torch.randn(5, dtype=torch.float16, generator=g),
        "bf16": torch.randn(2, 3, generator=g).to(torch.bfloat16),
        "bf16_view": torch.randn(4, 4, generator=g).to(torch.bfloat16)[:, 1],
        "i64": torch.arange(-3, 4),
        "i32": torch.tensor([[1, -2], [3, 4]], dtype=torch.int32),
        "i16": torch.tensor([7, -8], dtype=torch.int16),
        "i8": torch.tensor([-1, 2], dtype=torch.int8),
        "u8": torch.tensor([0, 255], dtype=torch.uint8),
        "u16": torch.tensor([[0, 65535, 7]], dtype=torch.int32).to(torch.uint16),  # rebuild_v3
        "f8_e4m3": torch.randn(6, generator=g).to(torch.float8_e4m3fn),
        "f8_e5m2_view": torch.randn(3, 4, generator=g).to(torch.float8_e5m2)[1:, ::2],
        "bool": torch.tensor([True, False, True]),
        "scalar": torch.tensor(3.5),
        "empty": torch.zeros(0, 4),
        "param": torch.nn.Parameter(torch.randn(2, 2, generator=g)),
        "special": torch.tensor([float("nan"), -0.0, float("inf")]),
        "nested": collections.OrderedDict(
            a={"deep": torch.ones(2, 2) * 2}, b=[torch.zeros(1), (torch.ones(3),)]
        ),
        "meta": {"epoch": 7, "name": "x", "args": argparse.Namespace(lr=0.5, arch="vit")},
    }


def _compare_tree(ours, ref):
    if isinstance(ref, torch.Tensor):
        _assert_same(ours, ref)
    elif isinstance(ref, dict):
        assert set(ours) == set(ref)
        assert type(ours) is type(ref)
        for k in ref:
            _compare_tree(ours[k], ref[k])
    elif isinstance(ref, (list, tuple)):
        assert type(ours) is type(ref) and len(ours) == len(ref)
        for a, b in zip(ours, ref):
            _compare_tree(a, b)
    elif isinstance(ref, argparse.Namespace):
        assert isinstance(ours, OpaqueObject)
        assert ours.qualname == "argparse.Namespace"
        assert ours.state == vars(ref)
    else:
        assert ours == ref


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_round_trip_matches_torch(tmp_path, legacy):
    obj = _sample_object()
    path = tmp_path / "ckpt.pth"
    torch.save(obj, path, _use_new_zipfile_serialization=not legacy)
    assert detect_format(path) == ("torch_legacy" if legacy else "torch_zip")
    ours = read_torch_checkpoint(path)
    _compare_tree(ours, obj)  # what was saved
    if not legacy:  # torch.load cannot read uint16/float8 (UntypedStorage) from legacy files
        _compare_tree(ours, torch.load(path, weights_only=False))
    # views are copied out: modifying one must not change another sharing the storage
    assert ours["slice"].flags.c_contiguous and ours["slice"].flags.writeable
    ours["f32"][:] = 0
    assert ours["slice"].any()


def test_state_dict_of_module(tmp_path):
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    path = tmp_path / "m.pth.tar"
    torch.save({"state_dict": model.state_dict(), "epoch": 3}, path)
    flat = read_state_dict(path, key="state_dict")
    ref = model.state_dict()
    assert set(flat) == set(ref)
    for k in ref:
        _assert_same(flat[k], ref[k])
    assert flat["1.num_batches_tracked"].dtype == np.int64
    full = read_state_dict(path)
    assert set(full) == {f"state_dict.{k}" for k in ref}


def test_big_endian_zip(tmp_path):
    """A zip checkpoint with byteorder 'big' is byte-swapped (rebuilt by hand)."""
    src = tmp_path / "le.pth"
    t = torch.arange(6, dtype=torch.float32).reshape(2, 3) / 7
    torch.save({"w": t}, src)
    dst = tmp_path / "be.pth"
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as zout:
        for info in zin.infolist():
            data = zin.read(info.filename)
            if info.filename.endswith("/byteorder"):
                data = b"big"
            elif "/data/" in info.filename:
                data = np.frombuffer(data, "<f4").astype(">f4").tobytes()
            zout.writestr(info.filename, data)
    _assert_same(read_torch_checkpoint(dst)["w"], t)


def test_detectron2_pickle(tmp_path):
    rng = np.random.default_rng(0)
    model = {
        "stem.conv1.weight": rng.normal(size=(4, 3, 7, 7)).astype(np.float32),
        "res2.0.conv1.norm.running_mean": rng.normal(size=4),
    }
    path = tmp_path / "d2.pkl"
    with open(path, "wb") as f:
        pickle.dump({"model": model, "__author__": "test", "matching_heuristics": True}, f)
    assert detect_format(path) == "pickle"
    tree = read_pickle_checkpoint(path)
    assert tree["__author__"] == "test"
    flat = read_state_dict(path, key="model")
    assert set(flat) == set(model)
    for k in model:
        np.testing.assert_array_equal(flat[k], model[k])
        assert flat[k].dtype == model[k].dtype
    # protocol 0 (text) pickle as well
    with open(path, "wb") as f:
        pickle.dump({"model": model}, f, protocol=0)
    assert detect_format(path) == "pickle"
    flat = read_state_dict(path, key="model")
    for k in model:
        np.testing.assert_array_equal(flat[k], model[k])


def test_safetensors(tmp_path):
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(1)
    tensors = {
        "a": torch.randn(3, 4, generator=g),
        "b": torch.randn(5, generator=g).to(torch.bfloat16),
        "c": torch.arange(4, dtype=torch.int64),
        "d": torch.randn(2, 2, generator=g).half(),
    }
    path = tmp_path / "w.safetensors"
    save_file(tensors, str(path))
    assert detect_format(path) == "safetensors"
    for got in (read_safetensors(path), read_state_dict(path), read_checkpoint(path)):
        assert set(got) == set(tensors)
        for k in tensors:
            _assert_same(got[k], tensors[k])


def test_flatten_tree_drops_non_arrays():
    tree = {"a": np.ones(2), "b": [np.zeros(1), 3], "c": {"d": "s", "e": np.float32(2)}}
    flat = flatten_tree(tree)
    assert sorted(flat) == ["a", "b.0", "c.e"]
    assert flat["c.e"].shape == ()


# ------------------------------------------------------------------ error paths
def _expect(path, *fragments, fn=read_state_dict, **kw):
    with pytest.raises(ValueError) as e:
        fn(path, **kw)
    msg = str(e.value)
    assert str(path) in msg
    for frag in fragments:
        assert frag in msg, msg
    return msg


def test_errors_missing_empty_directory_text(tmp_path):
    _expect(tmp_path / "nope.pth", "no such file")
    _expect(tmp_path, "directory")
    (tmp_path / "empty.pth").write_bytes(b"")
    _expect(tmp_path / "empty.pth", "empty file")
    (tmp_path / "text.pth").write_text("hello, I am not a checkpoint")
    _expect(tmp_path / "text.pth", "not a checkpoint")


def test_errors_truncated_and_corrupt_zip(tmp_path):
    path = tmp_path / "ok.pth"
    torch.save({"w": torch.randn(100, 100)}, path)
    data = path.read_bytes()
    trunc = tmp_path / "trunc.pth"
    trunc.write_bytes(data[: len(data) // 2])
    _expect(trunc, "corrupt")
    # a zip without data.pkl
    nodata = tmp_path / "nodata.pth"
    with zipfile.ZipFile(nodata, "w") as z:
        z.writestr("x/other.txt", "hi")
    _expect(nodata, "data.pkl")
    # a storage record removed
    missing = tmp_path / "missing.pth"
    with zipfile.ZipFile(path) as zin, zipfile.ZipFile(missing, "w") as zout:
        for info in zin.infolist():
            if "/data/" not in info.filename:
                zout.writestr(info.filename, zin.read(info.filename))
    _expect(missing, "missing")
    # a storage record that is too short for the tensor
    short = tmp_path / "short.pth"
    with zipfile.ZipFile(path) as zin, zipfile.ZipFile(short, "w") as zout:
        for info in zin.infolist():
            blob = zin.read(info.filename)
            zout.writestr(info.filename, blob[:100] if "/data/" in info.filename else blob)
    _expect(short, "truncated")


def test_errors_truncated_legacy(tmp_path):
    path = tmp_path / "legacy.pth"
    torch.save({"w": torch.randn(50, 50)}, path, _use_new_zipfile_serialization=False)
    data = path.read_bytes()
    trunc = tmp_path / "legacy_trunc.pth"
    trunc.write_bytes(data[:-100])
    _expect(trunc, "truncated")


def test_errors_bad_pickles(tmp_path):
    garbage = tmp_path / "garbage.pkl"
    garbage.write_bytes(b"\x80\x04\x95garbage-garbage")
    _expect(garbage, "corrupt")
    no_arrays = tmp_path / "noarrays.pkl"
    with open(no_arrays, "wb") as f:
        pickle.dump({"a": 1, "b": "x"}, f)
    _expect(no_arrays, "no tensors")
    with open(tmp_path / "d2.pkl", "wb") as f:
        pickle.dump({"model": {"w": np.ones(2)}}, f)
    _expect(tmp_path / "d2.pkl", "no top-level entry 'teacher'", key="teacher")
    # a torch.load-only reader is asked for a plain pickle
    _expect(tmp_path / "d2.pkl", "not a torch.save checkpoint", fn=read_torch_checkpoint)


def test_unknown_globals_are_not_executed(tmp_path):
    """A malicious pickle calling os.system must not run; it yields an inert object."""

    class Evil:
        def __reduce__(self):
            return (os.system, ("touch " + str(tmp_path / "pwned"),))

    path = tmp_path / "evil.pkl"
    with open(path, "wb") as f:
        pickle.dump({"model": {"w": np.ones(2)}, "x": Evil()}, f)
    tree = read_pickle_checkpoint(path)
    assert not (tmp_path / "pwned").exists()
    assert isinstance(tree["x"], OpaqueObject)
    assert tree["x"].qualname in ("posix.system", "os.system", "nt.system")
    # also inside a torch zip
    buf = io.BytesIO()
    torch.save({"w": torch.ones(2), "x": Evil()}, buf)
    zpath = tmp_path / "evil.pth"
    zpath.write_bytes(buf.getvalue())
    ours = read_torch_checkpoint(zpath)
    assert not (tmp_path / "pwned").exists()
    np.testing.assert_array_equal(ours["w"], np.ones(2, np.float32))


def test_corrupt_safetensors(tmp_path):
    from safetensors.numpy import save_file

    path = tmp_path / "w.safetensors"
    save_file({"a": np.ones((4, 4), np.float32)}, str(path))
    data = path.read_bytes()
    trunc = tmp_path / "trunc.safetensors"
    trunc.write_bytes(data[:-8])
    _expect(trunc, "inconsistent")
