"""Host pre- and post-processing of detector inference (docs/recipe.md, "Using the detector"),
following detectron2's test-time path (re-implemented, not copied):

1. `ResizeShortestEdge(short_edge, max_size)` (`resize_for_test`: `augment.resize_output_shape`,
   PIL bilinear), then padding at the bottom/right to a multiple of 32 (`padded_shape`) --
   either the image's own size rounded up (`buckets=None`: one compile per distinct padded
   size) or the smallest of a few static `buckets` (a bounded number of compiles).
2. `detector_postprocess` (detectron2 `modeling/postprocessing.py`): boxes scaled by
   (original / resized) per axis, clipped to the original image, empty boxes dropped; the
   28 x 28 mask probabilities are pasted at the ORIGINAL size into those boxes with
   `_do_paste_mask` semantics (bilinear `grid_sample`, `align_corners=False`, zero padding,
   `>= threshold`).

The paste runs on the host in NumPy (`paste_masks_numpy`): original image sizes vary per
image, and `ops.paste_masks_in_image` (jnp) needs a static (H, W), so pasting on the device
would compile once per distinct original size. The NumPy version uses the same float32
sample positions as `ops.paste_masks_in_image` and only evaluates the box's rows/columns
plus one pixel around them (as detectron2's CPU path does): outside that window every
pixel samples at most half of the mask's border value with zero padding, i.e. < 0.5 of a
probability <= 1, so it can never reach the 0.5 threshold -- the window changes nothing.

Result dicts: {image_id, category_id: 1, bbox [x, y, w, h] in original-image pixels,
score, segmentation {size: [h, w], counts: str} (COCO compressed RLE), hier_level (argmax
of the level head's probabilities: 0 whole, 1 part, 2 subpart)}. `filter_detections` keeps a
score threshold and a subset of levels (HASSOD's demo's `--confidence-threshold` and
`--hier-level`).
"""

from __future__ import annotations

import numpy as np

from hassod_jax.data import augment, loader

SIZE_DIVISIBILITY = 32


# ----------------------------------------------------------------------------------------------
# Pre- and post-processing on the host.


def resize_for_test(image, short_edge=800, max_size=1333):
    """(H, W, 3) uint8 -> detectron2's test-time `ResizeShortestEdge` output (PIL bilinear)."""
    h, w = image.shape[:2]
    nh, nw = augment.resize_output_shape(h, w, short_edge, max_size)
    return augment.resize_image(image, nh, nw)


def padded_shape(h, w, buckets=None):
    """(Hp, Wp) the resized (h, w) image is padded to: the smallest bucket holding it (each
    bucket a (height, width) multiple of 32), or (h, w) rounded up to 32 when buckets is
    None or empty."""
    if not buckets:
        return (
            loader.round_up(h, SIZE_DIVISIBILITY),
            loader.round_up(w, SIZE_DIVISIBILITY),
        )
    buckets = [tuple(int(v) for v in b) for b in buckets]
    return buckets[loader.choose_bucket(h, w, buckets, SIZE_DIVISIBILITY)]


def rescale_boxes(boxes, resized_hw, original_hw):
    """detectron2 `detector_postprocess` on boxes.

    Args:
      boxes: (D, 4) float32 xyxy in pixels of the resized image.
      resized_hw: (h, w) of the resized image the detector saw.
      original_hw: (H, W) of the original image.
    Returns:
      (boxes (D, 4) float32 xyxy in original pixels, clipped to [0, W] x [0, H];
       nonempty (D,) bool: width > 0 and height > 0 after clipping).
    """
    boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
    (rh, rw), (oh, ow) = resized_hw, original_hw
    scale = np.asarray([ow / rw, oh / rh, ow / rw, oh / rh], np.float32)
    out = boxes * scale
    out[:, 0::2] = np.clip(out[:, 0::2], 0.0, float(ow))
    out[:, 1::2] = np.clip(out[:, 1::2], 0.0, float(oh))
    nonempty = (out[:, 2] > out[:, 0]) & (out[:, 3] > out[:, 1])
    return out, nonempty


def _sample_weights(lo, hi, start, stop, m):
    """(stop - start, m) float32 bilinear weights of grid_sample(align_corners=False, zero
    padding) along one axis, for pixels start..stop-1 of a box spanning [lo, hi]. The same
    float32 arithmetic as `ops.masks._grid_sample_matrix`."""
    p = np.arange(start, stop, dtype=np.float32) + np.float32(0.5)
    lo, hi = np.float32(lo), np.float32(hi)
    g = (p - lo) / (hi - lo) * np.float32(2.0) - np.float32(1.0)
    coord = ((g + np.float32(1.0)) * np.float32(m) - np.float32(1.0)) / np.float32(2.0)
    low = np.floor(coord)
    frac = (coord - low).astype(np.float32)
    low = low.astype(np.int64)
    cols = np.arange(m)[None, :]
    a = (cols == low[:, None]) * (np.float32(1.0) - frac)[:, None]
    a = a + (cols == low[:, None] + 1) * frac[:, None]
    return a.astype(np.float32)


def paste_masks_numpy(masks, boxes, height, width, threshold=0.5):
    """NumPy twin of `ops.paste_masks_in_image` for one image of any (height, width).

    Args:
      masks: (K, M, M) float mask probabilities in box coordinates.
      boxes: (K, 4) float32 xyxy in pixels of the (height, width) image.
      height, width: output size.
      threshold: binarisation threshold (`>=`), as detectron2.
    Returns:
      (K, height, width) bool; boxes with zero width or height give empty masks.
    """
    masks = np.asarray(masks, np.float32)
    boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
    if masks.ndim != 3 or masks.shape[1] != masks.shape[2] or len(masks) != len(boxes):
        raise ValueError(
            f"paste_masks_numpy: masks must be (K, M, M) and boxes (K, 4), got "
            f"{masks.shape} and {boxes.shape}"
        )
    k, m = masks.shape[:2]
    out = np.zeros((k, int(height), int(width)), bool)
    for i in range(k):
        x0, y0, x1, y1 = (float(v) for v in boxes[i])
        if not (x1 > x0 and y1 > y0):
            continue
        # Window: the box's pixels plus one on each side (see the module docstring).
        r0, r1 = max(int(np.floor(y0)) - 1, 0), min(int(np.ceil(y1)) + 1, int(height))
        c0, c1 = max(int(np.floor(x0)) - 1, 0), min(int(np.ceil(x1)) + 1, int(width))
        if r1 <= r0 or c1 <= c0:
            continue
        ay = _sample_weights(y0, y1, r0, r1, m).astype(np.float64)
        ax = _sample_weights(x0, x1, c0, c1, m).astype(np.float64)
        soft = ay @ masks[i].astype(np.float64) @ ax.T
        out[i, r0:r1, c0:c1] = soft >= threshold
    return out


def detections_to_coco(
    detections, image_id, resized_hw, original_hw, mask_threshold=0.5, category_id=1
):
    """One image's detector outputs -> COCO result dicts at the original image size.

    Args:
      detections: dict of NumPy arrays for ONE image, as `CascadeMaskRCNN` returns them per
        image: boxes (D, 4) xyxy resized-image pixels, scores (D,), level_probs (D, L),
        masks (D, M, M) probabilities, valid (D,) bool.
      image_id: the dataset id to write.
      resized_hw, original_hw: (h, w) the detector saw, and of the original image.
    Returns:
      list of dicts (by descending score) with image_id, category_id, bbox [x, y, w, h],
      score, segmentation (compressed RLE, str counts), hier_level: `postprocess_detections`
      then `detections_to_results`, without the level probabilities.
    """
    dets = postprocess_detections(
        detections, resized_hw, original_hw, mask_threshold=mask_threshold
    )
    return [
        {k: v for k, v in r.items() if k != "level_probs"}
        for r in detections_to_results(dets, image_id, category_id)
    ]


def postprocess_detections(det, resized_hw, original_hw, score_threshold=0.0, mask_threshold=0.5):
    """One image's raw detector outputs -> `detect`'s dict at the original size.

    det: NumPy arrays of ONE image as `CascadeMaskRCNN` returns them (boxes in the resized
    image's pixels, scores, level_probs, masks (D, M, M) probabilities, valid). Masks are
    pasted and binarised at `mask_threshold` (detectron2: 0.5).
    """
    (h, w), (oh, ow) = resized_hw, original_hw
    boxes, nonempty = rescale_boxes(det["boxes"], (h, w), (oh, ow))
    keep = np.nonzero(det["valid"] & nonempty & (det["scores"] >= score_threshold))[0]
    boxes = boxes[keep]
    level_probs = det["level_probs"][keep].astype(np.float32)
    return {
        "boxes": boxes,
        "scores": det["scores"][keep].astype(np.float32),
        "levels": np.argmax(level_probs, axis=-1).astype(np.int64),
        "level_probs": level_probs,
        "masks": paste_masks_numpy(
            det["masks"][keep], boxes, int(oh), int(ow), threshold=mask_threshold
        ),
    }


LEVEL_NAMES = ("whole", "part", "subpart")


def parse_levels(levels):
    """Hierarchy levels to keep, like HASSOD's demo `--hier-level`: a comma-separated string
    ('whole,part'), or a sequence of names or ints (0 whole, 1 part, 2 subpart); empty or
    'all' = every level. Returns a sorted tuple of ints; ConfigError naming the valid values."""
    from hassod_jax.utils import ConfigError

    if levels is None:
        return tuple(range(len(LEVEL_NAMES)))
    if isinstance(levels, str):
        parts = [p.strip() for p in levels.split(",") if p.strip()]
    else:
        parts = list(levels)
    if not parts or parts == ["all"]:
        return tuple(range(len(LEVEL_NAMES)))
    out = set()
    for p in parts:
        name = str(p).strip().lower()
        if name in LEVEL_NAMES:
            out.add(LEVEL_NAMES.index(name))
        elif name.isdigit() and int(name) < len(LEVEL_NAMES):
            out.add(int(name))
        else:
            raise ConfigError(
                f"unknown hierarchy level {p!r}: set --config.levels to a comma-separated "
                f"subset of {','.join(LEVEL_NAMES)} (or 0,1,2)"
            )
    return tuple(sorted(out))


def filter_detections(detections, *, score_threshold=0.0, levels=None):
    """`detect`'s dict restricted to score >= score_threshold and the given levels (see
    `parse_levels`; None keeps every level). The order (descending score) is kept."""
    keep = np.asarray(detections["scores"]) >= score_threshold
    if levels is not None:
        keep &= np.isin(np.asarray(detections["levels"]), parse_levels(levels))
    return {k: np.asarray(v)[keep] for k, v in detections.items()}


def detections_to_results(detections, image_id, category_id=1):
    """`detect`'s dict -> COCO result dicts: image_id, category_id, bbox [x, y, w, h], score,
    segmentation (compressed RLE, str counts), hier_level, level_probs [whole, part, subpart]."""
    from pycocotools import mask as mask_utils

    from hassod_jax.data.coco import rle_to_json

    masks = np.asarray(detections["masks"], bool)
    if not len(masks):
        return []
    rles = mask_utils.encode(np.asfortranarray(masks.transpose(1, 2, 0).astype(np.uint8)))
    out = []
    for j, rle in enumerate(rles):
        x0, y0, x1, y1 = (float(v) for v in detections["boxes"][j])
        out.append(
            {
                "image_id": image_id,
                "category_id": int(category_id),
                "bbox": [x0, y0, x1 - x0, y1 - y0],
                "score": float(detections["scores"][j]),
                "segmentation": rle_to_json(rle),
                "hier_level": int(detections["levels"][j]),
                "level_probs": [float(p) for p in detections["level_probs"][j]],
            }
        )
    return out
