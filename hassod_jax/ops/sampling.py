"""detectron2's Matcher and fixed-size foreground/background sampler, static shapes.

Learned from facebookresearch/detectron2 ``modeling/matcher.py`` (``Matcher``) and
``modeling/sampling.py`` (``subsample_labels``); ground truth is padded to a fixed G with
a ``valid_gt`` mask, and random choices take an explicit PRNG key.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp

__all__ = ["match", "sample_fg_bg"]


def match(
    iou,
    valid_gt,
    thresholds: Sequence[float],
    labels: Sequence[int],
    allow_low_quality_matches: bool,
):
    """Assign each prediction to its best ground truth, as detectron2's ``Matcher``.

    Args:
      iou: (G, N) float32 match quality (IoU) of every gt against every prediction.
      valid_gt: (G,) bool; padded gt rows (False) are ignored.
      thresholds: increasing interior thresholds, e.g. (0.3, 0.7) for the RPN, (0.5,) for
        a box head; intervals are [-inf, t0), [t0, t1), ..., [t_last, inf).
      labels: one label in {-1, 0, 1} per interval (len(thresholds) + 1), e.g. (0, -1, 1).
      allow_low_quality_matches: also label 1 every prediction that achieves some gt's
        highest IoU (ties included), even below the top threshold.

    Returns:
      matched_idx: (N,) int32 index of the best gt (first on ties; 0 when no gt is valid).
      match_labels: (N,) int32 in {-1, 0, 1}; with no valid gt everything is ``labels[0]``.
    """
    thresholds = [float(t) for t in thresholds]
    labels = [int(v) for v in labels]
    if len(labels) != len(thresholds) + 1:
        raise ValueError(
            "hassod_jax/ops/sampling.py: match needs len(labels) == len(thresholds) + 1, "
            f"got {labels} and {thresholds}"
        )
    if any(a > b for a, b in zip(thresholds[:-1], thresholds[1:])):
        raise ValueError(
            f"hassod_jax/ops/sampling.py: thresholds must be increasing, got {thresholds}"
        )
    if any(v not in (-1, 0, 1) for v in labels):
        raise ValueError(f"hassod_jax/ops/sampling.py: labels must be in {{-1, 0, 1}}: {labels}")
    iou = jnp.asarray(iou, jnp.float32)
    valid_gt = jnp.asarray(valid_gt, bool)
    if iou.ndim != 2 or valid_gt.shape != iou.shape[:1]:
        raise ValueError(
            "hassod_jax/ops/sampling.py: match expects iou (G, N) and valid_gt (G,), got "
            f"{tuple(iou.shape)} and {tuple(valid_gt.shape)}"
        )
    masked = jnp.where(valid_gt[:, None], iou, -jnp.inf)
    if iou.shape[0] == 0:
        n = iou.shape[1]
        return jnp.zeros((n,), jnp.int32), jnp.full((n,), labels[0], jnp.int32)
    matched_vals = jnp.max(masked, axis=0)
    matched_idx = jnp.argmax(masked, axis=0).astype(jnp.int32)
    bounds = [-jnp.inf] + thresholds + [jnp.inf]
    match_labels = jnp.ones(matched_vals.shape, jnp.int32)
    for lab, low, high in zip(labels, bounds[:-1], bounds[1:]):
        inside = (matched_vals >= low) & (matched_vals < high)
        match_labels = jnp.where(inside, lab, match_labels)
    if allow_low_quality_matches:
        # detectron2's set_low_quality_matches_: ties with a gt's best IoU all count.
        best_per_gt = jnp.max(masked, axis=1, keepdims=True)
        is_best = (masked == best_per_gt) & valid_gt[:, None]
        match_labels = jnp.where(jnp.any(is_best, axis=0), 1, match_labels)
    any_gt = jnp.any(valid_gt)
    matched_idx = jnp.where(any_gt, matched_idx, 0)
    match_labels = jnp.where(any_gt, match_labels, labels[0])
    return matched_idx, match_labels


def sample_fg_bg(key, labels, num_samples: int, positive_fraction: float):
    """Fixed-size random subset of foreground/background, as detectron2's
    ``subsample_labels``.

    Foreground = label 1, background = label 0, -1 is ignored. At most
    ``int(num_samples * positive_fraction)`` foreground are drawn; background fills the rest
    up to ``num_samples`` when available. A uniformly random subset is drawn by giving every
    candidate an i.i.d. uniform priority and taking the top-k.

    Args:
      key: PRNG key.
      labels: (N,) int in {-1, 0, 1}.
      num_samples, positive_fraction: static.

    Returns:
      indices: (num_samples,) int32 into ``labels``: the sampled foreground first, then the
        sampled background, then 0 padding.
      is_fg: (num_samples,) bool.
      valid: (num_samples,) bool, False for padding.
    """
    labels = jnp.asarray(labels)
    if labels.ndim != 1:
        raise ValueError(
            f"hassod_jax/ops/sampling.py: `labels` must be (N,), got {tuple(labels.shape)}"
        )
    if not 0.0 <= positive_fraction <= 1.0 or int(num_samples) < 1:
        raise ValueError(
            "hassod_jax/ops/sampling.py: need num_samples >= 1 and positive_fraction in [0, 1], "
            f"got {num_samples} and {positive_fraction}"
        )
    n = labels.shape[0]
    num_samples = int(num_samples)
    max_pos = int(num_samples * positive_fraction)
    pos = labels == 1
    neg = labels == 0
    prio = jax.random.uniform(key, (n,), jnp.float32)
    num_pos = jnp.minimum(jnp.sum(pos.astype(jnp.int32)), max_pos)
    num_neg = jnp.minimum(jnp.sum(neg.astype(jnp.int32)), num_samples - num_pos)

    slot = jnp.arange(num_samples)
    if max_pos > 0:
        kp = min(max_pos, n)
        _, fg_idx = jax.lax.top_k(jnp.where(pos, prio, -1.0), kp)
        fg_idx = jnp.pad(fg_idx, (0, num_samples - kp))
    else:
        fg_idx = jnp.zeros((num_samples,), jnp.int32)
    kn = min(num_samples, n)
    _, bg_idx = jax.lax.top_k(jnp.where(neg, prio, -1.0), kn)
    bg_idx = jnp.pad(bg_idx, (0, num_samples - kn))
    bg_pick = jnp.take(bg_idx, jnp.clip(slot - num_pos, 0, num_samples - 1))
    is_fg = slot < num_pos
    valid = slot < num_pos + num_neg
    indices = jnp.where(is_fg, fg_idx, jnp.where(valid, bg_pick, 0)).astype(jnp.int32)
    return indices, is_fg, valid
