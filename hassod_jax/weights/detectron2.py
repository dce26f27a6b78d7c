"""HASSOD / detectron2 detector checkpoints <-> `CascadeMaskRCNN` variables, without torch.

A detectron2 checkpoint of HASSOD's Cascade Mask R-CNN (`DetectionCheckpointer.save`:
`{"model": state_dict, ...}`; Mean Teacher files hold the same keys twice, prefixed
`modelStudent.` and `modelTeacher.`) has 414 tensors for the R50-FPN model: the ResNet under
`backbone.bottom_up.`, the FPN under `backbone.fpn_*`, the RPN head, three cascade box heads and
predictors (each with HASSOD's `level_predictor`) and the mask head. Every width is read from
the shapes, so thin variants (e.g. the detectron2 test fixture) and the full model load alike.

Layouts: conv weights OIHW -> flax HWIO; Linear (out, in) -> Dense (in, out); the box heads'
`fc1` takes the pooled (C, 7, 7) features flattened in C, H, W order while ours flattens the
NHWC (7, 7, C) pool, so its columns are permuted; `deconv` (ConvTranspose2d) is (in, out, kh,
kw) -> (kh, kw, in, out) (`roi_heads.Deconv2x2`, not flipped). BatchNorm: weight/bias ->
params scale/bias, running_mean/var -> batch_stats mean/var; `num_batches_tracked` is not
kept (written back as 0: detectron2 only uses it when BN momentum is None).

`load_detector(path)` also reads our own checkpoints: a training workdir (its newest step), one
orbax step directory, or an exported model directory (`export_detector`).
"""

from __future__ import annotations

import collections
import dataclasses
import math
import os
import re
from typing import Any

import numpy as np

from hassod_jax.weights.formats import is_converted_dir, load_converted, save_converted
from hassod_jax.weights.torch_reader import CheckpointError, flatten_tree, read_checkpoint

__all__ = [
    "detector_config_from_state_dict",
    "detector_variables_from_state_dict",
    "export_detector",
    "load_detector",
    "select_model_state_dict",
    "state_dict_from_detector_variables",
]

FAMILY = "detector"
_BN_FIELDS = {"scale": "weight", "bias": "bias", "mean": "running_mean", "var": "running_var"}
_STEM_KEY = "backbone.bottom_up.stem.conv1.weight"


# ----------------------------------------------------------------------------------------------
# Names: one function from our variable paths to detectron2 names; loading inverts it.


def d2_name(collection: str, path: tuple[str, ...]) -> str:
    """detectron2 state-dict name of the flax variable `collection/path` of CascadeMaskRCNN."""
    head, rest = path[0], path[1:]

    def leaf(p):  # kernel/bias of a conv or dense
        return {"kernel": "weight", "bias": "bias"}[p]

    if head == "backbone":
        mod = rest[0]
        if mod == "stem_conv1":
            return "backbone.bottom_up.stem.conv1.weight"
        if mod == "stem_norm":
            return f"backbone.bottom_up.stem.conv1.norm.{_BN_FIELDS[rest[1]]}"
        stage, block = mod.split("_")
        sub = rest[1]
        base = f"backbone.bottom_up.{stage}.{block}"
        if sub in ("shortcut", "conv1", "conv2", "conv3"):
            return f"{base}.{sub}.weight"
        if sub == "shortcut_norm":
            return f"{base}.shortcut.norm.{_BN_FIELDS[rest[2]]}"
        m = re.fullmatch(r"norm(\d)", sub)
        if m:
            return f"{base}.conv{m.group(1)}.norm.{_BN_FIELDS[rest[2]]}"
    elif head == "fpn":
        mod, sub = rest[0], rest[1]
        if sub == "conv":
            return f"backbone.{mod}.{leaf(rest[2])}"
        if sub == "norm":
            return f"backbone.{mod}.norm.{_BN_FIELDS[rest[2]]}"
    elif head == "rpn_head":
        return f"proposal_generator.rpn_head.{rest[0]}.{leaf(rest[1])}"
    elif head.startswith("box_heads_"):
        k = head[len("box_heads_") :]
        mod = rest[0]
        if re.fullmatch(r"fc\d+", mod):
            return f"roi_heads.box_head.{k}.{mod}.{leaf(rest[1])}"
        return f"roi_heads.box_predictor.{k}.{mod}.{leaf(rest[1])}"
    elif head == "mask_head":
        return f"roi_heads.mask_head.{rest[0]}.{leaf(rest[1])}"
    raise ValueError(f"no detectron2 name for {collection}/{'/'.join(path)}")


def _to_flax(name: str, arr: np.ndarray, target_shape, pool: tuple[int, int]) -> np.ndarray:
    """detectron2 layout -> ours for the tensor `name` (target_shape: our shape)."""
    arr = np.asarray(arr, np.float32)
    if not name.endswith(".weight") or arr.ndim == 1:
        return arr
    if arr.ndim == 4:
        if ".deconv." in name:
            return arr.transpose(2, 3, 0, 1)  # (I, O, kh, kw) -> (kh, kw, I, O)
        return arr.transpose(2, 3, 1, 0)  # (O, I, kh, kw) -> (kh, kw, I, O)
    if arr.ndim == 2:
        if re.search(r"\.box_head\.\d+\.fc1\.", name) and len(target_shape) == 2:
            c, r = pool
            out = arr.shape[0]
            if arr.shape[1] != c * r * r:
                return arr.T  # shape check reports it
            return arr.reshape(out, c, r, r).transpose(2, 3, 1, 0).reshape(r * r * c, out)
        return arr.T
    return arr


def _from_flax(name: str, arr: np.ndarray, pool: tuple[int, int]) -> np.ndarray:
    """Ours -> detectron2 layout (the inverse of `_to_flax`)."""
    arr = np.asarray(arr, np.float32)
    if not name.endswith(".weight") or arr.ndim == 1:
        return arr
    if arr.ndim == 4:
        if ".deconv." in name:
            return arr.transpose(2, 3, 0, 1)
        return arr.transpose(3, 2, 0, 1)
    if arr.ndim == 2:
        if re.search(r"\.box_head\.\d+\.fc1\.", name):
            c, r = pool
            out = arr.shape[1]
            return arr.reshape(r, r, c, out).transpose(3, 2, 0, 1).reshape(out, c * r * r)
        return arr.T
    return arr


# ----------------------------------------------------------------------------------------------
# The architecture from the shapes.


def select_model_state_dict(tree: Any, source: str, which: str = "student") -> dict:
    """The flat {name: array} detector state dict inside a loaded detectron2 checkpoint.

    Accepts `{"model": sd, ...}` or a bare state dict; a teacher-student file (keys prefixed
    `modelStudent.` / `modelTeacher.`) gives the student unless `which="teacher"`.
    """
    if which not in ("student", "teacher"):
        raise ValueError(f"{source}: which must be 'student' or 'teacher', got {which!r}")
    if isinstance(tree, dict) and isinstance(tree.get("model"), dict):
        tree = tree["model"]
    if not isinstance(tree, dict):
        raise CheckpointError(f"{source}: not a detectron2 checkpoint (no 'model' state dict)")
    sd = flatten_tree(tree)
    prefixes = ("modelStudent.", "modelTeacher.")
    if any(k.startswith(prefixes) for k in sd):
        want = "modelStudent." if which == "student" else "modelTeacher."
        sd = {k[len(want) :]: v for k, v in sd.items() if k.startswith(want)}
        if not sd:
            raise CheckpointError(f"{source}: teacher-student checkpoint without {want}* keys")
    elif which == "teacher":
        raise CheckpointError(
            f"{source}: not a teacher-student checkpoint (no modelTeacher.* keys); "
            "load it without which='teacher'"
        )
    # DDP-wrapped saves.
    if sd and all(k.startswith("module.") for k in sd):
        sd = {k[len("module.") :]: v for k, v in sd.items()}
    if _STEM_KEY not in sd:
        some = sorted(sd)[:8]
        raise CheckpointError(
            f"{source}: not a HASSOD/detectron2 detector checkpoint (no {_STEM_KEY!r}; "
            f"{len(sd)} tensors, e.g. {some})"
        )
    return sd


def _count(sd, pattern: str) -> int:
    rx = re.compile(pattern)
    return len({m.group(1) for k in sd for m in [rx.fullmatch(k)] if m})


def detector_config_from_state_dict(sd: dict, source: str = "<state_dict>", **overrides):
    """A DetectorConfig whose every width matches the state dict; the non-shape settings are
    HASSOD's (`DetectorConfig()` defaults) unless given in `overrides`."""
    from hassod_jax.models import detector
    from hassod_jax.models.resnet import ResNetConfig

    def shape(key):
        if key not in sd:
            raise CheckpointError(f"{source}: missing {key!r}, needed to infer the architecture")
        return tuple(sd[key].shape)

    bb = "backbone.bottom_up."
    bottleneck = f"{bb}res2.0.conv3.weight" in sd
    stages = tuple(_count(sd, rf"{re.escape(bb)}res{s}\.(\d+)\.conv1\.weight") for s in (2, 3, 4, 5))
    if min(stages) < 1:
        raise CheckpointError(f"{source}: ResNet stages res2..res5 incomplete (blocks {stages})")
    width = shape(f"{bb}res2.0.conv1.weight")[0]
    stem = shape(f"{bb}stem.conv1.weight")[0]
    resnet = ResNetConfig(
        block="bottleneck" if bottleneck else "basic",
        stage_sizes=stages,
        width=width,
        stem_width=None if stem == width else stem,
    )
    fpn_c = shape("backbone.fpn_lateral2.weight")[0]
    n_anchor = shape("proposal_generator.rpn_head.objectness_logits.weight")[0]
    base = detector.DetectorConfig()
    if n_anchor != len(base.aspect_ratios) and "aspect_ratios" not in overrides:
        raise CheckpointError(
            f"{source}: the RPN predicts {n_anchor} anchors per position; HASSOD uses "
            f"{len(base.aspect_ratios)} (aspect ratios {base.aspect_ratios}); pass aspect_ratios"
        )
    n_stage = _count(sd, r"roi_heads\.box_predictor\.(\d+)\.cls_score\.weight")
    if n_stage == 0 and "roi_heads.box_predictor.cls_score.weight" in sd:
        raise CheckpointError(f"{source}: a plain (non-cascade) R-CNN; HASSOD's is a cascade")
    if n_stage != base.num_stages and "cascade_ious" not in overrides:
        raise CheckpointError(
            f"{source}: {n_stage} cascade stages; HASSOD has {base.num_stages} "
            "(pass cascade_ious and cascade_box_weights for another cascade)"
        )
    if "roi_heads.box_predictor.0.level_predictor.weight" not in sd:
        raise CheckpointError(
            f"{source}: no hierarchy-level head (roi_heads.box_predictor.0.level_predictor.*): "
            "not a HASSOD detector"
        )
    fc1 = shape("roi_heads.box_head.0.fc1.weight")
    r = int(round(math.sqrt(fc1[1] / fpn_c)))
    if r * r * fpn_c != fc1[1]:
        raise CheckpointError(
            f"{source}: roi_heads.box_head.0.fc1.weight {fc1} is not (fc_dim, {fpn_c} x R x R)"
        )
    fields = dict(
        resnet=resnet,
        fpn_channels=fpn_c,
        fpn_norm="backbone.fpn_lateral2.norm.weight" in sd,
        box_fc_dim=fc1[0],
        box_num_fc=_count(sd, r"roi_heads\.box_head\.0\.fc(\d+)\.weight"),
        box_pooler_resolution=r,
        num_levels=shape("roi_heads.box_predictor.0.level_predictor.weight")[0],
        mask_head_dim=shape("roi_heads.mask_head.mask_fcn1.weight")[0],
        mask_num_conv=_count(sd, r"roi_heads\.mask_head\.mask_fcn(\d+)\.weight"),
    )
    fields.update(overrides)
    return dataclasses.replace(base, **fields)


def _template(config):
    """{(collection, *path): shape} of CascadeMaskRCNN(config)'s variables."""
    import jax
    import jax.numpy as jnp
    from flax.traverse_util import flatten_dict

    from hassod_jax.models import detector

    model = detector.CascadeMaskRCNN(config)
    shapes = jax.eval_shape(
        lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 64, 64, 3), jnp.float32))
    )
    out = {}
    for coll in ("params", "batch_stats"):
        for path, leaf in flatten_dict(dict(shapes[coll])).items():
            out[(coll,) + tuple(path)] = tuple(leaf.shape)
    return out


def _pool_geometry(config) -> tuple[int, int]:
    return config.fpn_channels, config.box_pooler_resolution


def detector_variables_from_state_dict(sd: dict, config, source: str = "<state_dict>") -> dict:
    """{"params", "batch_stats"} float32 NumPy trees for CascadeMaskRCNN(config).

    Raises CheckpointError listing every missing, unexpected and mismatched tensor.
    """
    from flax.traverse_util import unflatten_dict

    template = _template(config)
    pool = _pool_geometry(config)
    flat, missing, mismatched = {}, [], []
    used = set()
    bn_counters = set()
    for key, want in template.items():
        name = d2_name(key[0], key[1:])
        if key[0] == "batch_stats" and name.endswith(".running_mean"):
            bn_counters.add(name[: -len("running_mean")] + "num_batches_tracked")
        if name not in sd:
            missing.append(f"{name} {want}")
            continue
        used.add(name)
        arr = _to_flax(name, sd[name], want, pool)
        if tuple(arr.shape) != want:
            mismatched.append(f"{name}: checkpoint {tuple(np.shape(sd[name]))}, model wants "
                              f"{_d2_shape(name, want, pool)}")
            continue
        flat[key] = arr
    unexpected = sorted(
        f"{k} {tuple(np.shape(v))}" for k, v in sd.items() if k not in used and k not in bn_counters
    )
    if missing or unexpected or mismatched:
        lines = [f"{source}: the checkpoint does not match the detector"]
        for what, items in (("missing", missing), ("unexpected", unexpected),
                            ("shape mismatch", mismatched)):
            if items:
                lines.append(f"  {what} ({len(items)}): " + "; ".join(items[:30])
                             + (" ..." if len(items) > 30 else ""))
        raise CheckpointError("\n".join(lines))
    tree = unflatten_dict(flat)
    return {"params": tree["params"], "batch_stats": tree["batch_stats"]}


def _d2_shape(name, flax_shape, pool):
    return tuple(_from_flax(name, np.zeros(flax_shape, np.float32), pool).shape)


def state_dict_from_detector_variables(variables: dict, config) -> collections.OrderedDict:
    """Our variables -> detectron2's state dict (float32; BN counters int64 0), in the key
    order detectron2's modules register them."""
    from flax.traverse_util import flatten_dict

    pool = _pool_geometry(config)
    out = {}
    for coll in ("params", "batch_stats"):
        for path, value in flatten_dict(dict(_as_dict(variables[coll]))).items():
            name = d2_name(coll, tuple(path))
            out[name] = _from_flax(name, np.asarray(value), pool)
            if coll == "batch_stats" and name.endswith(".running_mean"):
                counter = name[: -len("running_mean")] + "num_batches_tracked"
                out[counter] = np.zeros((), np.int64)
    return collections.OrderedDict(sorted(out.items(), key=lambda kv: _d2_order(kv[0])))


def _as_dict(tree):
    return {k: _as_dict(v) for k, v in tree.items()} if hasattr(tree, "items") else tree


_SUFFIX_ORDER = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


def _d2_order(name: str):
    """Sort key reproducing detectron2's registration order (numbers numerically)."""
    top = ("backbone.fpn_", "backbone.bottom_up.", "proposal_generator.", "roi_heads.box_head.",
           "roi_heads.box_predictor.", "roi_heads.mask_head.")
    group = next((i for i, p in enumerate(top) if name.startswith(p)), len(top))
    parts = name.split(".")
    leaf = _SUFFIX_ORDER.index(parts[-1]) if parts[-1] in _SUFFIX_ORDER else 9
    key = []
    for p in parts[:-1]:
        if p.isdigit():
            key.append((0, int(p), ""))
        else:
            # detectron2 registers a block's shortcut before conv1..3, the RPN conv before its
            # two outputs, cls_score < bbox_pred < level_predictor, the deconv after mask_fcn*.
            rank = {"stem": 0, "shortcut": 0, "conv1": 1, "conv2": 2, "conv3": 3, "norm": 5,
                    "conv": 0, "objectness_logits": 1, "anchor_deltas": 2,
                    "cls_score": 0, "bbox_pred": 1, "level_predictor": 2, "deconv": 8,
                    "predictor": 9}.get(p, 6)
            key.append((1, rank, p))
    if parts[0] == "backbone" and parts[1].startswith("fpn_"):
        m = re.fullmatch(r"fpn_(lateral|output)(\d)", parts[1])
        key = [(0, int(m.group(2)), m.group(1))] + key[2:]
    return (group, key, leaf)


# ----------------------------------------------------------------------------------------------
# Files.


def _read_pth(path: str, which: str):
    tree = read_checkpoint(path)
    return select_model_state_dict(tree, path, which)


def export_detector(directory, variables: dict, config, source: str = "") -> None:
    """Writes our exported-model format: `params.msgpack` ({"params", "batch_stats"}) and
    `arch.json` (family 'detector', the DetectorConfig)."""
    arch = _config_to_json(config)
    tree = {"params": _as_dict(variables["params"]),
            "batch_stats": _as_dict(variables["batch_stats"])}
    save_converted(directory, tree, arch, family=FAMILY, source=source)


def _config_to_json(config) -> dict:
    d = dataclasses.asdict(config)
    return d


def _config_from_json(arch: dict, source: str):
    from hassod_jax.models import detector
    from hassod_jax.models.resnet import ResNetConfig

    def tup(v):
        return tuple(tup(x) for x in v) if isinstance(v, list) else v

    try:
        fields = {k: tup(v) for k, v in arch.items() if k != "resnet"}
        resnet = ResNetConfig(**{k: tup(v) for k, v in arch["resnet"].items()})
        return detector.DetectorConfig(resnet=resnet, **fields)
    except (KeyError, TypeError) as e:
        raise CheckpointError(f"{source}: arch.json is not a detector description ({e})") from None


def _orbax_step_dir(path: str) -> str | None:
    """The orbax step directory `path` names: a workdir (newest step of W/checkpoints), a
    checkpoints directory, or a step directory itself."""
    for cand in (os.path.join(path, "checkpoints"), path):
        if os.path.isdir(cand):
            steps = [d for d in os.listdir(cand) if d.isdigit()
                     and os.path.isdir(os.path.join(cand, d, "state"))]
            if steps:
                return os.path.join(cand, max(steps, key=int))
    if os.path.isdir(os.path.join(path, "state")):
        return path
    return None


def _read_orbax(step_dir: str, which: str = "student") -> dict:
    """The detector variables of one step of our training checkpoints (a Mean Teacher run's
    student, or with `which="teacher"` its EMA teacher).

    The step is read as a whole, as `train/checkpoint.py` writes it (a composite of the 'state'
    item, the train state, and the 'data' item, the iterator's JSON), so orbax finds its
    `_CHECKPOINT_METADATA` in the step directory; reading the 'state' item's folder alone made
    it warn, on every load, that the file does not exist there."""
    import orbax.checkpoint as ocp

    import jax

    path = os.path.abspath(step_dir)
    try:
        with ocp.Checkpointer(_orbax_handler()) as ckptr:
            # Restored onto this process's first device whatever mesh saved it: a run trained
            # on 8 devices is read for prediction on 1 (orbax refuses a restore without a target
            # when the device topology differs from the saving one).
            meta = ckptr.metadata(path).item_metadata["state"]
            device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
            target = jax.tree_util.tree_map(
                lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device)
                if hasattr(m, "shape") else m,
                getattr(meta, "tree", meta),
            )
            restored = ckptr.restore(
                path, args=ocp.args.Composite(state=ocp.args.StandardRestore(target))
            )
            state = restored["state"]
    except Exception as e:  # noqa: BLE001 - orbax raises many types for a broken directory
        raise CheckpointError(f"{step_dir}: cannot read the orbax checkpoint ({e})") from None
    if not isinstance(state, dict) or "params" not in state:
        raise CheckpointError(f"{step_dir}: the checkpoint holds no 'params'")
    if which == "teacher":
        if "teacher_params" not in state:
            raise CheckpointError(
                f"{step_dir}: holds no teacher (not a Mean Teacher run); load it without "
                "which='teacher'"
            )
        return {"params": state["teacher_params"],
                "batch_stats": state.get("teacher_batch_stats", {})}
    return {"params": state["params"], "batch_stats": state.get("batch_stats", {})}


def _orbax_handler():
    """A handler for every item `train/checkpoint.py` writes (the train state, the iterator's
    JSON, the model config), so that reading some of them does not make orbax warn that the
    others 'could not be restored'."""
    import orbax.checkpoint as ocp

    return ocp.CompositeCheckpointHandler(
        state=ocp.StandardCheckpointHandler(), data=ocp.JsonCheckpointHandler(),
        model=ocp.JsonCheckpointHandler(),
    )


def _read_orbax_model(step_dir: str) -> dict | None:
    """The `DetectorConfig` (as JSON) a step of our training checkpoints stores in its `model`
    item; None for a step written before the item existed."""
    import orbax.checkpoint as ocp

    if not os.path.isdir(os.path.join(step_dir, "model")):
        return None
    try:
        with ocp.Checkpointer(_orbax_handler()) as ckptr:
            restored = ckptr.restore(
                os.path.abspath(step_dir), args=ocp.args.Composite(model=ocp.args.JsonRestore())
            )
    except Exception as e:  # noqa: BLE001 - orbax raises many types for a broken directory
        raise CheckpointError(f"{step_dir}: cannot read the stored model config ({e})") from None
    return restored["model"]


def load_detector(
    path, *, which: str = "student", dtype: Any = None, saved_config: bool = True, **overrides
):
    """Loads a detector: `(CascadeMaskRCNN module, {"params", "batch_stats"})`.

    Args:
      path: a detectron2/HASSOD `.pth` or `.pkl` (torch is not needed), a training workdir of
        ours (its newest checkpoint), one orbax step directory, or an exported model
        directory (`python -m hassod_jax.weights.convert --detector ...`).
      which: 'student' (default) or 'teacher', for Mean Teacher files holding both (a
        detectron2 teacher-student .pth, or one of our Mean Teacher workdirs or steps).
      dtype: compute dtype of the module (default float32; parameters stay float32).
      saved_config: for our training checkpoints, start from the DetectorConfig the run stored
        (every field, thresholds and proposal counts included); False, or a checkpoint older
        than that record, takes the widths from the tensors' shapes and the rest from
        `DetectorConfig`'s defaults, as for detectron2 files.
      overrides: DetectorConfig fields to change (e.g. detections_per_image); the widths
        always come from the checkpoint.
    Raises:
      CheckpointError (a ValueError) naming the file and, for a state dict that does not fit,
      every missing, unexpected and mismatched tensor.
    """
    import jax.numpy as jnp

    from hassod_jax.models import detector

    path = os.fspath(path)
    if not os.path.exists(path):
        raise CheckpointError(f"{path}: no such file or directory")
    if os.path.isdir(path):
        if is_converted_dir(path):
            arch, tree = load_converted(path, family=FAMILY)
            config = dataclasses.replace(_config_from_json(arch, path), **overrides)
            variables = {"params": tree["params"], "batch_stats": tree.get("batch_stats", {})}
            sd = state_dict_from_detector_variables(variables, config)
        else:
            step_dir = _orbax_step_dir(path)
            if step_dir is None:
                raise CheckpointError(
                    f"{path}: neither an exported detector (arch.json) nor a training workdir "
                    "or orbax step directory (no checkpoints/<step>/state)"
                )
            variables = _read_orbax(step_dir, which)
            stored = _read_orbax_model(step_dir) if saved_config else None
            if stored is not None:
                config = dataclasses.replace(_config_from_json(stored, step_dir), **overrides)
            else:
                # Widths from the shapes, through the detectron2 names (one inference for all).
                config = _config_from_variables(variables, step_dir, overrides)
            sd = state_dict_from_detector_variables(variables, config)
            path = step_dir
    else:
        sd = _read_pth(path, which)
        config = detector_config_from_state_dict(sd, path, **overrides)
    variables = detector_variables_from_state_dict(sd, config, source=path)
    module = detector.CascadeMaskRCNN(config, dtype=dtype or jnp.float32)
    return module, variables


def _config_from_variables(variables, source, overrides):
    from flax.traverse_util import flatten_dict

    from hassod_jax.models import detector

    # fc1's permutation needs (C, R); read them from the tree before naming anything.
    params = _as_dict(variables["params"])
    try:
        c = np.shape(params["fpn"]["fpn_lateral2"]["conv"]["kernel"])[-1]
        fc1_in = np.shape(params["box_heads_0"]["fc1"]["kernel"])[0]
    except KeyError as e:
        raise CheckpointError(f"{source}: not a detector checkpoint (no {e})") from None
    r = int(round(math.sqrt(fc1_in / c)))
    probe = dataclasses.replace(detector.DetectorConfig(), fpn_channels=c, box_pooler_resolution=r)
    sd = {}
    for coll in ("params", "batch_stats"):
        for p, v in flatten_dict(_as_dict(variables[coll])).items():
            name = d2_name(coll, tuple(p))
            sd[name] = _from_flax(name, np.asarray(v), _pool_geometry(probe))
    return detector_config_from_state_dict(sd, source, **overrides)
