"""Cascade box heads, mask head and hierarchy-level head (docs/recipe.md, Stage 2).

Laid out like detectron2's `modeling/roi_heads/cascade_rcnn.py`, `box_head.py`,
`fast_rcnn.py` and `mask_head.py` (re-implemented with static shapes): per-stage IoU
thresholds and box-coder weights are config tuples, later stages take the previous
stage's detached boxes, each stage's gradient into the shared pooled features is scaled
by 1/num_stages.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from hassod_jax import ops
from hassod_jax.models.resnet import c2_msra_fill, c2_xavier_fill


@jax.custom_vjp
def scale_gradient(x, scale):
    """Identity forward; multiplies the incoming gradient by `scale` (detectron2
    `_ScaleGradient`)."""
    return x


def _sg_fwd(x, scale):
    return x, scale


def _sg_bwd(scale, g):
    return (g * scale, None)


scale_gradient.defvjp(_sg_fwd, _sg_bwd)


class BoxHead(nn.Module):
    """Flatten (K, S, S, C) -> FC 1024 + ReLU -> FC 1024 + ReLU, then the predictor:
    class logits (K, 2) [fg, bg], class-agnostic deltas (K, 4), level logits (K, L).
    Init as detectron2: FCs c2_xavier_fill, cls std 0.01, box std 0.001, biases 0."""

    fc_dim: int = 1024
    num_fc: int = 2
    num_levels: int = 3
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        x = x.reshape(x.shape[:-3] + (-1,))
        kw = dict(dtype=self.dtype, param_dtype=jnp.float32)
        for i in range(self.num_fc):
            x = nn.relu(
                nn.Dense(self.fc_dim, kernel_init=c2_xavier_fill, name=f"fc{i + 1}", **kw)(x)
            )
        cls = nn.Dense(2, kernel_init=nn.initializers.normal(0.01), name="cls_score", **kw)(x)
        box = nn.Dense(4, kernel_init=nn.initializers.normal(0.001), name="bbox_pred", **kw)(x)
        lvl = nn.Dense(
            self.num_levels, kernel_init=nn.initializers.normal(0.01), name="level_predictor", **kw
        )(x)
        f32 = jnp.float32
        return cls.astype(f32), box.astype(f32), lvl.astype(f32)


class Deconv2x2(nn.Module):
    """`torch.nn.ConvTranspose2d(C, features, kernel_size=2, stride=2)` on NHWC, as ONE
    matrix product.

    With kernel 2 and stride 2 the output blocks do not overlap: out[2i + a, 2j + b] =
    x[i, j] @ kernel[a, b] + bias. (XLA:CPU runs `lax.conv_transpose` as an input-dilated
    convolution through a naive loop: 103 s for the R50 mask head's 2 x 256 boxes at 14 x 14,
    against well under a second as a product. GPUs run transposed convolutions well
    through cuDNN; the product was not timed there.)
    Parameters `kernel` (2, 2, C, features) and `bias` (features,), as `nn.ConvTranspose`;
    kernel[a, b, c, o] is PyTorch's weight[c, o, a, b] (not flipped).
    """

    features: int
    kernel_init: Any = c2_msra_fill
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        c = x.shape[-1]
        kernel = self.param("kernel", self.kernel_init, (2, 2, c, self.features), self.param_dtype)
        bias = self.param("bias", nn.initializers.zeros, (self.features,), self.param_dtype)
        x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
        *lead, h, w, _ = x.shape
        y = jnp.einsum("...hwc,abco->...hawbo", x, kernel)
        return y.reshape(*lead, 2 * h, 2 * w, self.features) + bias


class MaskHead(nn.Module):
    """(K, 14, 14, C) -> 4 x (conv3x3 dim + ReLU) -> deconv 2x2/2 + ReLU -> 1x1 -> (K, 28, 28)
    class-agnostic logits (detectron2 MaskRCNNConvUpsampleHead; msra init, predictor
    std 0.001)."""

    dim: int = 256
    num_conv: int = 4
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        kw = dict(dtype=self.dtype, param_dtype=jnp.float32)
        for i in range(self.num_conv):
            x = nn.Conv(
                self.dim,
                (3, 3),
                padding=((1, 1), (1, 1)),
                kernel_init=c2_msra_fill,
                name=f"mask_fcn{i + 1}",
                **kw,
            )(x)
            x = nn.relu(x)
        x = Deconv2x2(self.dim, name="deconv", **kw)(x)
        x = nn.relu(x)
        x = nn.Conv(1, (1, 1), kernel_init=nn.initializers.normal(0.001), name="predictor", **kw)(x)
        return x[..., 0].astype(jnp.float32)


def label_and_sample_proposals(
    proposals,
    proposal_valid,
    gt_boxes,
    gt_valid,
    key,
    *,
    iou_threshold: float,
    num_samples: int,
    positive_fraction: float,
):
    """First-stage sampling of ONE image (detectron2 `label_and_sample_proposals`).

    Ground-truth boxes are appended to the proposals; proposals are matched (IoU
    >= `iou_threshold` -> fg, no low-quality matches) and `num_samples` are drawn at
    `positive_fraction` positives.

    Args:
      proposals: (P, 4) xyxy; proposal_valid: (P,) bool; gt_boxes (G, 4); gt_valid (G,).
    Returns:
      boxes (S, 4), matched gt index (S,) int32, is_fg (S,) bool, valid (S,) bool.
    """
    boxes = jnp.concatenate([proposals, gt_boxes], axis=0)
    valid = jnp.concatenate([proposal_valid, gt_valid], axis=0)
    boxes = jnp.where(valid[:, None], boxes, 0.0)
    iou = ops.box_iou(gt_boxes, boxes)
    matched, labels = ops.match(iou, gt_valid, [iou_threshold], [0, 1], False)
    labels = jnp.where(valid, labels, -1)  # padding never gets sampled
    idx, is_fg, svalid = ops.sample_fg_bg(key, labels, num_samples, positive_fraction)
    return boxes[idx], matched[idx], is_fg & svalid, svalid


def match_stage(boxes, valid, gt_boxes, gt_valid, iou_threshold: float):
    """Later-stage labelling of ONE image (detectron2 `_match_and_label_boxes`): no
    sampling. boxes (S, 4), valid (S,) -> matched (S,) int32, is_fg (S,) bool."""
    iou = ops.box_iou(gt_boxes, boxes)
    matched, labels = ops.match(iou, gt_valid, [iou_threshold], [0, 1], False)
    return matched, (labels == 1) & valid
