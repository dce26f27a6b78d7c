"""DINO ViT weights: official DINO checkpoints, DINO training checkpoints, timm-named files and
our converted directories -> the `VisionTransformer` param tree (`load_dino_vit`).

Parameter names mirror DINO's state-dict names so conversion is mechanical:
``blocks.3.attn.qkv.weight`` (3D, D) -> ``params['blocks_3']['attn']['qkv']['kernel']``
(D, 3D), ``patch_embed.proj.weight`` (D, 3, p, p) -> ``patch_embed/proj/kernel``
(p, p, 3, D), LayerNorm ``weight`` -> ``scale``.
"""

from __future__ import annotations

import math
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from hassod_jax.models.vit import VisionTransformer
from hassod_jax.weights.formats import is_converted_dir, load_converted
from hassod_jax.weights.torch_reader import flatten_tree, read_checkpoint

__all__ = [
    "backbone_state_dict",
    "expected_state_dict_shapes",
    "load_dino_vit",
    "params_from_state_dict",
    "vit_arch_from_state_dict",
]

_BLOCK_PARAMS = (  # (torch suffix, flax path, kind)
    ("norm1.weight", ("norm1", "scale"), "vec"),
    ("norm1.bias", ("norm1", "bias"), "vec"),
    ("attn.qkv.weight", ("attn", "qkv", "kernel"), "linear"),
    ("attn.qkv.bias", ("attn", "qkv", "bias"), "vec"),
    ("attn.proj.weight", ("attn", "proj", "kernel"), "linear"),
    ("attn.proj.bias", ("attn", "proj", "bias"), "vec"),
    ("norm2.weight", ("norm2", "scale"), "vec"),
    ("norm2.bias", ("norm2", "bias"), "vec"),
    ("mlp.fc1.weight", ("mlp", "fc1", "kernel"), "linear"),
    ("mlp.fc1.bias", ("mlp", "fc1", "bias"), "vec"),
    ("mlp.fc2.weight", ("mlp", "fc2", "kernel"), "linear"),
    ("mlp.fc2.bias", ("mlp", "fc2", "bias"), "vec"),
)
_TOP_PARAMS = (
    ("cls_token", ("cls_token",), "raw"),
    ("pos_embed", ("pos_embed",), "raw"),
    ("patch_embed.proj.weight", ("patch_embed", "proj", "kernel"), "conv"),
    ("patch_embed.proj.bias", ("patch_embed", "proj", "bias"), "vec"),
    ("norm.weight", ("norm", "scale"), "vec"),
    ("norm.bias", ("norm", "bias"), "vec"),
)
# Entries of a DINO training checkpoint / wrapper dicts that hold the backbone, in order
# of preference (the teacher is the model DINO evaluates and releases).
_WRAPPER_KEYS = ("teacher", "student", "model", "state_dict", "model_state", "params")
_STRIP_PREFIXES = ("module.", "backbone.", "_orig_mod.")
_IGNORED_PREFIXES = ("head.",)  # DINO projection head / classifier: not part of the backbone


def expected_state_dict_shapes(arch: dict) -> dict[str, tuple]:
    """DINO state-dict name -> shape for an architecture dict (as vit_arch_from_state_dict)."""
    d, m, p, n = arch["embed_dim"], arch["mlp_dim"], arch["patch_size"], arch["pos_grid"]
    shapes = {
        "cls_token": (1, 1, d),
        "pos_embed": (1, 1 + n * n, d),
        "patch_embed.proj.weight": (d, 3, p, p),
        "patch_embed.proj.bias": (d,),
        "norm.weight": (d,),
        "norm.bias": (d,),
    }
    blk = {
        "norm1.weight": (d,), "norm1.bias": (d,),
        "attn.qkv.weight": (3 * d, d), "attn.qkv.bias": (3 * d,),
        "attn.proj.weight": (d, d), "attn.proj.bias": (d,),
        "norm2.weight": (d,), "norm2.bias": (d,),
        "mlp.fc1.weight": (m, d), "mlp.fc1.bias": (m,),
        "mlp.fc2.weight": (d, m), "mlp.fc2.bias": (d,),
    }  # fmt: skip
    for i in range(arch["depth"]):
        for k, s in blk.items():
            shapes[f"blocks.{i}.{k}"] = s
    return shapes


def _strip(name: str) -> str:
    changed = True
    while changed:
        changed = False
        for pre in _STRIP_PREFIXES:
            if name.startswith(pre):
                name, changed = name[len(pre) :], True
    return name


def backbone_state_dict(tree: Any, source: str) -> dict[str, np.ndarray]:
    """Finds the backbone tensors in a loaded checkpoint tree; strips wrapper prefixes."""
    if isinstance(tree, dict) and not any(isinstance(v, np.ndarray) for v in tree.values()):
        for key in _WRAPPER_KEYS:
            if isinstance(tree.get(key), dict):
                tree = tree[key]
                break
    flat = flatten_tree(tree) if isinstance(tree, dict) else {}
    if not flat:
        raise ValueError(f"{source}: not a ViT checkpoint: it holds no tensors")
    out: dict[str, np.ndarray] = {}
    for name, arr in flat.items():
        short = _strip(name)
        if short.startswith(_IGNORED_PREFIXES):
            continue
        if short in out:
            raise ValueError(f"{source}: key {short!r} appears twice after stripping prefixes")
        out[short] = arr
    return out


def _describe(keys, sd) -> str:
    return ", ".join(f"{k} {tuple(sd[k].shape)}" if k in sd else k for k in sorted(keys))


def vit_arch_from_state_dict(
    sd: dict[str, np.ndarray], num_heads: int | None = None, source: str = "<state dict>"
) -> dict[str, int]:
    """Infers {patch_size, embed_dim, depth, num_heads, mlp_dim, pos_grid} from shapes.

    num_heads is not recorded in a checkpoint: by default embed_dim / 64 (DINO's 384 -> 6,
    768 -> 12); pass ``num_heads`` to override. Raises ValueError naming ``source``.
    """
    core = ("cls_token", "pos_embed", "patch_embed.proj.weight")
    missing = [k for k in core if k not in sd]
    if missing:
        sample = ", ".join(sorted(sd)[:8])
        raise ValueError(
            f"{source}: not a ViT checkpoint: missing {missing} (first keys: {sample})"
        )
    w = sd["patch_embed.proj.weight"]
    pos = sd["pos_embed"]
    if w.ndim != 4 or w.shape[1] != 3 or w.shape[2] != w.shape[3]:
        raise ValueError(f"{source}: patch_embed.proj.weight {tuple(w.shape)} is not (D, 3, p, p)")
    d, p = int(w.shape[0]), int(w.shape[2])
    if pos.ndim != 3 or pos.shape[0] != 1 or pos.shape[2] != d:
        raise ValueError(f"{source}: pos_embed {tuple(pos.shape)} is not (1, 1 + N*N, {d})")
    n = math.isqrt(pos.shape[1] - 1)
    if n * n != pos.shape[1] - 1:
        raise ValueError(
            f"{source}: pos_embed {tuple(pos.shape)} does not hold a square patch grid plus CLS"
        )
    blocks = {int(k.split(".")[1]) for k in sd if k.startswith("blocks.") and
              k.split(".")[1].isdigit()}  # fmt: skip
    if not blocks:
        raise ValueError(f"{source}: not a ViT checkpoint: no 'blocks.<i>.*' keys")
    fc1 = sd.get("blocks.0.mlp.fc1.weight")
    mlp_dim = int(fc1.shape[0]) if fc1 is not None and fc1.ndim == 2 else 4 * d
    if num_heads is None:
        if d % 64:
            raise ValueError(
                f"{source}: cannot infer the number of heads for embed_dim {d}; pass num_heads"
            )
        num_heads = d // 64
    if num_heads <= 0 or d % num_heads:
        raise ValueError(f"{source}: num_heads {num_heads} does not divide embed_dim {d}")
    return dict(patch_size=p, embed_dim=d, depth=max(blocks) + 1, num_heads=int(num_heads),
                mlp_dim=mlp_dim, pos_grid=n)  # fmt: skip


def params_from_state_dict(
    sd: dict[str, np.ndarray], arch: dict, source: str = "<state dict>"
) -> dict:
    """Maps DINO/timm names to the VisionTransformer param tree (float32 NumPy arrays).

    Raises ValueError naming ``source`` and listing missing, unexpected and mismatched
    keys with their shapes.
    """
    expected = expected_state_dict_shapes(arch)
    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected]
    mismatched = [k for k in expected if k in sd and tuple(sd[k].shape) != expected[k]]
    if missing or unexpected or mismatched:
        parts = []
        if missing:
            parts.append("missing: " + _describe(missing, {}))
        if unexpected:
            parts.append("unexpected: " + _describe(unexpected, sd))
        if mismatched:
            parts.append(
                "mismatched: "
                + ", ".join(
                    f"{k} {tuple(sd[k].shape)} (expected {expected[k]})" for k in mismatched
                )
            )
        raise ValueError(f"{source}: not a matching ViT checkpoint; " + "; ".join(parts))

    def convert(arr, kind):
        a = np.asarray(arr).astype(np.float32)
        if kind == "linear":  # torch (out, in) -> flax (in, out)
            return a.T
        if kind == "conv":  # torch (O, I, kh, kw) -> flax (kh, kw, I, O)
            return a.transpose(2, 3, 1, 0)
        return a

    params: dict = {}

    def put(path, value):
        node = params
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = np.ascontiguousarray(value)

    for name, path, kind in _TOP_PARAMS:
        put(path, convert(sd[name], kind))
    for i in range(arch["depth"]):
        for suffix, path, kind in _BLOCK_PARAMS:
            put((f"blocks_{i}",) + path, convert(sd[f"blocks.{i}.{suffix}"], kind))
    return params


def _check_param_tree(params: dict, module: VisionTransformer, source: str) -> None:
    side = module.pos_grid * module.patch_size
    ref = jax.eval_shape(
        lambda: module.init(jax.random.key(0), jnp.zeros((1, side, side, 3)), outputs=("tokens",))
    )["params"]
    want = {"/".join(str(k.key) for k in path): tuple(v.shape)
            for path, v in jax.tree_util.tree_leaves_with_path(ref)}  # fmt: skip
    got = {"/".join(str(k.key) for k in path): tuple(np.shape(v))
           for path, v in jax.tree_util.tree_leaves_with_path(params)}  # fmt: skip
    missing = sorted(set(want) - set(got))
    unexpected = sorted(set(got) - set(want))
    mismatched = sorted(k for k in set(want) & set(got) if want[k] != got[k])
    if missing or unexpected or mismatched:
        raise ValueError(
            f"{source}: converted parameters do not match the architecture; missing "
            f"{missing}, unexpected {unexpected}, mismatched "
            f"{[(k, got[k], want[k]) for k in mismatched]}"
        )


def load_dino_vit(
    path, dtype=jnp.float32, num_heads: int | None = None, *, attention: str = "auto"
) -> tuple[VisionTransformer, dict]:
    """Loads a DINO ViT from a checkpoint file or a converted directory.

    Accepts: official DINO backbone checkpoints (``dino_vitbase8_pretrain.pth`` ...), a
    full DINO training checkpoint (its 'teacher', else 'student', entry; ``module.`` /
    ``backbone.`` prefixes stripped, ``head.*`` ignored), timm-named files (``.pth`` or
    ``.safetensors``), legacy-format ``.pth``, and directories written by
    ``python -m hassod_jax.weights.convert``. Architecture is inferred from the shapes
    (num_heads = embed_dim / 64 unless given).

    ``attention`` picks the attention kernel (see VisionTransformer).

    Returns:
      (module, params): a VisionTransformer with compute ``dtype`` and its float32 param
      tree (jax arrays), for ``module.apply({'params': params}, images)``.
    Raises:
      ValueError naming the file: unreadable, not a ViT, missing / unexpected /
      mismatched keys (listed with shapes).
    """
    source = os.fspath(path)
    if is_converted_dir(source):
        arch, params = load_converted(source, family="vit")
        if num_heads is not None:
            arch = {**arch, "num_heads": int(num_heads)}
        try:
            module = VisionTransformer(**arch, dtype=dtype, attention=attention)
        except TypeError as e:
            raise ValueError(f"{source}: bad architecture description {arch!r} ({e})") from None
        _check_param_tree(params, module, source)
    else:
        sd = backbone_state_dict(read_checkpoint(source), source)
        arch = vit_arch_from_state_dict(sd, num_heads=num_heads, source=source)
        params = params_from_state_dict(sd, arch, source=source)
        module = VisionTransformer(**arch, dtype=dtype, attention=attention)
    params = jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float32), params)
    return module, params
