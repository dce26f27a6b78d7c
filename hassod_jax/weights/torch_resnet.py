"""ResNet weights: DINO's torchvision-named `dino_resnet50_pretrain.pth` and detectron2-format
pickles -> the `ResNet` variables (`load_resnet50`). torchvision names go to detectron2's
(`stem.conv1`, `res2.0.conv1.norm` ...), which map one to one onto our module names."""

from __future__ import annotations

import os
import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from hassod_jax.models.resnet import RESNET50, ResNet, ResNetConfig
from hassod_jax.weights.torch_reader import read_state_dict

_PREFIXES = (
    "teacher.",
    "state_dict.",
    "model.",
    "module.",
    "backbone.bottom_up.",
    "backbone.",
    "encoder.",
)


def _strip_prefixes(sd: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    out = dict(sd)
    # A flattened DINO checkpoint holds both 'student.*' and 'teacher.*': keep the teacher.
    if any(k.startswith("teacher.") for k in out):
        out = {k: v for k, v in out.items() if k.startswith("teacher.")}
    changed = True
    while changed:
        changed = False
        for p in _PREFIXES:
            if out and all(k.startswith(p) for k in out):
                out = {k[len(p) :]: v for k, v in out.items()}
                changed = True
    return out


def _unnest(obj: Any) -> dict[str, Any]:
    """Finds the flat {name: array} dict inside DINO / detectron2 checkpoint wrappers."""
    for key in ("teacher", "state_dict", "model"):
        if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
            return _unnest(obj[key])
    return obj


_TV_BN = {"weight": "scale", "bias": "bias", "running_mean": "mean", "running_var": "var"}


def _torchvision_to_d2(name: str) -> str | None:
    """torchvision ResNet name -> detectron2 name; None for ignored keys (fc, counters)."""
    if name.startswith("fc.") or name.endswith("num_batches_tracked"):
        return None
    m = re.fullmatch(r"conv1\.weight", name)
    if m:
        return "stem.conv1.weight"
    m = re.fullmatch(r"bn1\.(\w+)", name)
    if m:
        return f"stem.conv1.norm.{m.group(1)}"
    m = re.fullmatch(r"layer(\d)\.(\d+)\.(conv\d)\.weight", name)
    if m:
        return f"res{int(m.group(1)) + 1}.{m.group(2)}.{m.group(3)}.weight"
    m = re.fullmatch(r"layer(\d)\.(\d+)\.bn(\d)\.(\w+)", name)
    if m:
        return f"res{int(m.group(1)) + 1}.{m.group(2)}.conv{m.group(3)}.norm.{m.group(4)}"
    m = re.fullmatch(r"layer(\d)\.(\d+)\.downsample\.0\.weight", name)
    if m:
        return f"res{int(m.group(1)) + 1}.{m.group(2)}.shortcut.weight"
    m = re.fullmatch(r"layer(\d)\.(\d+)\.downsample\.1\.(\w+)", name)
    if m:
        return f"res{int(m.group(1)) + 1}.{m.group(2)}.shortcut.norm.{m.group(3)}"
    return name  # unknown: reported as unexpected


def _d2_to_flax_path(name: str) -> tuple[str, tuple[str, ...]] | None:
    """detectron2 name -> (collection, path in the flax variable tree)."""
    if name.endswith("num_batches_tracked"):
        return None
    m = re.fullmatch(r"stem\.conv1\.weight", name)
    if m:
        return "params", ("stem_conv1", "kernel")
    m = re.fullmatch(r"stem\.conv1\.norm\.(\w+)", name)
    if m and m.group(1) in _TV_BN:
        f = _TV_BN[m.group(1)]
        return ("params" if f in ("scale", "bias") else "batch_stats"), ("stem_norm", f)
    m = re.fullmatch(r"(res\d)\.(\d+)\.(conv\d|shortcut)\.weight", name)
    if m:
        return "params", (f"{m.group(1)}_{m.group(2)}", m.group(3), "kernel")
    m = re.fullmatch(r"(res\d)\.(\d+)\.(conv(\d)|shortcut)\.norm\.(\w+)", name)
    if m and m.group(5) in _TV_BN:
        f = _TV_BN[m.group(5)]
        norm = "shortcut_norm" if m.group(3) == "shortcut" else f"norm{m.group(4)}"
        coll = "params" if f in ("scale", "bias") else "batch_stats"
        return coll, (f"{m.group(1)}_{m.group(2)}", norm, f)
    return None


def _flatten(tree: dict, prefix: tuple = ()) -> dict[tuple, Any]:
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict) or hasattr(v, "items"):
            out.update(_flatten(dict(v), prefix + (k,)))
        else:
            out[prefix + (k,)] = v
    return out


def _unflatten(flat: dict[tuple, Any]) -> dict:
    out: dict = {}
    for path, v in flat.items():
        d = out
        for k in path[:-1]:
            d = d.setdefault(k, {})
        d[path[-1]] = v
    return out


def resnet_variables_from_state_dict(
    state_dict: dict[str, np.ndarray],
    config: ResNetConfig = RESNET50,
    source: str = "<state_dict>",
) -> dict:
    """Converts a torchvision- or detectron2-named ResNet state dict to flax variables.

    Args:
      state_dict: {name: array}; conv weights (O, I, kh, kw), BN weight/bias/running_*.
        Optional wrappers ('teacher'/'state_dict'/'model') and prefixes ('module.',
        'backbone.', 'backbone.bottom_up.') are removed.
      config: the ResNet the weights are for.
      source: file name used in error messages.

    Returns:
      {"params": ..., "batch_stats": ...} float32 numpy arrays for `ResNet(config)`.

    Raises:
      ValueError listing missing, unexpected and shape-mismatched keys.
    """
    sd = _strip_prefixes(_unnest(state_dict))
    if not isinstance(sd, dict) or not sd:
        raise ValueError(f"{source}: no ResNet state dict found")
    d2_style = any(k.startswith("stem.") or re.match(r"res\d\.", k) for k in sd)
    template = jax.eval_shape(
        lambda: ResNet(config).init(jax.random.PRNGKey(0), jnp.zeros((1, 64, 64, 3)))
    )
    expected = {}
    for coll in ("params", "batch_stats"):
        for path, leaf in _flatten(dict(template[coll])).items():
            expected[(coll,) + path] = leaf.shape

    flat: dict[tuple, np.ndarray] = {}
    unexpected, mismatched = [], []
    for name, value in sd.items():
        d2_name = name if d2_style else _torchvision_to_d2(name)
        if d2_name is None:
            continue
        target = _d2_to_flax_path(d2_name)
        if target is None:
            if not d2_name.endswith("num_batches_tracked"):
                unexpected.append(name)
            continue
        coll, path = target
        arr = np.asarray(value, dtype=np.float32)
        if path[-1] == "kernel":
            if arr.ndim != 4:
                mismatched.append(f"{name}: expected a 4-D conv weight, got shape {arr.shape}")
                continue
            arr = arr.transpose(2, 3, 1, 0)  # (O, I, kh, kw) -> (kh, kw, I, O)
        key = (coll,) + path
        if key not in expected:
            unexpected.append(name)
            continue
        if tuple(arr.shape) != tuple(expected[key]):
            mismatched.append(f"{name}: checkpoint {arr.shape} vs model {tuple(expected[key])}")
            continue
        flat[key] = arr
    missing = ["/".join(k) for k in expected if k not in flat]
    if missing or unexpected or mismatched:
        raise ValueError(
            f"{source}: checkpoint does not match ResNet({config}):\n"
            f"  missing ({len(missing)}): {missing[:20]}\n"
            f"  unexpected ({len(unexpected)}): {sorted(unexpected)[:20]}\n"
            f"  mismatched ({len(mismatched)}): {mismatched[:20]}"
        )
    tree = _unflatten(flat)
    return {"params": tree["params"], "batch_stats": tree["batch_stats"]}


def load_resnet50(
    path: str | os.PathLike, config: ResNetConfig = RESNET50, dtype: Any = jnp.float32
) -> tuple[ResNet, dict]:
    """Loads a ResNet-50 checkpoint (no torch needed).

    Accepts the DINO `dino_resnet50_pretrain.pth` (torchvision names: conv1, bn1,
    layer1.0.conv1 ..., downsample.0/1; fc.* ignored; 'teacher'/'state_dict' nesting and
    'module.'/'backbone.' prefixes allowed) and the detectron2-format pickle
    (`dino_RN50_pretrain_d2_format.pkl`: {'model': {stem.conv1.weight, stem.conv1.norm.*,
    res2.0.conv1.weight, res2.0.conv1.norm.*, res2.0.shortcut.* ...}}).

    Returns:
      (module, variables): `module.apply(variables, images_nhwc, train=False)` gives
      {"res2".."res5"} NHWC features.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise ValueError(f"{path}: ResNet checkpoint file not found")
    sd = read_state_dict(path)
    variables = resnet_variables_from_state_dict(sd, config, source=path)
    return ResNet(config, dtype=dtype), variables
