"""ResNet-50 and its loader against torchvision's ResNet-50 as the oracle."""

import pickle

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
torchvision = pytest.importorskip("torchvision")

from hassod_jax.models import resnet  # noqa: E402
from hassod_jax.weights import torch_resnet  # noqa: E402
from tests.models.torch_resnet import resnet50_with_random_bn  # noqa: E402


@pytest.fixture(scope="module")
def torch_resnet50():
    model, g = resnet50_with_random_bn()
    model.eval()
    x = torch.randn(2, 3, 64, 96, generator=g)
    with torch.no_grad():
        feats = {}
        h = model.maxpool(model.relu(model.bn1(model.conv1(x))))
        for i, layer in enumerate([model.layer1, model.layer2, model.layer3, model.layer4]):
            h = layer(h)
            feats[f"res{i + 2}"] = h.permute(0, 2, 3, 1).numpy()
    return model, x.permute(0, 2, 3, 1).numpy(), feats


def _check(feats_jax, feats_ref):
    for k, ref in feats_ref.items():
        got = np.asarray(feats_jax[k])
        assert got.shape == ref.shape, k
        # Relative to the feature scale: float32 accumulated over ~50 layers.
        err = np.abs(got - ref).max() / np.abs(ref).max()
        assert err <= 1e-4, (k, err)


def _d2_state_dict(tv_sd):
    out = {}
    for k, v in tv_sd.items():
        d2 = torch_resnet._torchvision_to_d2(k)
        if d2 is not None:
            out[d2] = v.numpy()
    return out


def test_torchvision_pth_matches(tmp_path, torch_resnet50):
    model, x, ref = torch_resnet50
    path = tmp_path / "dino_resnet50_pretrain.pth"
    # DINO checkpoints may be wrapped and prefixed.
    sd = {"module." + k: v for k, v in model.state_dict().items()}
    torch.save({"teacher": sd}, path)
    module, variables = torch_resnet.load_resnet50(path)
    _check(jax.jit(lambda v, im: module.apply(v, im, train=False))(variables, x), ref)


def test_state_dict_conversion_matches(torch_resnet50):
    model, x, ref = torch_resnet50
    sd = {k: v.numpy() for k, v in model.state_dict().items()}
    variables = torch_resnet.resnet_variables_from_state_dict(sd)
    module = resnet.ResNet(resnet.RESNET50)
    _check(jax.jit(lambda v, im: module.apply(v, im, train=False))(variables, x), ref)


def test_d2_pkl_matches(tmp_path, torch_resnet50):
    model, x, ref = torch_resnet50
    path = tmp_path / "dino_RN50_pretrain_d2_format.pkl"
    with open(path, "wb") as f:
        pickle.dump({"model": _d2_state_dict(model.state_dict()), "__author__": "test"}, f)
    module, variables = torch_resnet.load_resnet50(path)
    _check(jax.jit(lambda v, im: module.apply(v, im, train=False))(variables, x), ref)
    # The d2 dict directly (no file) converts the same way.
    v2 = torch_resnet.resnet_variables_from_state_dict(_d2_state_dict(model.state_dict()))
    assert jax.tree_util.tree_all(
        jax.tree_util.tree_map(lambda a, b: np.array_equal(a, b), variables, v2)
    )


def test_loader_errors(tmp_path, torch_resnet50):
    model, _, _ = torch_resnet50
    sd = {k: v.numpy() for k, v in model.state_dict().items()}
    missing = dict(sd)
    del missing["layer3.2.conv2.weight"]
    with pytest.raises(ValueError, match=r"(?s)ckpt\.pth.*missing \(1\).*res4_2/conv2/kernel"):
        torch_resnet.resnet_variables_from_state_dict(missing, source="ckpt.pth")
    extra = dict(sd)
    extra["layer5.0.conv1.weight"] = np.zeros((3, 3, 1, 1), np.float32)
    with pytest.raises(ValueError, match=r"unexpected \(1\).*layer5\.0\.conv1\.weight"):
        torch_resnet.resnet_variables_from_state_dict(extra, source="x.pth")
    bad = dict(sd)
    bad["layer1.0.conv1.weight"] = np.zeros((64, 64, 3, 3), np.float32)
    with pytest.raises(ValueError, match=r"mismatched \(1\).*layer1\.0\.conv1\.weight"):
        torch_resnet.resnet_variables_from_state_dict(bad, source="x.pth")
    # A ResNet-50 checkpoint does not fit the small variant.
    with pytest.raises(ValueError, match="x.pth"):
        torch_resnet.resnet_variables_from_state_dict(sd, resnet.RESNET_SMALL, source="x.pth")
    with pytest.raises(ValueError, match="not found"):
        torch_resnet.load_resnet50(tmp_path / "nope.pth")


def test_train_mode_batch_stats_and_small_variant():
    """Train-mode BN uses batch statistics (compared with a float64 NumPy transcription on
    the stem) and updates running stats with torch momentum 0.1."""
    cfg = resnet.RESNET_SMALL
    module = resnet.ResNet(cfg)
    x = np.random.default_rng(0).normal(size=(2, 64, 64, 3)).astype(np.float32)
    variables = jax.jit(lambda x: module.init(jax.random.PRNGKey(0), x))(x)
    out, upd = jax.jit(lambda v, x: module.apply(v, x, train=True, mutable=["batch_stats"]))(
        variables, x
    )
    for i, k in enumerate(["res2", "res3", "res4", "res5"]):
        assert out[k].shape == (2, 64 // 2 ** (i + 2), 64 // 2 ** (i + 2), cfg.out_channels()[k])
    # Stem BN running mean after one step: 0.9 * 0 + 0.1 * batch mean of the conv output.
    kernel = np.asarray(variables["params"]["stem_conv1"]["kernel"], np.float64)
    conv = torch.nn.functional.conv2d(
        torch.from_numpy(x.astype(np.float64)).permute(0, 3, 1, 2),
        torch.from_numpy(kernel).permute(3, 2, 0, 1),
        stride=2,
        padding=3,
    )
    expect = 0.1 * conv.mean(dim=(0, 2, 3)).numpy()
    got = np.asarray(upd["batch_stats"]["stem_norm"]["mean"])
    np.testing.assert_allclose(got, expect, rtol=1e-4, atol=1e-6)
    assert jnp.all(jnp.isfinite(out["res5"]))
