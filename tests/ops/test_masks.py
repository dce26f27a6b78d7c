"""Mask pasting against a torch transcription of detectron2's _do_paste_mask
(F.grid_sample, align_corners=False), and gt-mask cropping against detectron2's
BitMasks.crop_and_resize (torchvision roi_align, sampling_ratio 0, aligned, >= 0.5)."""

import jax
import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision

from hassod_jax.ops import crop_and_resize_gt_masks, paste_masks_in_image


def _d2_paste(masks, boxes, img_h, img_w, threshold=0.5):
    """detectron2 layers/mask_ops.py _do_paste_mask with skip_empty=False, then >= threshold."""
    masks = torch.tensor(masks)[:, None]
    boxes = torch.tensor(boxes)
    n = masks.shape[0]
    x0, y0, x1, y1 = torch.split(boxes, 1, dim=1)
    img_y = torch.arange(0, img_h, dtype=torch.float32) + 0.5
    img_x = torch.arange(0, img_w, dtype=torch.float32) + 0.5
    img_y = (img_y - y0) / (y1 - y0) * 2 - 1
    img_x = (img_x - x0) / (x1 - x0) * 2 - 1
    gx = img_x[:, None, :].expand(n, img_y.size(1), img_x.size(1))
    gy = img_y[:, :, None].expand(n, img_y.size(1), img_x.size(1))
    grid = torch.stack([gx, gy], dim=3)
    out = F.grid_sample(masks, grid, align_corners=False)[:, 0]
    return (out >= threshold).numpy()


@pytest.mark.parametrize("m,h,w", [(28, 60, 80), (14, 33, 47)])
def test_paste_masks_matches_detectron2(m, h, w):
    rng = np.random.default_rng(m + h)
    k = 12
    # Smooth masks (blurred noise) so that borders are realistic, not salt and pepper.
    raw = torch.tensor(rng.normal(size=(k, 1, m // 2, m // 2)).astype(np.float32))
    masks = torch.sigmoid(3 * F.interpolate(raw, size=(m, m), mode="bilinear"))[:, 0].numpy()
    xy = rng.uniform(-10, [w, h], (k, 2))
    wh = rng.uniform(3, [w, h], (k, 2))
    boxes = np.concatenate([xy, xy + wh], 1).astype(np.float32)
    # chunk_size 5 does not divide K = 12: exercises the remainder chunk.
    paste = jax.jit(lambda ms, bx: paste_masks_in_image(ms, bx, h, w, chunk_size=5))
    got = np.asarray(paste(masks, boxes))
    ref = _d2_paste(masks, boxes, h, w)
    assert got.shape == (k, h, w) and got.dtype == np.bool_
    diff = got != ref
    # Disagreements only where the soft value is at the threshold to float32 precision:
    # at most one pixel per mask, and only on the border of the reference mask.
    assert diff.sum(axis=(1, 2)).max() <= 1, diff.sum(axis=(1, 2))
    if diff.any():
        pad = np.pad(ref, ((0, 0), (1, 1), (1, 1)), mode="edge")
        neighbours = [
            pad[:, 1 + dy : 1 + dy + h, 1 + dx : 1 + dx + w]
            for dy, dx in ((-1, 0), (1, 0), (0, -1), (0, 1))
        ]
        border = np.any([nb != ref for nb in neighbours], axis=0)
        assert np.all(border[diff])
    assert ref.sum() > 100  # the comparison is not vacuous


def test_paste_degenerate_box_is_empty():
    masks = np.ones((2, 28, 28), np.float32)
    boxes = np.array([[5.0, 5.0, 5.0, 9.0], [1.0, 1.0, 6.0, 6.0]], np.float32)
    got = np.asarray(jax.jit(paste_masks_in_image, static_argnums=(2, 3))(masks, boxes, 10, 10))
    assert not got[0].any()
    np.testing.assert_array_equal(got[1], _d2_paste(masks[1:], boxes[1:], 10, 10)[0])


@pytest.mark.parametrize("h,w,mask_size", [(40, 56, 28), (23, 17, 7)])
def test_crop_and_resize_matches_detectron2(h, w, mask_size):
    rng = np.random.default_rng(h)
    g, k = 3, 10
    yy, xx = np.mgrid[:h, :w]
    centres = rng.uniform(0, 1, (g, 2)) * [h, w]
    radii = rng.uniform(4, min(h, w) / 2, (g, 1, 1))
    gt = (yy[None] - centres[:, 0, None, None]) ** 2 + (xx[None] - centres[:, 1, None, None]) ** 2
    gt = gt < radii**2
    gt_idx = rng.integers(0, g, k)
    xy = rng.uniform(-3, [w, h], (k, 2))
    wh = rng.uniform(1, [w, h], (k, 2))
    boxes = np.concatenate([xy, xy + wh], 1).astype(np.float32)
    fn = jax.jit(crop_and_resize_gt_masks, static_argnums=2)
    got = np.asarray(fn(gt, boxes, mask_size, gt_idx))
    rois = torch.cat([torch.tensor(gt_idx)[:, None].float(), torch.tensor(boxes)], 1)
    ref = torchvision.ops.roi_align(
        torch.tensor(gt, dtype=torch.float32)[:, None], rois, mask_size, 1.0, 0, True
    )[:, 0]
    ref = (ref >= 0.5).float().numpy()
    assert got.shape == (k, mask_size, mask_size) and got.dtype == np.float32
    # Equal except where the soft value sits on 0.5 to rounding (allow 1 pixel per box).
    assert (got != ref).sum(axis=(1, 2)).max() <= 1
    assert ref.sum() > 20
    # Without gt_indices the masks are taken one per box.
    got2 = np.asarray(fn(gt[gt_idx], boxes, mask_size))
    np.testing.assert_array_equal(got2, got)
    with pytest.raises(ValueError, match="masks.py"):
        crop_and_resize_gt_masks(gt, boxes, mask_size)
