"""Stage 2's training augmentations (docs/recipe.md, Stage 2: the detector), per example, in
NumPy with explicit RNGs.

An *example* is a dict of NumPy arrays:
  image:  (H, W, 3) uint8 RGB
  masks:  (N, H, W) bool instance masks
  boxes:  (N, 4) float32 xyxy in pixels of `image`
  levels: (N,) int32 hierarchy level (0 whole, 1 part, 2 subpart)

Semantics follow detectron2 and CutLER/HASSOD (re-implemented here, not copied):
- `ResizeShortestEdge` (detectron2 `data/transforms/augmentation_impl.py`): short side drawn
  with 'choice' sampling from a list, the long side capped at `max_size`, output shape rounded
  with `int(x + 0.5)`; the image is resized by PIL BILINEAR (detectron2's default `interp`,
  through `ResizeTransform.apply_image`), masks by PIL NEAREST (`apply_segmentation`), boxes by
  scaling their corners and clipping to the image (`transform_instance_annotations`).
- `RandomFlip` (horizontal, p = 0.5): x -> W - x for boxes, columns reversed for pixels.
- Copy-paste (CutLER `engine/train_loop.py: CustomSimpleTrainer.copy_and_paste`, reused by
  HASSOD's `detector_training/engine/train_loop.py`): see `copy_paste`.
"""

import numpy as np
from PIL import Image

from hassod_jax.data.images import check_rgb_uint8

SHORT_EDGES = (240, 320, 480, 640, 672, 704, 736, 768, 800, 1024)
MAX_SIZE = 1333


# ----------------------------------------------------------------------------------------------
# Resize and flip.


def resize_output_shape(h, w, short_edge, max_size=MAX_SIZE):
    """Output (new_h, new_w) of detectron2's `ResizeShortestEdge.get_output_shape`.

    The shorter side becomes `short_edge`; if the longer side would then exceed `max_size`,
    both are scaled down so that it equals `max_size`; each side is rounded as int(x + 0.5).
    """
    h, w = int(h), int(w)
    if h < 1 or w < 1:
        raise ValueError(f"image size must be positive, got {h}x{w}")
    size = float(short_edge)
    scale = size / min(h, w)
    if h < w:
        new_h, new_w = size, scale * w
    else:
        new_h, new_w = scale * h, size
    if max(new_h, new_w) > max_size:
        scale = float(max_size) / max(new_h, new_w)
        new_h, new_w = new_h * scale, new_w * scale
    return int(new_h + 0.5), int(new_w + 0.5)


def sample_short_edge(rng, short_edges=SHORT_EDGES):
    """One short-edge length drawn uniformly from `short_edges` (detectron2's 'choice' style)."""
    return int(short_edges[int(rng.integers(len(short_edges)))])


def resize_image(image, new_h, new_w):
    """(H, W, 3) uint8 -> (new_h, new_w, 3) uint8 with PIL BILINEAR (detectron2's default)."""
    image = check_rgb_uint8(image, "image")
    if image.shape[:2] == (new_h, new_w):
        return image.copy()
    pil = Image.fromarray(image).resize((int(new_w), int(new_h)), Image.BILINEAR)
    return np.asarray(pil, dtype=np.uint8)


def resize_masks(masks, new_h, new_w):
    """(N, H, W) bool -> (N, new_h, new_w) bool, each mask resized with PIL NEAREST."""
    masks = np.asarray(masks, dtype=bool)
    out = np.zeros((masks.shape[0], int(new_h), int(new_w)), dtype=bool)
    if masks.shape[1:] == (new_h, new_w):
        out[:] = masks
        return out
    for i, m in enumerate(masks):
        pil = Image.fromarray(m.astype(np.uint8)).resize((int(new_w), int(new_h)), Image.NEAREST)
        out[i] = np.asarray(pil) > 0
    return out


def resize_boxes(boxes, h, w, new_h, new_w):
    """Scales (N, 4) xyxy boxes from an (h, w) image to (new_h, new_w), clipped to the image."""
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    sx, sy = new_w / float(w), new_h / float(h)
    out = boxes * np.array([sx, sy, sx, sy])
    out[:, 0::2] = np.clip(out[:, 0::2], 0.0, new_w)
    out[:, 1::2] = np.clip(out[:, 1::2], 0.0, new_h)
    return out.astype(np.float32)


def resize_example(example, new_h, new_w):
    """Applies the resize to image, masks and boxes; returns a new example dict."""
    h, w = example["image"].shape[:2]
    out = dict(example)
    out["image"] = resize_image(example["image"], new_h, new_w)
    out["masks"] = resize_masks(example["masks"], new_h, new_w)
    out["boxes"] = resize_boxes(example["boxes"], h, w, new_h, new_w)
    return out


def hflip_example(example):
    """Horizontal flip of image, masks and boxes (x -> W - x, as detectron2's HFlipTransform)."""
    w = example["image"].shape[1]
    out = dict(example)
    out["image"] = np.ascontiguousarray(example["image"][:, ::-1])
    out["masks"] = np.ascontiguousarray(np.asarray(example["masks"], dtype=bool)[:, :, ::-1])
    b = np.asarray(example["boxes"], dtype=np.float32).reshape(-1, 4)
    out["boxes"] = np.stack([w - b[:, 2], b[:, 1], w - b[:, 0], b[:, 3]], axis=1).astype(np.float32)
    return out


def drop_empty(example):
    """Removes instances with an empty mask or box (detectron2's `filter_empty_instances`,
    by box with threshold 1e-5 and by mask); e.g. a thin object lost in a downscale."""
    b = np.asarray(example["boxes"], dtype=np.float32).reshape(-1, 4)
    box_ok = ((b[:, 2] - b[:, 0]) > 1e-5) & ((b[:, 3] - b[:, 1]) > 1e-5)
    keep = np.asarray(example["masks"], dtype=bool).any(axis=(1, 2)) & box_ok
    if keep.all():
        return example
    return {
        **example,
        "masks": example["masks"][keep],
        "boxes": example["boxes"][keep],
        "levels": example["levels"][keep],
    }


def resize_flip(example, short_edge, flip, max_size=MAX_SIZE):
    """ResizeShortestEdge to `short_edge` (cap `max_size`), then a horizontal flip if `flip`.

    Same order as detectron2's default training augmentation list. Instances whose mask is
    empty after resizing are dropped.
    """
    h, w = example["image"].shape[:2]
    new_h, new_w = resize_output_shape(h, w, short_edge, max_size)
    out = resize_example(example, new_h, new_w)
    if flip:
        out = hflip_example(out)
    return drop_empty(out)


def random_resize_flip(example, rng, short_edges=SHORT_EDGES, max_size=MAX_SIZE, flip_prob=0.5):
    """Draws the short edge and the flip from `rng` and applies `resize_flip`."""
    short = sample_short_edge(rng, short_edges)
    flip = bool(rng.random() < flip_prob)
    return resize_flip(example, short, flip, max_size)


# ----------------------------------------------------------------------------------------------
# Copy-paste.


def torch_bilinear_weights(n_in, n_out):
    """Source indices and weights of PyTorch `F.interpolate(mode='bilinear', align_corners=False)`.

    Returns (i0, i1, l1): output j reads (1 - l1[j]) * x[i0[j]] + l1[j] * x[i1[j]], with the
    source coordinate (j + 0.5) * n_in / n_out - 0.5 clamped at 0 (as ATen does).
    """
    # float32 arithmetic as ATen's CPU kernel, whose `scale * (j + 0.5) - 0.5` compiles to a
    # fused multiply-add (one rounding, emulated exactly in float64), so that which weights are
    # exactly 0 -- hence which pixels a `.bool()` mask keeps -- matches PyTorch.
    scale = np.float32(n_in) / np.float32(n_out)
    j = np.arange(n_out, dtype=np.float32) + np.float32(0.5)
    src = (np.float64(scale) * j.astype(np.float64) - 0.5).astype(np.float32)
    src = np.maximum(src, np.float32(0.0))
    i0 = np.minimum(src.astype(np.int64), n_in - 1)
    i1 = np.minimum(i0 + 1, n_in - 1)
    l1 = np.clip(src - i0.astype(np.float32), 0.0, 1.0).astype(np.float32)
    return i0, i1, l1.astype(np.float64)


def bilinear_resize_float(x, new_h, new_w, rows=None, cols=None):
    """(..., H, W) -> (..., new_h, new_w) float32, PyTorch bilinear with align_corners=False.

    `rows` / `cols` = (start, stop) compute only that block of the output.
    """
    x = np.asarray(x, dtype=np.float32)
    h, w = x.shape[-2:]
    y0, y1, ly = torch_bilinear_weights(h, new_h)
    x0, x1, lx = torch_bilinear_weights(w, new_w)
    if rows is not None:
        y0, y1, ly = y0[rows[0] : rows[1]], y1[rows[0] : rows[1]], ly[rows[0] : rows[1]]
    if cols is not None:
        x0, x1, lx = x0[cols[0] : cols[1]], x1[cols[0] : cols[1]], lx[cols[0] : cols[1]]
    ly, lx = ly.astype(np.float32), lx.astype(np.float32)
    top = x[..., y0, :][..., x0] * (1 - lx) + x[..., y0, :][..., x1] * lx
    bot = x[..., y1, :][..., x0] * (1 - lx) + x[..., y1, :][..., x1] * lx
    return top * (1 - ly)[:, None] + bot * ly[:, None]


def bilinear_resize_nonzero(masks, new_h, new_w):
    """(N, H, W) bool -> (N, new_h, new_w) bool: where PyTorch's bilinear resize of the masks
    (align_corners=False) is non-zero, i.e. `F.interpolate(m.float(), ...).bool()`.

    Computed with booleans: an output pixel is non-zero iff one of its source pixels with a
    non-zero weight is set (weights are >= ~1e-7, so no float product underflows to 0).
    """
    masks = np.asarray(masks, dtype=bool)
    h, w = masks.shape[-2:]
    y0, y1, ly = torch_bilinear_weights(h, new_h)
    x0, x1, lx = torch_bilinear_weights(w, new_w)
    rows = (masks[:, y0, :] & (ly < 1.0)[:, None]) | (masks[:, y1, :] & (ly > 0.0)[:, None])
    return (rows[:, :, x0] & (lx < 1.0)) | (rows[:, :, x1] & (lx > 0.0))


def masks_to_boxes(masks):
    """(N, H, W) bool -> (N, 4) float32 xyxy tight boxes [x_min, y_min, x_max + 1, y_max + 1].

    detectron2 `BitMasks.get_bounding_boxes`: an empty mask gives [0, 0, 0, 0].
    """
    masks = np.asarray(masks, dtype=bool)
    n = masks.shape[0]
    out = np.zeros((n, 4), dtype=np.float32)
    if n == 0:
        return out
    cols = masks.any(axis=1)  # (N, W)
    rows = masks.any(axis=2)  # (N, H)
    nonempty = cols.any(axis=1)
    w, h = cols.shape[1], rows.shape[1]
    x0 = np.argmax(cols, axis=1)
    x1 = w - np.argmax(cols[:, ::-1], axis=1)
    y0 = np.argmax(rows, axis=1)
    y1 = h - np.argmax(rows[:, ::-1], axis=1)
    out[:] = np.stack([x0, y0, x1, y1], axis=1)
    out[~nonempty] = 0.0
    return out


def copy_paste(
    target, source, rng, rate=1.0, min_ratio=0.3, max_ratio=1.0, random_num=True, max_instances=None
):
    """Pastes a random subset of `source`'s instances into `target` (CutLER/HASSOD copy-paste).

    Steps (CutLER's `copy_and_paste`, with `rng` replacing Python's and NumPy's global RNGs):
      1. With probability `rate` (paste when rng.random() <= rate) and if the source has
         instances: the number copied is 1 when the source has one instance, else uniform in
         [1, n - 1] (CutLER's `np.random.randint(1, n)`; all n when `random_num` is False);
         which ones: a uniform subset without replacement.
      2. ratio ~ U(min_ratio, max_ratio); the WHOLE source image and the chosen masks are
         resized to (int(ratio * H_t), int(ratio * W_t)) -- the target's size times the ratio,
         so the source is stretched to the target's aspect -- with PyTorch bilinear
         (align_corners=False); the image is truncated to uint8 (`.byte()`), a mask keeps
         every pixel with a non-zero interpolated value (`.bool()`).
      3. The resized block is placed at a shift drawn uniformly in [0, H_t - h] x [0, W_t - w].
      4. If the target has no instances, the pasted instances are its instances. Otherwise a
         pasted instance is discarded when it covers >= 50 % of some existing instance
         (intersection / existing area, CutLER's 'ioy'); if none is left the target is
         returned unchanged. The kept ones overwrite the image under their union; existing masks
         lose the covered pixels (mask & ~pasted); existing instances left with no pixel are
         removed; pasted instances come after the existing ones and keep their `levels`.
      5. Every box is recomputed as the tight box of its (updated) mask.
    Deviations (documented): pasted masks that end up empty after resizing are dropped (CutLER
    would keep a [0,0,0,0] box); when the target had no instances the boxes are also taken from
    the masks (CutLER scales the source boxes with x/y shifts swapped, a bug); if
    `max_instances` is given and the result has more instances, the pasted instances beyond the
    limit are not pasted (the existing ones are never dropped for space).

    Args:
      target, source: examples (module docstring); the source may be any example, e.g. another
        image of the same batch (CutLER pastes batch[::-1] into batch).
      rng: np.random.Generator.
    Returns:
      A new example with the target's image size.
    """
    n_src = int(len(source["masks"]))
    p = rng.random()
    if not (rate >= p and n_src > 0):
        return target
    if random_num:
        num_copy = 1 if n_src == 1 else int(rng.integers(1, n_src))
    else:
        num_copy = n_src
    choice = rng.choice(n_src, num_copy, replace=False)
    ratio = rng.uniform(min_ratio, max_ratio)
    ht, wt = target["image"].shape[:2]
    h_new, w_new = int(ratio * ht), int(ratio * wt)
    if h_new < 1 or w_new < 1:
        return target
    h_shift = int(rng.integers(0, ht - h_new, endpoint=True))
    w_shift = int(rng.integers(0, wt - w_new, endpoint=True))

    src_masks = np.asarray(source["masks"], dtype=bool)[choice]
    small = bilinear_resize_nonzero(src_masks, h_new, w_new)  # (k, h_new, w_new)
    pasted_levels = np.asarray(source["levels"], dtype=np.int32)[choice]
    nonempty = small.any(axis=(1, 2))
    small, pasted_levels = small[nonempty], pasted_levels[nonempty]
    # Pasted masks are empty outside this window of the target, so all work happens inside it.
    win = (slice(h_shift, h_shift + h_new), slice(w_shift, w_shift + w_new))

    tgt_masks = np.asarray(target["masks"], dtype=bool)
    tgt_levels = np.asarray(target["levels"], dtype=np.int32)
    n_tgt = len(tgt_masks)
    if n_tgt and len(small):
        # Discard pasted instances that would hide half or more of an existing instance.
        area = np.count_nonzero(tgt_masks.reshape(n_tgt, ht * wt), axis=1)
        tgt_bits = np.packbits(tgt_masks[:, win[0], win[1]].reshape(n_tgt, -1), axis=1)
        src_bits = np.packbits(small.reshape(len(small), -1), axis=1)
        keep = np.ones(len(small), dtype=bool)
        for i in range(len(small)):
            inter = np.bitwise_count(src_bits[i][None, :] & tgt_bits).sum(axis=1)
            keep[i] = (inter / np.maximum(area, 1)).max() < 0.5
        small, pasted_levels = small[keep], pasted_levels[keep]
    if max_instances is not None:
        room = max(int(max_instances) - n_tgt, 0)
        small, pasted_levels = small[:room], pasted_levels[:room]
    if len(small) == 0:
        return target

    alpha = small.any(axis=0)  # (h_new, w_new) union of the kept pasted masks
    ys, xs = np.nonzero(alpha.any(axis=1))[0], np.nonzero(alpha.any(axis=0))[0]
    r0, r1, c0, c1 = int(ys[0]), int(ys[-1]) + 1, int(xs[0]), int(xs[-1]) + 1
    # The source image resized to (h_new, w_new), computed only over the union's box.
    patch = bilinear_resize_float(
        np.moveaxis(np.asarray(source["image"]), -1, 0), h_new, w_new, (r0, r1), (c0, c1)
    )
    patch = np.moveaxis(np.clip(patch, 0, 255).astype(np.uint8), 0, -1)  # .byte() truncates
    image = np.array(target["image"], dtype=np.uint8, copy=True)
    region = image[h_shift + r0 : h_shift + r1, w_shift + c0 : w_shift + c1]
    region[:] = np.where(alpha[r0:r1, c0:c1, None], patch, region)

    tgt_masks = tgt_masks.copy()
    tgt_masks[:, win[0], win[1]] &= ~alpha[None]
    alive = tgt_masks.any(axis=(1, 2))
    pasted = np.zeros((len(small), ht, wt), dtype=bool)
    pasted[:, win[0], win[1]] = small
    masks = np.concatenate([tgt_masks[alive], pasted], axis=0)
    levels = np.concatenate([tgt_levels[alive], pasted_levels], axis=0).astype(np.int32)
    out = dict(target)
    out.update(image=image, masks=masks, boxes=masks_to_boxes(masks), levels=levels)
    return out


def copy_paste_batch(examples, rngs, **kwargs):
    """CutLER's batch-level use: example i receives instances of example B-1-i (pre-paste).

    `rngs` holds one Generator per example. Returns the list of new examples.
    """
    if len(rngs) != len(examples):
        raise ValueError(f"copy_paste_batch: got {len(rngs)} rngs for {len(examples)} examples")
    sources = examples[::-1]
    return [copy_paste(t, s, r, **kwargs) for t, s, r in zip(examples, sources, rngs)]
