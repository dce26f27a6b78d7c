"""DINO ViT in Flax against a PyTorch DINO ViT (tests/models/torch_dino_reference.py).

Random weights are saved with torch.save and read back by our torch-free reader, so the
whole chain (reader, name mapping, layouts, position-embedding resize, attention) is
compared with torch's own kernels.
"""

import argparse
import functools
import os
import pickle

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from jax.sharding import Mesh

from hassod_jax.models import vit
from hassod_jax.models.vit import (
    OUTPUTS,
    VIT_ARCHS,
    dino_features,
    interpolate_pos_embed,
    make_feature_fn,
    make_vit,
    torch_bicubic_matrix,
)
from hassod_jax.weights import convert
from hassod_jax.weights.dino_vit import expected_state_dict_shapes, load_dino_vit
from tests.models.torch_dino_reference import VisionTransformer as TorchViT

torch.set_num_threads(2)

VARIANTS = {  # name -> (patch, dim, heads, VIT_ARCHS key)
    "S16": (16, 384, 6, "vit_small_patch16"),
    "S8": (8, 384, 6, "vit_small_patch8"),
    "B16": (16, 768, 12, "vit_base_patch16"),
    "B8": (8, 768, 12, "vit_base_patch8"),
}
SIZES = [(224, 224), (480, 480), (480, 640)]


def _images(b, h, w, seed):
    return np.random.default_rng(seed).normal(size=(b, h, w, 3)).astype(np.float32)


def _torch_features(model, images_nhwc):
    return {
        k: v.numpy() for k, v in model.features(torch.from_numpy(images_nhwc).permute(0, 3, 1, 2))
        .items()
    }  # fmt: skip


def _rel_err(ours, ref):
    return float(np.abs(np.asarray(ours) - ref).max() / np.abs(ref).max())


def _save(tmp_path, name, obj, **kw):
    path = tmp_path / name
    torch.save(obj, path, **kw)
    return path


def _assert_parity(ours, ref, keys=OUTPUTS, tol=1e-4):
    for k in keys:
        assert np.shape(ours[k]) == ref[k].shape, k
        assert np.asarray(ours[k]).dtype == np.float32, k
        err = _rel_err(ours[k], ref[k])
        assert err <= tol, f"{k}: max abs error {err:.2e} of the features' scale"


# ------------------------------------------------------------ position-embedding resize
@pytest.mark.parametrize(
    "n,h,w",
    [(14, 30, 40), (14, 60, 80), (28, 60, 60), (28, 60, 80), (14, 14, 20), (28, 7, 9), (4, 3, 50)],
)
def test_pos_embed_resize_matches_torch_interpolate(n, h, w):
    """DINO's resize: F.interpolate bicubic with scale factors (h+0.1)/N, (w+0.1)/N."""
    g = torch.Generator().manual_seed(n * 1000 + h + w)
    pos = torch.randn(1, 1 + n * n, 5, generator=g)
    grid = pos[:, 1:].reshape(1, n, n, 5).permute(0, 3, 1, 2)
    ref = F.interpolate(grid, scale_factor=((h + 0.1) / n, (w + 0.1) / n), mode="bicubic")
    assert ref.shape[-2:] == (h, w)
    ref = torch.cat([pos[:, :1], ref.permute(0, 2, 3, 1).reshape(1, h * w, 5)], dim=1).numpy()
    ours = np.asarray(interpolate_pos_embed(jnp.asarray(pos.numpy()), h, w))
    assert ours.shape == ref.shape
    np.testing.assert_allclose(ours, ref, rtol=0, atol=2e-6 * np.abs(ref).max())
    # the 1-D matrices alone reproduce a 1-D torch resize (per axis)
    m = torch_bicubic_matrix(n, (h + 0.1) / n)
    ref_h = F.interpolate(
        grid, scale_factor=((h + 0.1) / n, 1.0), mode="bicubic", align_corners=False
    ).numpy()
    np.testing.assert_allclose(
        np.einsum("hi,bciw->bchw", m, grid.numpy()), ref_h, atol=2e-6 * np.abs(ref_h).max()
    )


def test_pos_embed_same_grid_is_unchanged():
    pos = jnp.asarray(np.random.default_rng(0).normal(size=(1, 1 + 14 * 14, 8)), jnp.float32)
    assert interpolate_pos_embed(pos, 14, 14) is pos


def test_jax_image_resize_differs():
    """jax.image.resize (Keys a=-0.5) is not DINO's resize (PyTorch bicubic, A=-0.75): using it
    would change the position embeddings."""
    grid = np.random.default_rng(1).normal(size=(14, 14, 4)).astype(np.float32)
    pos = jnp.asarray(np.concatenate([np.zeros((1, 4)), grid.reshape(-1, 4)])[None], jnp.float32)
    ours = np.asarray(interpolate_pos_embed(pos, 30, 30))[0, 1:].reshape(30, 30, 4)
    theirs = np.asarray(jax.image.resize(jnp.asarray(grid), (30, 30, 4), "bicubic"))
    assert np.abs(ours - theirs).max() > 1e-3


# --------------------------------------------------------------------------- parity
@pytest.fixture(scope="module")
def torch_models(tmp_path_factory):
    """name -> (torch model, checkpoint path); depth 1 keeps the 480x640 /8 cases cheap."""
    tmp = tmp_path_factory.mktemp("vit")
    cache = {}

    def get(name, depth=1, seed=0):
        key = (name, depth, seed)
        if key not in cache:
            p, d, heads, _ = VARIANTS[name]
            model = TorchViT(p, d, depth, heads).randomize(seed).eval()
            path = tmp / f"{name}_{depth}_{seed}.pth"
            torch.save(model.state_dict(), path)
            cache[key] = (model, path)
        return cache[key]

    return get


@pytest.mark.parametrize("name", list(VARIANTS))
def test_parity_all_outputs_all_sizes(torch_models, name):
    """k, q, v, kqv, CLS attention and tokens at 224x224, 480x480 and 480x640."""
    model, path = torch_models(name)
    module, params = load_dino_vit(path)
    p, d, heads, arch = VARIANTS[name]
    assert (module.patch_size, module.embed_dim, module.num_heads) == (p, d, heads)
    assert module.pos_grid == VIT_ARCHS[arch]["pos_grid"]
    for i, (h, w) in enumerate(SIZES):
        x = _images(1, h, w, seed=i)
        ours = _apply(module, params, x)
        ref = _torch_features(model, x)
        assert ours["k"].shape == (1, h // p, w // p, d)
        assert ours["cls_attn"].shape == (1, heads, h // p, w // p)
        _assert_parity(ours, ref)


def test_parity_full_depth(torch_models):
    """A full 12-block ViT-S/16 at 480x640 (covers the block chain)."""
    model, path = torch_models("S16", depth=12, seed=3)
    module, params = load_dino_vit(path)
    assert module.depth == 12
    x = _images(1, 480, 640, seed=7)
    ours = _apply(module, params, x)
    _assert_parity(ours, _torch_features(model, x))


def test_parity_subset_of_outputs_and_features_api(torch_models):
    """outputs=('k',) computes only k; dino_features returns the same (float32)."""
    model, path = torch_models("S16", depth=2, seed=1)
    module, params = load_dino_vit(path)
    x = _images(2, 96, 128, seed=2)
    ref = _torch_features(model, x)
    only_k = module.apply({"params": params}, x, outputs=("k",))
    assert set(only_k) == {"k"}
    feats = dino_features(module, params, x)  # kind 'k', sharded over 8 devices (padded)
    assert feats.dtype == jnp.float32
    _assert_parity({"k": feats}, ref, keys=("k",))
    one = Mesh(np.array(jax.local_devices()[:1]), ("batch",))
    for kind in ("q", "v", "kqv"):
        _assert_parity(
            {kind: make_feature_fn(module, params, kind, mesh=one)(x)}, ref, keys=(kind,)
        )
    attn = make_feature_fn(module, params, "cls_attn", mesh=one)(x)
    _assert_parity({"cls_attn": attn}, ref, keys=("cls_attn",))
    # attention maps are distributions over the 1 + h*w tokens: the patch part sums to < 1
    sums = np.asarray(attn).sum(axis=(2, 3))
    assert np.all(sums < 1) and np.all(sums > 0)


def test_bfloat16_error_reported(torch_models, capsys):
    model, path = torch_models("S16", depth=2, seed=1)
    module, params = load_dino_vit(path, dtype=jnp.bfloat16)
    assert module.dtype == jnp.bfloat16
    assert all(v.dtype == jnp.float32 for v in jax.tree_util.tree_leaves(params))
    x = _images(1, 480, 640, seed=4)
    ref = _torch_features(model, x)
    ours = _apply(module, params, x)
    errs = {k: _rel_err(ours[k], ref[k]) for k in OUTPUTS}
    with capsys.disabled():
        print("\nbfloat16 max abs error / features' scale (ViT-S/16 depth 2, 480x640): "
              + ", ".join(f"{k} {v:.2e}" for k, v in errs.items()))  # fmt: skip
    for k, err in errs.items():
        assert 1e-5 < err < 0.05, (k, err)  # bf16 really used, and still close


# ---------------------------------------------------------------- loading variants
SMALL = dict(patch_size=16, embed_dim=64, depth=2, num_heads=1)


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """A width-64 ViT/16 (pretrained on 64 px: 4x4 grid) and a 48x80 test image."""
    model = TorchViT(16, 64, 2, 1, img_size=64).randomize(11).eval()
    x = _images(2, 48, 80, seed=5)
    return model, x, _torch_features(model, x), tmp_path_factory.mktemp("small")


@functools.partial(jax.jit, static_argnums=0)
def _apply(module, params, x):
    """All outputs; jitted once per architecture (modules are hashable dataclasses)."""
    return module.apply({"params": params}, x)


def _check_loaded(path, ref, x, **kw):
    module, params = load_dino_vit(path, **kw)
    _assert_parity(_apply(module, params, x), ref)
    return module


def test_load_official_zip_and_legacy(small):
    model, x, ref, tmp = small
    _check_loaded(_save(tmp, "official.pth", model.state_dict()), ref, x)
    legacy = _save(tmp, "legacy.pth", model.state_dict(), _use_new_zipfile_serialization=False)
    _check_loaded(legacy, ref, x)


def test_load_training_checkpoint_teacher_and_student(small):
    model, x, ref, tmp = small
    other = TorchViT(16, 64, 2, 1, img_size=64).randomize(12)
    head = {"head.mlp.0.weight": torch.randn(8, 64), "head.last_layer.weight_g": torch.ones(4, 1)}
    teacher = {f"backbone.{k}": v for k, v in model.state_dict().items()}
    teacher.update({f"{k}": v for k, v in head.items()})
    student = {f"module.backbone.{k}": v for k, v in other.state_dict().items()}
    student.update({f"module.{k}": v for k, v in head.items()})
    full = {
        "student": student,
        "teacher": teacher,
        "optimizer": {"state": {0: {"exp_avg": torch.zeros(3)}}, "param_groups": [{"lr": 1.0}]},
        "epoch": 100,
        "args": argparse.Namespace(arch="vit_small", patch_size=16),
        "dino_loss": {"center": torch.zeros(1, 8)},
    }
    _check_loaded(_save(tmp, "checkpoint.pth", full), ref, x)  # the teacher is preferred
    only_student = {"student": {f"module.backbone.{k}": v for k, v in model.state_dict().items()}}
    _check_loaded(_save(tmp, "student.pth", only_student), ref, x)


def test_load_timm_safetensors(small):
    from safetensors.torch import save_file

    model, x, ref, tmp = small
    path = tmp / "model.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    _check_loaded(path, ref, x)
    # bfloat16 weights are upcast to float32 parameters
    bf = tmp / "bf16.safetensors"
    save_file({k: v.to(torch.bfloat16) for k, v in model.state_dict().items()}, str(bf))
    module, params = load_dino_vit(bf)
    assert all(v.dtype == jnp.float32 for v in jax.tree_util.tree_leaves(params))


def test_convert_cli_round_trip(small, capsys):
    model, x, ref, tmp = small
    src = _save(tmp, "for_convert.pth", {"model": model.state_dict()})
    out = tmp / "converted"
    assert convert.main(["--input", str(src), "--output", str(out)]) == 0
    assert "wrote" in capsys.readouterr().out
    assert (out / "params.msgpack").exists() and (out / "arch.json").exists()
    module = _check_loaded(out, ref, x)
    assert (module.embed_dim, module.depth, module.pos_grid) == (64, 2, 4)
    # a bad input makes the CLI fail with the file named
    assert convert.main(["--input", str(tmp / "missing.pth"), "--output", str(tmp / "o")]) == 1
    assert "missing.pth" in capsys.readouterr().err


def test_num_heads_inference_and_override(small):
    model, x, ref, tmp = small
    path = _save(tmp, "heads.pth", model.state_dict())
    assert load_dino_vit(path)[0].num_heads == 1  # 64 / 64
    m2 = TorchViT(16, 64, 2, 4, img_size=64).randomize(13).eval()
    ref2 = _torch_features(m2, x)
    path2 = _save(tmp, "heads4.pth", m2.state_dict())
    _check_loaded(path2, ref2, x, num_heads=4)
    # with the wrong head count the CLS attention has another shape: the override matters
    module, params = load_dino_vit(path2)
    assert _apply(module, params, x)["cls_attn"].shape[1] == 1


def test_vit_archs_match_reference_parameter_shapes():
    for name, arch in VIT_ARCHS.items():
        module = make_vit(name)
        side = arch["pos_grid"] * arch["patch_size"]
        shapes = jax.eval_shape(
            lambda m=module, s=side: m.init(jax.random.key(0), jnp.zeros((1, s, s, 3)))
        )["params"]
        n_ours = sum(int(np.prod(v.shape)) for v in jax.tree_util.tree_leaves(shapes))
        p, d, heads = arch["patch_size"], arch["embed_dim"], arch["num_heads"]
        with torch.device("meta"):
            ref = TorchViT(p, d, arch["depth"], heads)
        assert n_ours == sum(v.numel() for v in ref.parameters()), name
        expected = expected_state_dict_shapes(arch)
        assert set(expected) == set(ref.state_dict()), name
        assert all(tuple(ref.state_dict()[k].shape) == s for k, s in expected.items())
    with pytest.raises(ValueError, match="unknown ViT"):
        make_vit("vit_huge")


# ---------------------------------------------------------------------- error paths
def _raises(path, *fragments, **kw):
    with pytest.raises(ValueError) as e:
        load_dino_vit(path, **kw)
    msg = str(e.value)
    assert str(path) in msg, msg
    for f in fragments:
        assert f in msg, msg


def test_errors_not_a_vit(small, tmp_path):
    resnet = {"conv1.weight": torch.zeros(64, 3, 7, 7), "fc.weight": torch.zeros(10, 64)}
    _raises(_save(tmp_path, "resnet.pth", resnet), "not a ViT checkpoint", "cls_token")
    _raises(_save(tmp_path, "empty.pth", {}), "no tensors")
    _raises(tmp_path / "absent.pth", "no such file")
    (tmp_path / "junk.pth").write_bytes(b"\x00" * 64)
    _raises(tmp_path / "junk.pth", "not a checkpoint")
    with open(tmp_path / "d2.pkl", "wb") as f:
        pickle.dump({"model": {"stem.conv1.weight": np.zeros((64, 3, 7, 7), np.float32)}}, f)
    _raises(tmp_path / "d2.pkl", "not a ViT checkpoint")


def test_errors_missing_unexpected_mismatched(small, tmp_path):
    model = small[0]
    sd = dict(model.state_dict())
    miss = {k: v for k, v in sd.items() if k != "blocks.1.mlp.fc2.bias"}
    _raises(_save(tmp_path, "miss.pth", miss), "missing: blocks.1.mlp.fc2.bias")
    extra = {**sd, "blocks.0.ls1.gamma": torch.ones(64)}
    _raises(_save(tmp_path, "extra.pth", extra), "unexpected: blocks.0.ls1.gamma (64,)")
    bad = {**sd, "blocks.1.mlp.fc1.weight": torch.zeros(100, 64)}
    _raises(
        _save(tmp_path, "bad.pth", bad),
        "mismatched: blocks.1.mlp.fc1.weight (100, 64) (expected (256, 64))",
    )
    nonsq = {**sd, "pos_embed": torch.zeros(1, 1 + 15, 64)}
    _raises(_save(tmp_path, "nonsq.pth", nonsq), "square patch grid", "(1, 16, 64)")
    gray = {**sd, "patch_embed.proj.weight": torch.zeros(64, 1, 16, 16)}
    _raises(_save(tmp_path, "gray.pth", gray), "(64, 1, 16, 16)")
    no_blocks = {k: v for k, v in sd.items() if not k.startswith("blocks.")}
    _raises(_save(tmp_path, "noblocks.pth", no_blocks), "no 'blocks.<i>.*' keys")


def test_errors_heads(tmp_path):
    m = TorchViT(16, 48, 1, 3, img_size=32)
    path = _save(tmp_path, "w48.pth", m.state_dict())
    _raises(path, "cannot infer the number of heads", "pass num_heads")
    _raises(path, "num_heads 5 does not divide embed_dim 48", num_heads=5)
    assert load_dino_vit(path, num_heads=3)[0].num_heads == 3


def test_errors_converted_dir(small, tmp_path):
    model = small[0]
    src = _save(tmp_path, "src.pth", model.state_dict())
    out = tmp_path / "conv"
    assert convert.main(["--input", str(src), "--output", str(out)]) == 0
    arch_json = (out / "arch.json").read_text()
    (out / "arch.json").write_text(arch_json.replace('"vit"', '"resnet"'))
    _raises(out, "holds 'resnet' weights, expected 'vit'")
    (out / "arch.json").write_text(arch_json.replace('"depth": 2', '"depth": 3'))
    _raises(out, "do not match the architecture", "blocks_2")
    (out / "arch.json").write_text("{not json")
    _raises(out, "arch.json: corrupt JSON")
    (out / "arch.json").write_text(arch_json)
    (out / "params.msgpack").write_bytes(b"\xc1garbage")
    _raises(out, "params.msgpack: corrupt msgpack")
    os.remove(out / "params.msgpack")
    _raises(out, "lack params.msgpack")


def test_errors_bad_inputs(small):
    model, x, ref, tmp = small
    module, params = load_dino_vit(_save(tmp, "inputs.pth", model.state_dict()))
    with pytest.raises(ValueError, match="not a multiple of the patch size 16"):
        module.apply({"params": params}, np.zeros((1, 40, 48, 3), np.float32))
    with pytest.raises(ValueError, match=r"\(B, H, W, 3\)"):
        module.apply({"params": params}, np.zeros((1, 48, 48, 1), np.float32))
    with pytest.raises(ValueError, match="outputs"):
        module.apply({"params": params}, x, outputs=("keys",))
    with pytest.raises(ValueError, match="kind 'cls'"):
        dino_features(module, params, x, kind="cls")
    with pytest.raises(ValueError, match=r"\(B, H, W, 3\)"):
        dino_features(module, params, x[0])


# ------------------------------------------------------------------------- sharding
def test_sharded_equals_single_device(small):
    model, _, _, tmp = small
    devices = jax.local_devices()
    assert len(devices) == 8, "tests/conftest.py forces 8 host devices"
    module, params = load_dino_vit(_save(tmp, "shard.pth", model.state_dict()))
    one = Mesh(np.array(devices[:1]), ("batch",))
    for b in (8, 3):  # divisible, and padded to 8
        x = _images(b, 48, 80, seed=b)
        sharded = dino_features(module, params, x, kind="kqv")
        single = make_feature_fn(module, params, "kqv", mesh=one)(x)
        assert sharded.shape == single.shape == (b, 3, 5, 192)
        # per-device batch sizes differ (1 vs 8), so XLA may order float32 sums differently
        scale = np.abs(np.asarray(single)).max()
        np.testing.assert_allclose(
            np.asarray(sharded), np.asarray(single), rtol=0, atol=1e-6 * scale
        )
        ref = _torch_features(model, x)["kqv"]
        _assert_parity({"kqv": sharded}, {"kqv": ref}, keys=("kqv",))
    x = _images(8, 48, 80, seed=0)
    out = dino_features(module, params, x)
    assert len(out.sharding.device_set) == 8


def test_chunked_attention_is_the_full_softmax(monkeypatch):
    """The query-chunked attention against the whole-matrix softmax in float64 NumPy, with a
    budget that forces chunks of 128 queries and a partial last chunk (300 = 2 x 128 + 44)."""
    from hassod_jax.models import vit

    rng = np.random.default_rng(0)
    q, k, v = (rng.normal(size=(2, 300, 3, 16)).astype(np.float32) for _ in range(3))
    monkeypatch.setattr(vit, "_LOGITS_BUDGET", 128 * 2 * 3 * 300 * 4)
    with jax.default_matmul_precision("highest"):
        got = np.asarray(jax.jit(lambda a, b, c: vit._chunked_attention(a, b, c, 0.25))(q, k, v))
    logits = np.einsum("bqhd,bkhd->bhqk", q.astype(np.float64), k.astype(np.float64)) * 0.25
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    want = np.einsum("bhqk,bkhd->bqhd", p, v.astype(np.float64))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    # The chunking happened: the compiled program loops over 3 chunks of 128 queries.
    hlo = jax.jit(lambda a, b, c: vit._chunked_attention(a, b, c, 0.25)).lower(q, k, v).as_text()
    assert "128" in hlo and ("while" in hlo or "scan" in hlo)
