"""Class-agnostic Cascade Mask R-CNN with a hierarchy-level head (docs/recipe.md, Stage 2).

One flax.linen module, `CascadeMaskRCNN`, with static shapes throughout so one `jax.jit`
runs it on CPU, GPU or TPU, sharded over the batch axis of a `Mesh`:

- training (`train=True`, targets given) returns a dict of scalar float32 losses
  `rpn/cls, rpn/box, stage{k}/cls, stage{k}/box, stage{k}/level (k = 0, 1, 2, detectron2's
  stage numbering), mask`, each normalised as detectron2 does (see
  `hassod_jax.train.losses`); apply with `mutable=["batch_stats"]`;
- inference returns fixed-size detections per image (see `CascadeMaskRCNN.__call__`).

Randomness (the RPN and ROI samplers) comes from the explicit `rng` key, split per image,
so the result does not depend on how the batch is sharded.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from hassod_jax import ops
from hassod_jax.data.loader import PIXEL_MEAN, PIXEL_STD  # RGB, 0-255 scale
from hassod_jax.models.fpn import FPN, FPN_STRIDES
from hassod_jax.models.resnet import RESNET50, RESNET_SMALL, ResNet, ResNetConfig
from hassod_jax.models.roi_heads import (
    BoxHead,
    MaskHead,
    label_and_sample_proposals,
    match_stage,
    scale_gradient,
)
from hassod_jax.models.rpn import RPNHead, find_top_proposals, rpn_targets
from hassod_jax.train import losses as L


def normalize_images(images):
    """(B, H, W, 3) RGB in [0, 255] (uint8 or float) -> float32 (x - mean) / std."""
    x = jnp.asarray(images, jnp.float32)
    if x.shape[-1] != 3:
        raise ValueError(f"normalize_images: expected (..., 3) RGB, got {x.shape}")
    return (x - jnp.asarray(PIXEL_MEAN)) / jnp.asarray(PIXEL_STD)


@dataclasses.dataclass(frozen=True)
class DetectorConfig:
    """Static configuration; the defaults are the original HASSOD detector's (ResNet-50-FPN)."""

    resnet: ResNetConfig = RESNET50
    fpn_channels: int = 256
    fpn_norm: bool = True
    # RPN
    anchor_sizes: tuple[float, ...] = (32.0, 64.0, 128.0, 256.0, 512.0)
    aspect_ratios: tuple[float, ...] = (0.5, 1.0, 2.0)
    rpn_iou_thresholds: tuple[float, float] = (0.3, 0.7)
    rpn_batch_size_per_image: int = 256
    rpn_positive_fraction: float = 0.5
    rpn_pre_nms_topk_train: int = 2000  # per level
    rpn_pre_nms_topk_test: int = 1000
    rpn_post_nms_topk_train: int = 4000  # per image
    rpn_post_nms_topk_test: int = 1000
    rpn_nms_thresh: float = 0.65
    # ROI heads
    roi_batch_size_per_image: int = 512
    roi_positive_fraction: float = 0.5
    cascade_ious: tuple[float, ...] = (0.5, 0.6, 0.7)
    cascade_box_weights: tuple[tuple[float, float, float, float], ...] = (
        (10.0, 10.0, 5.0, 5.0),
        (20.0, 20.0, 10.0, 10.0),
        (30.0, 30.0, 15.0, 15.0),
    )
    box_scale_clamp: float = math.log(1000.0 / 16)
    box_pooler_resolution: int = 7
    pooler_sampling_ratio: int = 0  # 0 = detectron2's adaptive ceil(roi_size / bin)
    # Static cap on the adaptive samples per bin (gh * gw; exact below it, which holds for
    # every box of images up to 1333 px: see hassod_jax.ops.roi_align). The pooling cost grows
    # with the largest gh * gw of a batch, not with the cap.
    pooler_max_sampling: int = 64
    box_fc_dim: int = 1024
    box_num_fc: int = 2
    mask_pooler_resolution: int = 14
    mask_head_dim: int = 256
    mask_num_conv: int = 4
    # At most this many foreground proposals per image go to the mask head in training
    # (None: roi_batch_size_per_image * roi_positive_fraction, the sampler's maximum).
    mask_max_fg: int | None = None
    num_levels: int = 3
    # Weight of each stage's level loss (the original's `loss_weight.get('loss_level', 1.0)`).
    # 0 is the paper's "plain" ablation row (the original's PRED_LEVEL False): no gradient
    # reaches any shared weight from the level head, so every box, score and mask is that of a
    # detector without one; only its (then untrained) level outputs remain.
    level_loss_weight: float = 1.0
    use_droploss: bool = True
    droploss_iou_thresh: float = 0.01
    # 'original': the matched gt of the first K sampled rows (HASSOD's code); 'all_gt': every
    # pseudo-label box (CutLER's description). See CascadeMaskRCNN._droploss.
    droploss_reference: str = "original"
    test_nms_thresh: float = 0.5
    test_score_thresh: float = 0.0
    # HASSOD's jobs set TEST.DETECTIONS_PER_IMAGE 1000 for every evaluation.
    detections_per_image: int = 1000

    @property
    def num_stages(self) -> int:
        return len(self.cascade_ious)


# Small variant for tests and the CPU demo.
SMALL_CONFIG = DetectorConfig(
    resnet=RESNET_SMALL,
    fpn_channels=32,
    rpn_pre_nms_topk_train=256,
    rpn_pre_nms_topk_test=128,
    rpn_post_nms_topk_train=128,
    rpn_post_nms_topk_test=64,
    roi_batch_size_per_image=64,
    box_fc_dim=64,
    mask_head_dim=32,
    mask_num_conv=2,
    detections_per_image=20,
)

_BOX_LEVELS = ("p2", "p3", "p4", "p5")
_BOX_STRIDES = tuple(FPN_STRIDES[k] for k in _BOX_LEVELS)
_RPN_LEVELS = ("p2", "p3", "p4", "p5", "p6")
_RPN_STRIDES = tuple(FPN_STRIDES[k] for k in _RPN_LEVELS)


def _take(x, idx):
    """Batched gather: x (B, N, ...), idx (B, K) -> (B, K, ...)."""
    return jax.vmap(lambda a, i: a[i])(x, idx)


def _clip_batch(boxes, image_sizes):
    return jax.vmap(lambda b, s: ops.clip_boxes(b, s[0], s[1]))(boxes, image_sizes)


def _nonempty(boxes):
    return (boxes[..., 2] > boxes[..., 0]) & (boxes[..., 3] > boxes[..., 1])


def gt_mask_targets(gt_masks, boxes, matched, mask_size: int, image_hw):
    """Mask targets of ONE image: gt_masks (G, Hm, Wm) bool (image-size, or a uniformly
    scaled version of it), boxes (K, 4) xyxy image pixels, matched (K,) int gt index ->
    (K, mask_size, mask_size) float32 in {0, 1} (detectron2 `crop_and_resize` >= 0.5)."""
    hm, wm = gt_masks.shape[-2:]
    sx, sy = wm / image_hw[1], hm / image_hw[0]
    scaled = boxes * jnp.asarray([sx, sy, sx, sy], jnp.float32)
    return ops.crop_and_resize_gt_masks(gt_masks, scaled, mask_size, gt_indices=matched)


class CascadeMaskRCNN(nn.Module):
    """Class-agnostic Cascade Mask R-CNN, ResNet-FPN backbone, hierarchy-level head."""

    config: DetectorConfig = DetectorConfig()
    dtype: Any = jnp.float32

    def setup(self):
        cfg = self.config
        self.backbone = ResNet(cfg.resnet, dtype=self.dtype)
        self.fpn = FPN(cfg.fpn_channels, cfg.fpn_norm, dtype=self.dtype)
        self.rpn_head = RPNHead(len(cfg.aspect_ratios), dtype=self.dtype)
        self.box_heads = [
            BoxHead(cfg.box_fc_dim, cfg.box_num_fc, cfg.num_levels, dtype=self.dtype)
            for _ in range(cfg.num_stages)
        ]
        self.mask_head = MaskHead(cfg.mask_head_dim, cfg.mask_num_conv, dtype=self.dtype)

    # ------------------------------------------------------------------ pieces
    def features(self, images, train: bool = False):
        """Backbone + FPN: images (B, H, W, 3) normalised -> {"p2".."p6"} NHWC. With
        `train=True` batch norm uses (and updates) batch statistics; with the collection
        `bn_stats` mutable it also records them (PreciseBN)."""
        return self.fpn(self.backbone(images, train), train)

    def _pool(self, feats, boxes, size):
        return ops.multilevel_roi_align(
            [feats[k] for k in _BOX_LEVELS],
            boxes,
            output_size=size,
            strides=_BOX_STRIDES,
            sampling_ratio=self.config.pooler_sampling_ratio,
            max_sampling=self.config.pooler_max_sampling,
        )

    def _coder(self, k):
        return ops.BoxCoder(self.config.cascade_box_weights[k], self.config.box_scale_clamp)

    def proposals(self, feats, image_sizes, train: bool = False):
        """RPN on `features` output: returns ((logits, deltas, anchors) per level,
        (boxes (B, P, 4), objectness logits (B, P), valid (B, P))), detectron2's
        `find_top_rpn_proposals` with the train or test top-k."""
        return self._proposals(feats, image_sizes, train)

    def _proposals(self, feats, image_sizes, train):
        cfg = self.config
        plist = [feats[k] for k in _RPN_LEVELS]
        logits, deltas = self.rpn_head(plist)
        anchors = ops.generate_anchors(
            [f.shape[1:3] for f in plist],
            _RPN_STRIDES,
            [(s,) for s in cfg.anchor_sizes],
            cfg.aspect_ratios,
        )
        pre = cfg.rpn_pre_nms_topk_train if train else cfg.rpn_pre_nms_topk_test
        post = cfg.rpn_post_nms_topk_train if train else cfg.rpn_post_nms_topk_test
        total = sum(min(pre, a.shape[0]) for a in anchors)
        post = min(post, total)

        def one(lg, dl, size):
            return find_top_proposals(
                lg,
                dl,
                anchors,
                size,
                pre_nms_topk=pre,
                post_nms_topk=post,
                nms_thresh=cfg.rpn_nms_thresh,
            )

        boxes, scores, valid = jax.vmap(one)(logits, deltas, image_sizes)
        return (logits, deltas, anchors), (boxes, scores, valid)

    # ------------------------------------------------------------------ forward
    def __call__(
        self, images, targets=None, *, train: bool = False, rng=None, image_sizes=None,
        proposals=None, losses: bool | None = None,
    ):
        """Args:
          images: (B, H, W, 3) normalised (see `normalize_images`), H and W multiples of 32.
          targets (training): {"boxes" (B, G, 4) xyxy image pixels, "masks" (B, G, Hm, Wm)
            bool at image size (or uniformly downscaled), "levels" (B, G) int in
            [0, num_levels), "valid" (B, G) bool}.
          train: training mode: batch norm with batch statistics and the RPN's training
            top-k (detectron2's `self.training`).
          losses: compute the losses (default: `train`). `train=True, losses=False` is Mean
            Teacher's teacher: training-mode batch norm and RPN, the test-time ROI path.
          rng: PRNG key for the samplers (training only).
          image_sizes: (B, 2) int (height, width) of each image's content inside the
            padding, used for clipping; default (H, W).
          proposals: optional (boxes (B, P, 4), valid (B, P)) replacing the RPN's proposals
            (teacher forcing, e.g. against a reference implementation's own proposals); the
            RPN losses are computed as usual.
        Returns:
          losses: {loss name: float32 scalar}.
          otherwise: {"boxes" (B, D, 4) xyxy, "scores" (B, D), "level_probs" (B, D, L),
            "levels" (B, D) int32 argmax, "masks" (B, D, 28, 28) probabilities in the box,
            "valid" (B, D) bool, "index" (B, D) proposal index (-1 when invalid)},
            D = detections_per_image, by descending score.
        """
        b, h, w, c = images.shape
        if c != 3 or h % 32 or w % 32:
            raise ValueError(
                f"CascadeMaskRCNN: images must be (B, H, W, 3) with H, W multiples of 32, "
                f"got {images.shape}"
            )
        losses = train if losses is None else losses
        if losses and not train:
            raise ValueError("CascadeMaskRCNN: losses=True needs train=True")
        if losses and (targets is None or rng is None):
            raise ValueError("CascadeMaskRCNN: computing losses needs `targets` and `rng`")
        if image_sizes is None:
            image_sizes = jnp.tile(jnp.asarray([[h, w]], jnp.int32), (b, 1))
        image_sizes = jnp.asarray(image_sizes).astype(jnp.float32)
        feats = self.features(images, train)
        if self.is_initializing():
            return self._init_heads(feats)
        (logits, deltas, anchors), (props, _, pvalid) = self._proposals(feats, image_sizes, train)
        if proposals is not None:
            props = jnp.asarray(proposals[0], jnp.float32)
            pvalid = jnp.asarray(proposals[1], bool)
            props = jnp.where(pvalid[..., None], props, 0.0)
        if losses:
            return self._losses(
                feats, logits, deltas, anchors, props, pvalid, targets, image_sizes, rng, (h, w)
            )
        return self._inference(feats, props, pvalid, image_sizes)

    def _init_heads(self, feats):
        # Creates every head's parameters without tracing ROIAlign / NMS, so that `init`
        # compiles quickly; the parameter shapes do not depend on the boxes.
        cfg = self.config
        b, c = feats["p2"].shape[0], feats["p2"].shape[-1]
        self.rpn_head([feats[k] for k in _RPN_LEVELS])
        s = cfg.box_pooler_resolution
        for head in self.box_heads:
            head(jnp.zeros((b, 1, s, s, c), feats["p2"].dtype))
        s = cfg.mask_pooler_resolution
        return self.mask_head(jnp.zeros((b, 1, s, s, c), feats["p2"].dtype))

    def _losses(self, feats, logits, deltas, anchors, props, pvalid, targets, image_sizes, rng, hw):
        """The training losses: the RPN's, each cascade stage's (class, box, level) and the mask
        head's, {name: scalar}; the stages' and the mask head's intermediates are sown."""
        gt = self._check_targets(targets)
        k_rpn, k_roi = jax.random.split(rng)
        out = {}
        labels = self._rpn_losses(out, logits, deltas, anchors, gt, k_rpn)
        first = self._cascade_losses(out, feats, props, pvalid, gt, image_sizes, k_roi)
        self._mask_losses(out, feats, first, gt, hw)
        self.sow("intermediates", "rpn", dict(labels=labels))
        return out

    def _check_targets(self, targets):
        """(boxes (B, G, 4) float32, zero where invalid; valid (B, G); levels (B, G) int32;
        masks (B, G, Hm, Wm)) of the targets dict, or a ValueError naming what is wrong."""
        for key in ("boxes", "masks", "levels", "valid"):
            if key not in targets:
                raise ValueError(f"CascadeMaskRCNN: targets lack {key!r} (have {list(targets)})")
        gt_boxes = jnp.asarray(targets["boxes"], jnp.float32)
        gt_valid = jnp.asarray(targets["valid"], bool)
        gt_levels = jnp.asarray(targets["levels"], jnp.int32)
        gt_masks = targets["masks"]
        b, g = gt_valid.shape
        if gt_boxes.shape != (b, g, 4) or gt_levels.shape != (b, g) or gt_masks.shape[:2] != (b, g):
            raise ValueError(
                "CascadeMaskRCNN: targets must be boxes (B, G, 4), masks (B, G, Hm, Wm), "
                f"levels (B, G), valid (B, G); got {gt_boxes.shape}, {gt_masks.shape}, "
                f"{gt_levels.shape}, {gt_valid.shape}"
            )
        gt_boxes = jnp.where(gt_valid[..., None], gt_boxes, 0.0)
        return gt_boxes, gt_valid, gt_levels, gt_masks

    def _rpn_losses(self, out, logits, deltas, anchors, gt, key):
        """out["rpn/cls"], out["rpn/box"]; returns the anchors' labels."""
        cfg = self.config
        gt_boxes, gt_valid, _, _ = gt
        b = gt_valid.shape[0]
        all_anchors = jnp.concatenate(anchors, axis=0)
        labels, rpn_gt_deltas = jax.vmap(
            lambda gb, gv, key: rpn_targets(
                all_anchors,
                gb,
                gv,
                key,
                iou_thresholds=cfg.rpn_iou_thresholds,
                batch_size_per_image=cfg.rpn_batch_size_per_image,
                positive_fraction=cfg.rpn_positive_fraction,
            )
        )(gt_boxes, gt_valid, jax.random.split(key, b))
        out["rpn/cls"], out["rpn/box"] = L.rpn_losses(
            jnp.concatenate(logits, axis=1),
            jnp.concatenate(deltas, axis=1),
            rpn_gt_deltas,
            labels,
            cfg.rpn_batch_size_per_image,
        )
        return labels

    def _cascade_losses(self, out, feats, props, pvalid, gt, image_sizes, key):
        """out["stage{k}/cls|box|level"] of every cascade stage, from the stage-0 sample of the
        proposals (ground truth appended); returns that sample (boxes, matched, is_fg), which
        the mask head trains on."""
        cfg = self.config
        gt_boxes, gt_valid, gt_levels, _ = gt
        b = gt_valid.shape[0]
        # ---- stage-0 sampling (ground truth appended to the proposals)
        boxes, matched, is_fg, valid = jax.vmap(
            lambda p, pv, gb, gv, key: label_and_sample_proposals(
                p,
                pv,
                gb,
                gv,
                key,
                iou_threshold=cfg.cascade_ious[0],
                num_samples=cfg.roi_batch_size_per_image,
                positive_fraction=cfg.roi_positive_fraction,
            )
        )(props, pvalid, gt_boxes, gt_valid, jax.random.split(key, b))
        boxes = jax.lax.stop_gradient(boxes)
        first = (boxes, matched, is_fg)

        # ---- cascade stages
        pred_boxes = None
        for k in range(cfg.num_stages):
            if k > 0:
                boxes = jax.lax.stop_gradient(_clip_batch(pred_boxes, image_sizes))
                # detectron2 drops empty boxes before the later stages; here they are masked.
                valid = valid & _nonempty(boxes) & jnp.all(jnp.isfinite(boxes), axis=-1)
                boxes = jnp.where(valid[..., None], boxes, 0.0)
                matched, is_fg = jax.vmap(
                    lambda bx, v, gb, gv, thr=cfg.cascade_ious[k]: match_stage(bx, v, gb, gv, thr)
                )(boxes, valid, gt_boxes, gt_valid)
            pooled = scale_gradient(
                self._pool(feats, boxes, cfg.box_pooler_resolution), 1.0 / cfg.num_stages
            )
            cls, dl, lvl = self.box_heads[k](pooled)
            coder = self._coder(k)
            safe = jnp.where(valid[..., None], boxes, jnp.asarray([0.0, 0.0, 1.0, 1.0]))
            gt_deltas = coder.encode(safe, _take(gt_boxes, matched))
            pred_boxes = coder.decode(dl, boxes)
            weights = None
            if cfg.use_droploss:
                weights = self._droploss(pred_boxes, valid, matched, gt_boxes, gt_valid)
            self.sow(
                "intermediates",
                f"stage{k}",
                dict(boxes=boxes, valid=valid, is_fg=is_fg, matched=matched, cls=cls,
                     deltas=dl, levels=lvl, pred_boxes=pred_boxes,
                     weights=weights if weights is not None else jnp.ones_like(cls[..., 0])),
            )
            out[f"stage{k}/cls"], out[f"stage{k}/box"] = L.fast_rcnn_losses(
                cls, dl, gt_deltas, is_fg, valid, weights
            )
            out[f"stage{k}/level"] = cfg.level_loss_weight * L.level_loss(
                lvl, _take(gt_levels, matched), is_fg & valid
            )
        return first

    def _mask_losses(self, out, feats, first, gt, hw):
        """out["mask"]: the mask head on the first stage's foreground sample (at most
        `mask_max_fg` boxes per image) against the ground-truth masks cropped to those boxes."""
        cfg = self.config
        _, _, _, gt_masks = gt
        boxes0, matched0, fg0 = first
        m = cfg.mask_max_fg
        if m is None:
            m = int(cfg.roi_batch_size_per_image * cfg.roi_positive_fraction)
        m = min(m, boxes0.shape[1])
        order = jnp.argsort(jnp.logical_not(fg0).astype(jnp.int32), axis=1, stable=True)[:, :m]
        mboxes, mmatched, mfg = _take(boxes0, order), _take(matched0, order), _take(fg0, order)
        mboxes = jnp.where(mfg[..., None], mboxes, jnp.asarray([0.0, 0.0, 1.0, 1.0]))
        mask_logits = self.mask_head(self._pool(feats, mboxes, cfg.mask_pooler_resolution))
        size = mask_logits.shape[-1]
        mask_gt = jax.vmap(lambda gm, bx, mi: gt_mask_targets(gm, bx, mi, size, hw))(
            gt_masks, mboxes, mmatched
        )
        out["mask"] = L.mask_loss(mask_logits, mask_gt, mfg)
        self.sow(
            "intermediates",
            "mask",
            dict(boxes=mboxes, matched=mmatched, is_fg=mfg, logits=mask_logits, targets=mask_gt),
        )

    def _droploss(self, pred_boxes, valid, matched, gt_boxes, gt_valid):
        """DropLoss weights (B, R) of one stage, or None when off for this batch.

        'original' (HASSOD's `CustomCascadeROIHeads._forward_box`): the reference boxes are the
        matched ground truth of the first K rows in the sampler's order (positives, then
        negatives; K = the number of distinct boxes among the first 100); 'all_gt' (CutLER's
        description): every valid ground-truth box. As in the original, DropLoss is off for
        the whole batch when an image has no ground truth.
        """
        cfg = self.config
        pb = jax.lax.stop_gradient(pred_boxes)
        if cfg.droploss_reference == "original":
            w = jax.vmap(
                lambda p, m, v: L.droploss_weights_original(p, m, v, cfg.droploss_iou_thresh)
            )(pb, _take(gt_boxes, matched), valid)
        elif cfg.droploss_reference == "all_gt":
            w = jax.vmap(lambda p, g, v: L.droploss_weights(p, g, v, cfg.droploss_iou_thresh))(
                pb, gt_boxes, gt_valid
            )
        else:
            raise ValueError(
                "DetectorConfig.droploss_reference must be 'original' or 'all_gt', got "
                f"{cfg.droploss_reference!r}"
            )
        every_image_has_gt = jnp.all(jnp.any(gt_valid, axis=1))
        return jnp.where(every_image_has_gt, w, 1.0)

    def box_stage(self, feats, boxes, k: int):
        """Cascade stage `k` on given boxes: feats from `features`, boxes (B, R, 4) xyxy input
        pixels -> (class logits (B, R, 2) [fg, bg], deltas (B, R, 4), level logits (B, R, L))."""
        return self.box_heads[k](self._pool(feats, boxes, self.config.box_pooler_resolution))

    def mask_logits(self, feats, boxes):
        """Mask head on given boxes (B, D, 4) -> (B, D, 28, 28) logits."""
        return self.mask_head(self._pool(feats, boxes, self.config.mask_pooler_resolution))

    def cascade_inference(self, feats, props, pvalid, image_sizes):
        """HASSOD's test-time cascade on proposals (B, R, 4) with validity (B, R):
        stage k > 0 pools stage k-1's decoded boxes clipped to the image (not filtered); the
        class and level probabilities are each stage's SOFTMAX averaged over the stages
        (HASSOD's `predict_levels` is a softmax although training uses a sigmoid focal loss);
        the boxes are the last stage's decoding, unclipped.
        Returns (boxes (B, R, 4), scores (B, R) fg probability, level_probs (B, R, L))."""
        cfg = self.config
        boxes = props
        score_sum, level_sum, pred_boxes = 0.0, 0.0, None
        for k in range(cfg.num_stages):
            if k > 0:
                boxes = _clip_batch(pred_boxes, image_sizes)
            cls, dl, lvl = self.box_stage(feats, boxes, k)
            score_sum = score_sum + jax.nn.softmax(cls, axis=-1)[..., 0]
            level_sum = level_sum + jax.nn.softmax(lvl, axis=-1)
            pred_boxes = self._coder(k).decode(dl, boxes)
        return pred_boxes, score_sum / cfg.num_stages, level_sum / cfg.num_stages

    def _inference(self, feats, props, pvalid, image_sizes):
        boxes, scores, level_probs = self.cascade_inference(feats, props, pvalid, image_sizes)
        det = fast_rcnn_inference(boxes, scores, level_probs, pvalid, image_sizes, self.config)
        mask_in = jnp.where(
            det["valid"][..., None], det["boxes"], jnp.asarray([0.0, 0.0, 1.0, 1.0])
        )
        det["masks"] = jax.nn.sigmoid(self.mask_logits(feats, mask_in))
        return det


def fast_rcnn_inference(boxes, scores, level_probs, valid, image_sizes, config: DetectorConfig):
    """detectron2's `fast_rcnn_inference` as HASSOD runs it, static shapes.

    Args:
      boxes: (B, R, 4) last-stage decoded boxes; scores (B, R); level_probs (B, R, L);
      valid (B, R) bool (real proposals); image_sizes (B, 2) (height, width).
    Returns: {"boxes" (B, D, 4) clipped xyxy, "scores" (B, D), "level_probs" (B, D, L),
      "levels" (B, D) argmax, "index" (B, D) int32 proposal index, "valid" (B, D)}, by
      descending score; D = config.detections_per_image: clip, keep finite boxes and scores
      with score > test_score_thresh, NMS at test_nms_thresh, the top D.
    """
    final = _clip_batch(boxes, jnp.asarray(image_sizes, jnp.float32))
    ok = (
        valid
        & jnp.all(jnp.isfinite(final), axis=-1)
        & jnp.isfinite(scores)
        & (scores > config.test_score_thresh)
    )
    d = config.detections_per_image
    keep, kvalid = jax.vmap(
        lambda bx, s, v: ops.nms(bx, s, config.test_nms_thresh, d, valid_in=v)
    )(final, scores, ok)
    det_levels = _take(level_probs, keep)
    return {
        "boxes": jnp.where(kvalid[..., None], _take(final, keep), 0.0),
        "scores": jnp.where(kvalid, _take(scores, keep), 0.0),
        "level_probs": det_levels,
        "levels": jnp.argmax(det_levels, axis=-1).astype(jnp.int32),
        "index": jnp.where(kvalid, keep, -1).astype(jnp.int32),
        "valid": kvalid,
    }


def paste_detection_masks(detections: dict, height: int, width: int, threshold: float = 0.5):
    """(B, D, 28, 28) mask probabilities of `CascadeMaskRCNN` detections -> (B, D, height,
    width) bool image masks (invalid detections give empty masks)."""
    masks = jax.vmap(lambda m, bx: ops.paste_masks_in_image(m, bx, height, width, threshold))(
        detections["masks"], detections["boxes"]
    )
    return masks & detections["valid"][..., None, None]
