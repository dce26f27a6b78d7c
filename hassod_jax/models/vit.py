"""DINO Vision Transformer (ViT-S/16, S/8, B/16, B/8) in flax.linen.

Architecture as in DINO's ``vision_transformer.py`` (Caron et al. 2021, public code of
facebookresearch/dino; docs/recipe.md, Stage 1, step 1): pre-norm blocks, LayerNorm eps 1e-6,
exact (erf) GELU, qkv bias, attention scale head_dim**-0.5, a CLS token and learned
position embeddings that are resized the DINO way for other image sizes.

Parameter names mirror DINO's state-dict names (``blocks_3/attn/qkv`` for
``blocks.3.attn.qkv``), so loading its weights is mechanical (`hassod_jax.weights.dino_vit`).

Images are NHWC float32, ImageNet-normalised; features are (B, h, w, D) with
h = H / patch, w = W / patch.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from hassod_jax import parallel

__all__ = [
    "FEATURE_KINDS",
    "OUTPUTS",
    "VIT_ARCHS",
    "VisionTransformer",
    "default_mesh",
    "dino_features",
    "interpolate_pos_embed",
    "make_feature_fn",
    "make_vit",
    "torch_bicubic_matrix",
]

FEATURE_KINDS = ("k", "q", "v", "kqv")
OUTPUTS = ("k", "q", "v", "kqv", "cls_attn", "tokens")
LN_EPS = 1e-6

# DINO's released backbones (pos_grid = 224 / patch: the pretraining grid).
VIT_ARCHS: dict[str, dict[str, int]] = {
    "vit_small_patch16": dict(patch_size=16, embed_dim=384, depth=12, num_heads=6, mlp_dim=1536,
                              pos_grid=14),
    "vit_small_patch8": dict(patch_size=8, embed_dim=384, depth=12, num_heads=6, mlp_dim=1536,
                             pos_grid=28),
    "vit_base_patch16": dict(patch_size=16, embed_dim=768, depth=12, num_heads=12, mlp_dim=3072,
                             pos_grid=14),
    "vit_base_patch8": dict(patch_size=8, embed_dim=768, depth=12, num_heads=12, mlp_dim=3072,
                            pos_grid=28),
}  # fmt: skip


# ----------------------------------------------------------------- position embeddings
def _cubic_coeffs(t: np.ndarray) -> np.ndarray:
    """PyTorch's ``get_cubic_upsample_coefficients`` (Keys kernel, A = -0.75), float32."""
    a = np.float32(-0.75)
    one, two = np.float32(1), np.float32(2)

    def conv1(x):  # |x| <= 1
        return ((a + two) * x - (a + np.float32(3))) * x * x + one

    def conv2(x):  # 1 < |x| < 2
        return ((a * x - np.float32(5) * a) * x + np.float32(8) * a) * x - np.float32(4) * a

    return np.stack([conv2(t + one), conv1(t), conv1(one - t), conv2(two - t)], axis=-1)


def torch_bicubic_matrix(in_size: int, scale_factor: float) -> np.ndarray:
    """(out_size, in_size) float32 matrix M with ``out = M @ in`` along one axis.

    Reproduces ``torch.nn.functional.interpolate(mode='bicubic', align_corners=False,
    scale_factor=s)`` with ``recompute_scale_factor`` unset: out_size = floor(in * s) and
    the source position of output i is (i + 0.5) / s - 0.5, computed in float32 as
    PyTorch's CPU kernel does (``area_pixel_compute_source_index``,
    ``guard_index_and_lambda``); taps beyond the border are clamped to it.
    """
    out_size = int(math.floor(float(in_size) * scale_factor))
    rscale = np.float32(1.0 / scale_factor)
    dst = np.arange(out_size, dtype=np.float32)
    src = rscale * (dst + np.float32(0.5)) - np.float32(0.5)
    idx = np.minimum(np.floor(src).astype(np.int64), in_size - 1)
    t = np.clip(src - idx.astype(np.float32), np.float32(0), np.float32(1))
    coeffs = _cubic_coeffs(t)  # (out, 4)
    m = np.zeros((out_size, in_size), np.float32)
    rows = np.arange(out_size)
    for j in range(4):
        np.add.at(m, (rows, np.clip(idx - 1 + j, 0, in_size - 1)), coeffs[:, j])
    return m


def interpolate_pos_embed(pos_embed: jax.Array, h: int, w: int) -> jax.Array:
    """Resizes DINO position embeddings to an (h, w) patch grid.

    Args:
      pos_embed: (1, 1 + N*N, D) float32, CLS first, then the N x N grid row-major.
      h, w: static patch-grid size of the image.
    Returns:
      (1, 1 + h*w, D) float32. As DINO's ``interpolate_pos_encoding``: unchanged when
      (h, w) == (N, N); otherwise bicubic (A = -0.75) with scale factors (h + 0.1)/N and
      (w + 0.1)/N, the sampling positions following those factors.
    """
    n_tok, dim = pos_embed.shape[1] - 1, pos_embed.shape[2]
    n = math.isqrt(n_tok)
    if h == n and w == n:
        return pos_embed
    mh = torch_bicubic_matrix(n, (h + 0.1) / n)
    mw = torch_bicubic_matrix(n, (w + 0.1) / n)
    if mh.shape[0] != h or mw.shape[0] != w:  # DINO asserts the same
        raise ValueError(f"position-embedding resize gave {mh.shape[0]}x{mw.shape[0]}, not {h}x{w}")
    grid = pos_embed[0, 1:].astype(jnp.float32).reshape(n, n, dim)
    out = jnp.einsum("hi,ijd,wj->hwd", mh, grid, mw, precision=jax.lax.Precision.HIGHEST).reshape(
        1, h * w, dim
    )
    return jnp.concatenate([pos_embed[:, :1].astype(jnp.float32), out], axis=1)


# ------------------------------------------------------------------------------ modules
def _precision(dtype):
    # float32 means float32 (no TF32 on GPUs); bfloat16 runs at the MXU/tensor-core default.
    return jax.lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else None


class Mlp(nn.Module):
    hidden_dim: int
    out_dim: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        prec = _precision(self.dtype)
        x = nn.Dense(self.hidden_dim, dtype=self.dtype, precision=prec, name="fc1")(x)
        x = nn.gelu(x, approximate=False)
        return nn.Dense(self.out_dim, dtype=self.dtype, precision=prec, name="fc2")(x)


# Bytes of attention logits one query chunk may hold (`_chunked_attention`).
_LOGITS_BUDGET = 256 * 2**20


def _chunked_attention(q, k, v, scale):
    """Exact softmax attention, (B, N, H, hd) -> (B, N, H, hd), over chunks of queries.

    Each query row's softmax sees every key, so this is the plain attention; only the
    (B, H, chunk, N) logits of one chunk exist at a time (a sequential map over chunks), not
    the whole (B, H, N, N) matrix (12 x 3601^2 float32 per ViT-B/8 image at 480 px, 0.6 GB).
    The chunk is the largest power of two (at least 128) whose logits fit `_LOGITS_BUDGET`.
    """
    b, n, h, _ = q.shape
    row_bytes = b * h * k.shape[1] * 4
    chunk = max(128, 1 << int(max(_LOGITS_BUDGET // max(row_bytes, 1), 1)).bit_length() - 1)
    if chunk >= n:
        return jax.nn.dot_product_attention(q, k, v, scale=scale, implementation="xla")
    steps = -(-n // chunk)
    qp = jnp.pad(q, ((0, 0), (0, steps * chunk - n), (0, 0), (0, 0)))
    qp = jnp.moveaxis(qp.reshape(b, steps, chunk, *q.shape[2:]), 1, 0)
    out = jax.lax.map(
        lambda qc: jax.nn.dot_product_attention(qc, k, v, scale=scale, implementation="xla"), qp
    )
    return jnp.moveaxis(out, 0, 1).reshape(b, steps * chunk, *q.shape[2:])[:, :n]


def _attention(q, k, v, scale, dtype, impl):
    """Softmax attention (B, N, H, hd) -> (B, N, H, hd).

    impl 'auto' uses cuDNN's fused flash attention for bfloat16/float16 on GPUs and the
    query-chunked form (`_chunked_attention`) otherwise; 'chunked', 'xla' (the unfused form,
    which writes all (B, H, N, N) logits to memory) and 'cudnn' force one.
    """
    if jnp.dtype(dtype) == jnp.float32:
        # float32 means float32 (no TF32 on GPUs), as in the PyTorch original.
        with jax.default_matmul_precision("highest"):
            if impl == "xla":
                return jax.nn.dot_product_attention(q, k, v, scale=scale, implementation="xla")
            return _chunked_attention(q, k, v, scale)
    if impl == "auto" and jax.default_backend() == "gpu":
        try:  # cuDNN's support checks run at trace time and raise for unsupported shapes
            return jax.nn.dot_product_attention(q, k, v, scale=scale, implementation="cudnn")
        except (NotImplementedError, ValueError, RuntimeError):
            impl = "chunked"
    if impl in ("auto", "chunked"):
        return _chunked_attention(q, k, v, scale)
    return jax.nn.dot_product_attention(q, k, v, scale=scale, implementation=impl)


class Attention(nn.Module):
    dim: int
    num_heads: int
    dtype: Any = jnp.float32
    attention: str = "auto"

    def setup(self):
        prec = _precision(self.dtype)
        self.qkv = nn.Dense(3 * self.dim, dtype=self.dtype, precision=prec)
        self.proj = nn.Dense(self.dim, dtype=self.dtype, precision=prec)

    def attend(self, qkv):
        """qkv: (B, N, 3D) -> attention output projected, (B, N, D)."""
        b, n, _ = qkv.shape
        hd = self.dim // self.num_heads
        q, k, v = jnp.split(qkv.reshape(b, n, 3, self.num_heads, hd), 3, axis=2)
        q, k, v = (t[:, :, 0] for t in (q, k, v))  # (B, N, H, hd)
        o = _attention(q, k, v, hd**-0.5, self.dtype, self.attention)
        return self.proj(o.reshape(b, n, self.dim))

    def __call__(self, x):
        return self.attend(self.qkv(x))


class Block(nn.Module):
    dim: int
    num_heads: int
    mlp_dim: int
    dtype: Any = jnp.float32
    attention: str = "auto"

    def setup(self):
        self.norm1 = nn.LayerNorm(epsilon=LN_EPS, dtype=self.dtype)
        self.attn = Attention(self.dim, self.num_heads, dtype=self.dtype, attention=self.attention)
        self.norm2 = nn.LayerNorm(epsilon=LN_EPS, dtype=self.dtype)
        self.mlp = Mlp(self.mlp_dim, self.dim, dtype=self.dtype)

    def qkv(self, x):
        """(B, N, D) block input -> (B, N, 3D) = LN1(x) @ W_qkv.T + b_qkv (q, k, v order)."""
        return self.attn.qkv(self.norm1(x))

    def finish(self, x, qkv):
        """Rest of the block given its input x (float32) and qkv = self.qkv(x)."""
        x = x + self.attn.attend(qkv).astype(jnp.float32)
        return x + self.mlp(self.norm2(x)).astype(jnp.float32)

    def __call__(self, x):
        return self.finish(x, self.qkv(x))


class PatchEmbed(nn.Module):
    patch_size: int
    dim: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, images):
        p = self.patch_size
        return nn.Conv(
            self.dim, (p, p), strides=(p, p), padding="VALID", dtype=self.dtype,
            precision=_precision(self.dtype), name="proj",
        )(images)  # fmt: skip


class VisionTransformer(nn.Module):
    """DINO ViT backbone.

    Attributes:
      patch_size, embed_dim, depth, num_heads, mlp_dim: the architecture.
      pos_grid: N, side of the pretraining patch grid (pos_embed is (1, 1 + N*N, D)).
      dtype: compute dtype of matmuls/attention (float32 or bfloat16); parameters and the
        residual stream stay float32.
      attention: 'auto' (cuDNN flash attention for bfloat16 on GPUs, else the query-chunked
        exact form that never holds the whole N x N matrix), 'chunked', 'xla' (unfused) or
        'cudnn'.
    """

    patch_size: int = 16
    embed_dim: int = 384
    depth: int = 12
    num_heads: int = 6
    mlp_dim: int = 1536
    pos_grid: int = 14
    dtype: Any = jnp.float32
    attention: str = "auto"

    def setup(self):
        d = self.embed_dim
        if d % self.num_heads:
            raise ValueError(f"embed_dim {d} is not divisible by num_heads {self.num_heads}")
        if self.attention not in ("auto", "chunked", "xla", "cudnn"):
            raise ValueError(
                f"attention {self.attention!r} must be 'auto', 'chunked', 'xla' or 'cudnn'")
        init = nn.initializers.truncated_normal(0.02)
        self.cls_token = self.param("cls_token", init, (1, 1, d))
        self.pos_embed = self.param("pos_embed", init, (1, 1 + self.pos_grid**2, d))
        self.patch_embed = PatchEmbed(self.patch_size, d, dtype=self.dtype)
        self.blocks = [
            Block(d, self.num_heads, self.mlp_dim, dtype=self.dtype, attention=self.attention)
            for _ in range(self.depth)
        ]
        self.norm = nn.LayerNorm(epsilon=LN_EPS, dtype=self.dtype)

    def __call__(self, images, outputs: Sequence[str] = OUTPUTS):
        """Runs the backbone.

        Args:
          images: (B, H, W, 3) float32, ImageNet-normalised; H, W multiples of patch_size.
          outputs: which of OUTPUTS to compute; only what they need is computed (e.g.
            ``('k',)`` stops after the last block's qkv projection).
        Returns:
          dict, all float32, (h, w) = (H, W) / patch_size:
            'k', 'q', 'v': (B, h, w, D) last block's keys/queries/values, CLS dropped
              (k = LN1(x) @ W_qkv[D:2D].T + b_qkv[D:2D], x the last block's input);
            'kqv': (B, h, w, 3D) concatenation k, q, v;
            'cls_attn': (B, heads, h, w) last-layer attention of CLS to the patches
              (softmax over all 1 + h*w tokens, then the CLS column dropped);
            'tokens': (B, 1 + h*w, D) final LayerNorm-ed tokens (CLS first).
        """
        outputs = tuple(outputs)
        bad = [o for o in outputs if o not in OUTPUTS]
        if bad or not outputs:
            raise ValueError(f"outputs {outputs!r}: each must be one of {OUTPUTS}")
        if images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"images must be (B, H, W, 3), got shape {images.shape}")
        b, hh, ww, _ = images.shape
        p = self.patch_size
        if hh % p or ww % p:
            raise ValueError(f"image size {hh}x{ww} is not a multiple of the patch size {p}")
        h, w, d = hh // p, ww // p, self.embed_dim

        x = self.patch_embed(images.astype(self.dtype)).astype(jnp.float32).reshape(b, h * w, d)
        cls = jnp.broadcast_to(self.cls_token.astype(jnp.float32), (b, 1, d))
        x = jnp.concatenate([cls, x], axis=1) + interpolate_pos_embed(self.pos_embed, h, w)
        for blk in self.blocks[:-1]:
            x = blk(x)
        last = self.blocks[-1]
        qkv = last.qkv(x)  # (B, 1 + h*w, 3D), compute dtype
        out = {}
        q_, k_, v_ = (qkv[:, 1:, i * d : (i + 1) * d] for i in range(3))
        grid = lambda t: t.astype(jnp.float32).reshape(b, h, w, -1)  # noqa: E731
        for name, t in (("k", k_), ("q", q_), ("v", v_)):
            if name in outputs:
                out[name] = grid(t)
        if "kqv" in outputs:
            out["kqv"] = grid(jnp.concatenate([k_, q_, v_], axis=-1))
        if "cls_attn" in outputs:
            heads, hd = self.num_heads, d // self.num_heads
            q_cls = qkv[:, 0, :d].astype(jnp.float32).reshape(b, heads, hd)
            keys = qkv[:, :, d : 2 * d].astype(jnp.float32).reshape(b, -1, heads, hd)
            logits = jnp.einsum(
                "bhc,bnhc->bhn", q_cls, keys, precision=jax.lax.Precision.HIGHEST
            ) * (hd**-0.5)
            attn = jax.nn.softmax(logits, axis=-1)
            out["cls_attn"] = attn[:, :, 1:].reshape(b, heads, h, w)
        if "tokens" in outputs:
            out["tokens"] = self.norm(last.finish(x, qkv)).astype(jnp.float32)
        return out


def make_vit(name: str, dtype=jnp.float32, **overrides) -> VisionTransformer:
    """A VisionTransformer from a VIT_ARCHS entry, with attribute overrides (e.g. depth=2)."""
    if name not in VIT_ARCHS:
        raise ValueError(f"unknown ViT {name!r}; known: {sorted(VIT_ARCHS)}")
    return VisionTransformer(**{**VIT_ARCHS[name], **overrides}, dtype=dtype)


# ------------------------------------------------------------------------ features
def default_mesh() -> Mesh:
    """A 1-D mesh ('batch',) over all local devices."""
    return parallel.local_mesh("batch")


@functools.lru_cache(maxsize=64)
def _jitted_apply(module: VisionTransformer, outputs: tuple, mesh: Mesh):
    repl = NamedSharding(mesh, P())
    data = NamedSharding(mesh, P(mesh.axis_names))

    def apply(params, images):
        return module.apply({"params": params}, images, outputs=outputs)

    return jax.jit(apply, in_shardings=(repl, data), out_shardings=data), repl, data


def make_feature_fn(module: VisionTransformer, params: dict, kind: str = "k", mesh=None):
    """Returns ``f(images) -> features`` jitted and batch-sharded over ``mesh``.

    images: (B, H, W, 3) float32 ImageNet-normalised (NumPy or jax). The batch is split
    over all devices of ``mesh`` (default: every local device); a batch that does not
    divide evenly is zero-padded and the padding dropped from the result.
    kind: one of FEATURE_KINDS -> (B, h, w, D or 3D) float32, or 'cls_attn' ->
    (B, heads, h, w), or 'tokens' -> (B, 1 + h*w, D).
    """
    if kind not in OUTPUTS:
        raise ValueError(f"kind {kind!r} must be one of {OUTPUTS}")
    mesh = default_mesh() if mesh is None else mesh
    fn, repl, _ = _jitted_apply(module, (kind,), mesh)
    placed = jax.device_put(params, repl)
    n_dev = mesh.size

    def features(images):
        if images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"images must be (B, H, W, 3), got shape {images.shape}")
        b = images.shape[0]
        pad = (-b) % n_dev
        if pad:
            xp = np if isinstance(images, np.ndarray) else jnp
            images = xp.concatenate([images, xp.zeros((pad,) + images.shape[1:], images.dtype)])
        out = fn(placed, images)[kind]
        return out[:b] if pad else out

    return features


def dino_features(module: VisionTransformer, params: dict, images, kind: str = "k"):
    """Last-block ``kind`` features of ``images`` (see VisionTransformer.__call__).

    Args:
      module, params: from `hassod_jax.weights.dino_vit.load_dino_vit`.
      images: (B, H, W, 3) float32, ImageNet-normalised, H and W multiples of the patch.
      kind: 'k' (HASSOD's clustering feature), 'q', 'v' or 'kqv'.
    Returns:
      (B, h, w, D) float32 ((B, h, w, 3D) for 'kqv'), sharded over the local devices.
    """
    if kind not in FEATURE_KINDS:
        raise ValueError(f"kind {kind!r} must be one of {FEATURE_KINDS}")
    return make_feature_fn(module, params, kind)(images)
