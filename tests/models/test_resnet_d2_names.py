"""The detectron2-format ResNet-50 `.pkl` (`dino_RN50_pretrain_d2_format.pkl`) against an
INDEPENDENT list of names: the `backbone.bottom_up.*` tensors of a trained HASSOD checkpoint
(`hassod_checkpoint_keys.txt` in the reference folder below, written from the real file, not by
our code).

Without `num_batches_tracked` those are exactly detectron2's ResNet names. The test writes a
`{"model": {name: array}}` pickle with random arrays of the listed names and shapes, loads it
with `load_resnet50`, and checks each tensor lands where detectron2 means it: the same arrays,
renamed to torchvision's names by detectron2's documented conversion (its
`convert-torchvision-to-d2.py`, read backwards: conv1/bn1 -> stem.conv1(.norm),
layer{K-1}.i.convJ/bnJ -> resK.i.convJ(.norm), layer{K-1}.i.downsample.0/1 ->
resK.i.shortcut(.norm)), loaded into torchvision's resnet50 with `strict` name checking, give
the same res2..res5 features as our model loaded from the pickle. The renaming here is written
independently of `hassod_jax.models.resnet`'s.

The reference folder is `HASSOD_REFERENCE_DIR`, else `../shared/reference` beside the
repository (the developers' copy; a clone has none); without it the test skips naming the
file (a failure under CI=true).
"""

import os
import pickle
import re

import jax
import numpy as np
import pytest
import torch
import torchvision

from hassod_jax.weights import torch_resnet

ENV = "HASSOD_REFERENCE_DIR"
_DEFAULT = os.path.join(
    os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
    "..",
    "shared",
    "reference",
)
KEYS = "hassod_checkpoint_keys.txt"
PREFIX = "backbone.bottom_up."


def reference_file(name):
    """The path of `name` in the reference folder, or skip (fail under CI) naming it."""
    root = os.path.abspath(os.environ.get(ENV) or _DEFAULT)
    path = os.path.join(root, name)
    if not os.path.exists(path):
        msg = f"reference file {path} is missing: set {ENV} to the shared/reference folder"
        if os.environ.get("CI", "").strip().lower() in ("1", "true", "yes", "on"):
            pytest.fail(msg)
        pytest.skip(msg)
    return path


def _listed_backbone():
    """{detectron2 name: shape} of the list's backbone.bottom_up tensors (counters left out)."""
    out = {}
    with open(reference_file(KEYS), encoding="utf-8") as f:
        for line in f:
            if not line.strip():
                continue
            name, shape, dtype = line.rstrip("\n").split("\t")
            if not name.startswith(PREFIX) or name.endswith("num_batches_tracked"):
                continue
            assert dtype == "torch.float32", line
            out[name[len(PREFIX) :]] = tuple(int(s) for s in re.findall(r"\d+", shape))
    return out


_BN = {"weight", "bias", "running_mean", "running_var"}


def _d2_to_torchvision(name):
    """detectron2's documented ResNet naming -> torchvision's (independent of our loader)."""
    parts = name.split(".")
    if parts[:2] == ["stem", "conv1"]:
        if parts[2:] == ["weight"]:
            return "conv1.weight"
        assert parts[2] == "norm" and parts[3] in _BN and len(parts) == 4, name
        return f"bn1.{parts[3]}"
    stage, block, conv = parts[0], parts[1], parts[2]
    assert re.fullmatch(r"res[2-5]", stage) and block.isdigit(), name
    layer = f"layer{int(stage[3]) - 1}.{block}"
    if conv == "shortcut":
        conv_name, norm_name = "downsample.0", "downsample.1"
    else:
        assert re.fullmatch(r"conv[123]", conv), name
        conv_name, norm_name = conv, f"bn{conv[4]}"
    if parts[3:] == ["weight"]:
        return f"{layer}.{conv_name}.weight"
    assert parts[3] == "norm" and parts[4] in _BN and len(parts) == 5, name
    return f"{layer}.{norm_name}.{parts[4]}"


def _random_arrays(shapes, seed=0):
    """Random tensors of the listed shapes; BN statistics and scales such that eval-mode BN is
    not the identity and the activations stay O(1) through 16 blocks."""
    r = np.random.default_rng(seed)
    out = {}
    for name, shape in shapes.items():
        if name.endswith("running_var"):
            a = r.uniform(0.75, 1.25, shape)
        elif name.endswith("running_mean") or name.endswith("norm.bias"):
            a = r.normal(0.0, 0.1, shape)
        elif name.endswith("norm.weight"):
            a = r.uniform(0.5, 1.0, shape)
        else:  # conv weight (O, I, kh, kw): He-scaled
            fan_in = int(np.prod(shape[1:]))
            a = r.normal(0.0, np.sqrt(2.0 / fan_in), shape)
        out[name] = a.astype(np.float32)
    return out


def test_listed_names_are_detectron2s_resnet50():
    shapes = _listed_backbone()
    # ResNet-50: stem (conv + 4 BN tensors), 16 blocks of 3 convs, 4 shortcuts: 53 convs.
    assert len(shapes) == 53 * 5
    convs = [n for n in shapes if n.endswith(".weight") and ".norm." not in n]
    assert len(convs) == 53
    assert shapes["stem.conv1.weight"] == (64, 3, 7, 7)
    assert shapes["res5.2.conv3.weight"] == (2048, 512, 1, 1)
    # Every name is one of the documented patterns, and the renaming is one-to-one.
    tv = {_d2_to_torchvision(n) for n in shapes}
    assert len(tv) == len(shapes)


def test_d2_pkl_with_the_listed_names_loads_where_detectron2_means(tmp_path):
    shapes = _listed_backbone()
    arrays = _random_arrays(shapes)
    path = tmp_path / "dino_RN50_pretrain_d2_format.pkl"
    with open(path, "wb") as f:
        # detectron2's format: numpy arrays under "model", plus bookkeeping keys.
        pickle.dump({"model": arrays, "__author__": "test", "matching_heuristics": True}, f)
    module, variables = torch_resnet.load_resnet50(path)

    # The oracle: torchvision's resnet50 holding the same arrays under torchvision's names.
    tv_model = torchvision.models.resnet50(weights=None)
    tv_sd = {_d2_to_torchvision(n): torch.from_numpy(a) for n, a in arrays.items()}
    result = tv_model.load_state_dict(tv_sd, strict=False)
    assert not result.unexpected_keys, result.unexpected_keys
    # Only the classifier (which detectron2's backbone has no use for) and the BN counters
    # are not in the list.
    left = {k for k in result.missing_keys if not k.endswith("num_batches_tracked")}
    assert left == {"fc.weight", "fc.bias"}, left
    tv_model.eval()

    x = np.random.default_rng(1).normal(size=(2, 64, 96, 3)).astype(np.float32)
    with torch.no_grad():
        h = torch.from_numpy(x).permute(0, 3, 1, 2)
        h = tv_model.maxpool(tv_model.relu(tv_model.bn1(tv_model.conv1(h))))
        ref = {}
        for i, layer in enumerate([tv_model.layer1, tv_model.layer2, tv_model.layer3,
                                   tv_model.layer4]):
            h = layer(h)
            ref[f"res{i + 2}"] = h.permute(0, 2, 3, 1).numpy()
    got = jax.jit(lambda v, im: module.apply(v, im, train=False))(variables, x)
    for k, r in ref.items():
        g = np.asarray(got[k])
        assert g.shape == r.shape, k
        # float32 through up to 50 layers, relative to the feature scale (a single misplaced
        # tensor changes the features by O(1)).
        err = np.abs(g - r).max() / np.abs(r).max()
        assert err <= 1e-4, (k, err)

    # Tensor by tensor: each listed array is exactly one variable of ours (no approximation
    # can hide a swapped pair of same-shaped tensors, e.g. two BN's statistics).
    flat = {}
    for coll in ("params", "batch_stats"):
        for p, leaf in jax.tree_util.tree_leaves_with_path(variables[coll]):
            flat[(coll,) + tuple(k.key for k in p)] = np.asarray(leaf)
    assert len(flat) == len(arrays)
    for name, a in arrays.items():
        want = a.transpose(2, 3, 1, 0) if a.ndim == 4 else a
        hits = [k for k, v in flat.items() if v.shape == want.shape and np.array_equal(v, want)]
        assert len(hits) == 1, (name, hits)
        key = hits[0]
        tv_name = _d2_to_torchvision(name)
        # Our variable sits in the block, conv and BN field that the torchvision name says.
        if tv_name.startswith(("conv1", "bn1")):
            block = "stem_conv1" if tv_name.startswith("conv1") else "stem_norm"
        else:
            m = re.match(r"layer(\d)\.(\d+)\.", tv_name)
            block = f"res{int(m.group(1)) + 1}_{m.group(2)}"
        assert key[1] == block, (name, key)
        if key[1].startswith("res"):
            inner = tv_name.split(".")[2:-1]  # ["conv2"], ["bn2"], ["downsample", "1"]
            ours = {"downsample.0": "shortcut", "downsample.1": "shortcut_norm"}.get(
                ".".join(inner), re.sub(r"^bn", "norm", inner[0])
            )
            assert key[2] == ours, (name, key)
        field = tv_name.rsplit(".", 1)[1]
        expect = {"weight": "scale", "bias": "bias", "running_mean": "mean",
                  "running_var": "var"}
        if a.ndim == 4:
            assert key[0] == "params" and key[-1] == "kernel", (name, key)
        else:
            assert key[-1] == expect[field], (name, key)
            assert key[0] == ("batch_stats" if field.startswith("running") else "params")
