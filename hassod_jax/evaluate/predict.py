"""Detector inference on image files -> class-agnostic COCO result dicts (docs/recipe.md,
"Using the detector").

Follows detectron2's test-time path (re-implemented, not copied):

1. `ResizeShortestEdge(short_edge, max_size)` (`augment.resize_output_shape`, PIL bilinear),
   then padding at the bottom/right to a multiple of 32 -- either the image's own size
   rounded up (`buckets=None`: one compile per distinct padded size) or the smallest of a
   few static `buckets` (a bounded number of compiles). `image_sizes` carries the content
   size so the model clips boxes to it; the padding is zero after normalisation (as
   detectron2 normalises, then pads with 0).
2. One jitted `CascadeMaskRCNN` forward per batch (`make_predict_fn`).
3. `detector_postprocess` (detectron2 `modeling/postprocessing.py`): boxes scaled by
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
of the level head's probabilities: 0 whole, 1 part, 2 subpart)}.

Entry points: `detect` (one NumPy image -> NumPy arrays, as detectron2's DefaultPredictor),
`predict` (many images -> result dicts, for evaluation), and `run` (mode=predict: a
checkpoint on a folder, glob, file or COCO JSON of images -> predictions.json with
`level_probs`, pictures, a skipped list; batches split over every local device).
`filter_detections` keeps a score threshold and a subset of levels (HASSOD's demo's
`--confidence-threshold` and `--hier-level`).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Sequence

import numpy as np

from hassod_jax.data import augment

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
    from hassod_jax.data import loader

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
      score, segmentation (compressed RLE, str counts), hier_level.
    """
    from pycocotools import mask as mask_utils

    from hassod_jax.data.coco import rle_to_json

    valid = np.asarray(detections["valid"], bool)
    boxes, nonempty = rescale_boxes(detections["boxes"], resized_hw, original_hw)
    keep = np.nonzero(valid & nonempty)[0]
    if keep.size == 0:
        return []
    scores = np.asarray(detections["scores"], np.float32)[keep]
    levels = np.argmax(np.asarray(detections["level_probs"])[keep], axis=-1)
    boxes = boxes[keep]
    oh, ow = (int(v) for v in original_hw)
    masks = paste_masks_numpy(
        np.asarray(detections["masks"])[keep], boxes, oh, ow, threshold=mask_threshold
    )
    rles = mask_utils.encode(np.asfortranarray(masks.transpose(1, 2, 0).astype(np.uint8)))
    out = []
    for j in range(len(keep)):
        x0, y0, x1, y1 = (float(v) for v in boxes[j])
        out.append(
            {
                "image_id": image_id,
                "category_id": int(category_id),
                "bbox": [x0, y0, x1 - x0, y1 - y0],
                "score": float(scores[j]),
                "segmentation": rle_to_json(rles[j]),  # size [oh, ow], str counts
                "hier_level": int(levels[j]),
            }
        )
    return out


# ----------------------------------------------------------------------------------------------
# The device part.


def make_sharded_predict_fn(model, devices=None):
    """`make_predict_fn`'s function over several devices: the batch (a multiple of the device
    count) is split along its first axis and each device runs the detector on its share
    (`shard_map`), the variables replicated. One device: `make_predict_fn(model)` itself.
    Returns (fn, put) with put(variables) placing the variables as fn expects them."""
    import jax
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    from hassod_jax.data import loader

    devices = list(devices or jax.local_devices())
    if len(devices) == 1:
        return make_predict_fn(model), lambda v: jax.device_put(v, devices[0])
    mesh = Mesh(np.array(devices), ("data",))

    def fn(variables, images, image_sizes):
        x = loader.normalize_padded(images, image_sizes)
        return model.apply(variables, x, train=False, image_sizes=image_sizes)

    data = PartitionSpec("data")
    sharded = jax.shard_map(
        fn, mesh=mesh, in_specs=(PartitionSpec(), data, data), out_specs=data, check_vma=False
    )
    replicated = NamedSharding(mesh, PartitionSpec())
    return jax.jit(sharded), lambda v: jax.device_put(v, replicated)


def make_predict_fn(model):
    """jitted (variables, images (B, Hp, Wp, 3) uint8 zero-padded, image_sizes (B, 2) int32)
    -> detection dict of `CascadeMaskRCNN` (inference mode); recompiles per padded shape."""
    import jax

    from hassod_jax.data import loader

    def fn(variables, images, image_sizes):
        x = loader.normalize_padded(images, image_sizes)
        return model.apply(variables, x, train=False, image_sizes=image_sizes)

    return jax.jit(fn)


_DETECT_FNS: dict = {}


def detect(module, variables, image, *, short_edge=800, max_size=1333, score_threshold=0.0):
    """Runs the detector on ONE image as detectron2's `DefaultPredictor` does.

    Args:
      module, variables: a `CascadeMaskRCNN` and its {"params", "batch_stats"} (from our
        checkpoints, or `hassod_jax.load_detector` for detectron2/HASSOD `.pth` files).
      image: (H, W, 3) uint8 RGB NumPy array.
      short_edge, max_size: detectron2's test-time `ResizeShortestEdge` (PIL bilinear on the
        uint8 image); the resized image is zero-padded (after normalisation) to a multiple of 32.
      score_threshold: keep detections with score >= this (0 keeps all).
    Returns:
      dict of NumPy arrays in the ORIGINAL image's pixels, by descending score:
      boxes (N, 4) float32 xyxy, scores (N,) float32, levels (N,) int64 (0 whole, 1 part,
      2 subpart), level_probs (N, L) float32, masks (N, H, W) bool (detectron2's
      `detector_postprocess`: boxes rescaled and clipped, empty ones dropped, masks pasted
      with `paste_masks_in_image` at 0.5).
    """
    import jax

    from hassod_jax.data.images import check_rgb_uint8

    image = check_rgb_uint8(np.asarray(image), "detect")
    oh, ow = image.shape[:2]
    resized = resize_for_test(image, short_edge, max_size)
    h, w = resized.shape[:2]
    ph, pw = padded_shape(h, w)
    padded = np.zeros((1, ph, pw, 3), np.uint8)
    padded[0, :h, :w] = resized
    key = id(module)
    if key not in _DETECT_FNS or _DETECT_FNS[key][0] is not module:
        _DETECT_FNS[key] = (module, make_predict_fn(module))
    fn = _DETECT_FNS[key][1]
    det = jax.device_get(fn(variables, padded, np.asarray([[h, w]], np.int32)))
    det = {k: np.asarray(v[0]) for k, v in det.items()}
    return postprocess_detections(det, (h, w), (oh, ow), score_threshold)


def postprocess_detections(det, resized_hw, original_hw, score_threshold=0.0):
    """One image's raw detector outputs -> `detect`'s dict at the original size.

    det: NumPy arrays of ONE image as `CascadeMaskRCNN` returns them (boxes in the resized
    image's pixels, scores, level_probs, masks (D, M, M) probabilities, valid).
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
        "masks": paste_masks_numpy(det["masks"][keep], boxes, int(oh), int(ow)),
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


def _with_detections(model, detections):
    if detections is None or detections == model.config.detections_per_image:
        return model
    if detections < 1:
        raise ValueError(f"predict: detections must be >= 1, got {detections}")
    return model.clone(
        config=dataclasses.replace(model.config, detections_per_image=int(detections))
    )


def _load(item):
    """(source, image_id) -> ((H, W, 3) uint8, image_id); source: a path or an array."""
    from hassod_jax.data.images import load_image_rgb

    if not isinstance(item, (tuple, list)) or len(item) != 2:
        raise ValueError(
            f"predict: each entry of `images` must be (path or (H, W, 3) uint8 array, "
            f"image_id), got {type(item).__name__}"
        )
    source, image_id = item
    if isinstance(source, (str, os.PathLike)):
        return load_image_rgb(source), image_id
    img = np.asarray(source)
    if img.ndim != 3 or img.shape[-1] != 3 or img.dtype != np.uint8:
        raise ValueError(
            f"predict: image {image_id!r} must be (H, W, 3) uint8, got {img.shape} {img.dtype}"
        )
    return img, image_id


def predict(
    model,
    variables,
    images: Sequence[tuple[Any, Any]],
    *,
    short_edge: int = 800,
    max_size: int = 1333,
    buckets=None,
    batch_size: int = 1,
    detections: int | None = None,
    mask_threshold: float = 0.5,
    predict_fn=None,
):
    """Runs the detector on images; returns class-agnostic COCO result dicts.

    Args:
      model: a `CascadeMaskRCNN`.
      variables: {"params": ..., "batch_stats": ...} (NumPy, or jax arrays of this process).
      images: sequence of (path or (H, W, 3) uint8 RGB array, image_id).
      short_edge, max_size: test-time `ResizeShortestEdge` (detectron2 default 800, 1333).
      buckets: None -> pad each image to its resized size rounded up to 32; else a sequence
        of (height, width) multiples of 32 and each image goes to the smallest that holds it
        (ValueError naming the size when none does).
      batch_size: images per device call; images of one padded shape are batched together
        and the last batch of a shape is filled with blank images (their results dropped).
      detections: detections per image (None: the model's `detections_per_image`).
      mask_threshold: mask binarisation threshold (detectron2: 0.5).
      predict_fn: a `make_predict_fn(model)` to reuse across calls (avoids recompiling);
        must be built from the model with the same `detections`.
    Returns:
      list of result dicts (see the module docstring), grouped by image in input order,
      each image's by descending score.
    """
    import jax

    if batch_size < 1:
        raise ValueError(f"predict: batch_size must be >= 1, got {batch_size}")
    model = _with_detections(model, detections)
    fn = predict_fn if predict_fn is not None else make_predict_fn(model)
    # Once on the default device, not once per batch.
    variables = jax.device_put(variables, jax.local_devices()[0])
    results = {}
    batches = batch_by_shape(map(_load, images), short_edge, max_size, buckets, batch_size)
    for shape, chunk in batches:
        for entry, one in zip(chunk, run_batch(fn, variables, shape, chunk, batch_size)):
            results[entry.position] = detections_to_coco(
                one, entry.key, entry.resized_hw, entry.original_hw, mask_threshold
            )
    return [r for pos in sorted(results) for r in results[pos]]


@dataclasses.dataclass
class _Entry:
    """One image waiting for its batch: input position, key (e.g. image id), the resized uint8
    image, both sizes, and (when kept) the original image."""

    position: int
    key: Any
    resized: np.ndarray
    resized_hw: tuple
    original_hw: tuple
    image: Any = None


def batch_by_shape(images, short_edge, max_size, buckets, batch_size, keep_image=None):
    """Groups images by padded shape into batches, in a stream.

    images: iterable of ((H, W, 3) uint8 image, key). Each shape's pending images come out as
    soon as they fill a batch (the rest at the end), so at most batch_size images per shape
    are held, and the batches are those of grouping every image first: each shape's images in
    input order. keep_image(position) -> bool keeps the original image in the entry.
    Yields (padded shape, [_Entry]).
    """
    pending = {}
    for position, (img, key) in enumerate(images):
        resized = resize_for_test(img, short_edge, max_size)
        shape = padded_shape(*resized.shape[:2], buckets)
        keep = keep_image is not None and keep_image(position)
        entry = _Entry(
            position, key, resized, resized.shape[:2], img.shape[:2], img if keep else None
        )
        queue = pending.setdefault(shape, [])
        queue.append(entry)
        if len(queue) == batch_size:
            yield shape, queue
            pending[shape] = []
    for shape, queue in pending.items():
        if queue:
            yield shape, queue


def run_batch(fn, variables, shape, chunk, batch_size):
    """Runs `fn` on one padded batch (the missing images blank) -> one raw detection dict of
    NumPy arrays per entry of `chunk`."""
    import jax

    hp, wp = shape
    batch = np.zeros((batch_size, hp, wp, 3), np.uint8)
    sizes = np.full((batch_size, 2), SIZE_DIVISIBILITY, np.int32)
    for j, entry in enumerate(chunk):
        r = entry.resized
        batch[j, : r.shape[0], : r.shape[1]] = r
        sizes[j] = r.shape[:2]
    out = jax.device_get(fn(variables, batch, sizes))
    return [{k: np.asarray(v[j]) for k, v in out.items()} for j in range(len(chunk))]


def images_from_coco(coco_json, image_dir, max_images=-1):
    """[(path, image_id)] of a COCO JSON's images (in file order), for `predict`.

    coco_json: the file, or its already loaded dict (`data.coco.load_coco_json`).
    """
    from hassod_jax.data.coco import load_coco_json

    data = coco_json if isinstance(coco_json, dict) else load_coco_json(coco_json)
    source = "COCO dict" if isinstance(coco_json, dict) else coco_json
    out = []
    for i, img in enumerate(data["images"]):
        if "file_name" not in img:
            raise ValueError(f"{source}: images[{i}] (id {img.get('id')}) has no 'file_name'")
        out.append((os.path.join(str(image_dir), img["file_name"]), img["id"]))
    return out if max_images is None or max_images < 0 else out[:max_images]


# ----------------------------------------------------------------------------------------------
# Level accuracy.


def level_accuracy(gt, predictions, iou_threshold=0.5, iou_type="bbox"):
    """Hierarchy-level accuracy of foreground detections.

    A prediction is foreground when its best-overlapping non-crowd ground-truth instance of
    the same image has IoU >= `iou_threshold` (boxes, or masks with iou_type='segm'); its
    level is correct when it equals that instance's `hier_level` (0 when absent).
    Returns (accuracy in [0, 1] or -1.0 when there is no foreground prediction, count).
    """
    from pycocotools import mask as mask_utils

    from hassod_jax.data.coco import image_sizes, load_coco_json, segmentation_to_rle

    data = load_coco_json(gt) if isinstance(gt, (str, os.PathLike)) else gt
    sizes = image_sizes(data)
    by_image = {}
    for a in data["annotations"]:
        if not a.get("iscrowd", 0):
            by_image.setdefault(a["image_id"], []).append(a)
    preds_by_image = {}
    for p in predictions:
        preds_by_image.setdefault(p["image_id"], []).append(p)
    correct = total = 0
    for image_id, preds in preds_by_image.items():
        anns = by_image.get(image_id, [])
        if not anns:
            continue
        h, w = sizes[image_id]
        if iou_type == "segm":
            g = [segmentation_to_rle(a["segmentation"], h, w) for a in anns]
            d = [segmentation_to_rle(p["segmentation"], h, w) for p in preds]
        else:
            g = [list(a["bbox"]) for a in anns]
            d = [list(p["bbox"]) for p in preds]
        ious = np.asarray(mask_utils.iou(d, g, [0] * len(g)), np.float64).reshape(len(d), len(g))
        best = ious.argmax(axis=1)
        fg = ious[np.arange(len(d)), best] >= iou_threshold
        gt_levels = np.asarray([int(a.get("hier_level", 0)) for a in anns])
        pred_levels = np.asarray([int(p.get("hier_level", 0)) for p in preds])
        total += int(fg.sum())
        correct += int((pred_levels[fg] == gt_levels[best[fg]]).sum())
    return (correct / total if total else -1.0), total


# ----------------------------------------------------------------------------------------------
# mode=predict: a trained detector on a user's images.


def list_inputs(images, image_dir=""):
    """The images `config.images` names, as [(path, image_id, file_name)].

    images: a folder (its image files, ids as `data.images.list_images` gives them), a glob
      pattern ('photos/*.jpg'; ids 1..N in sorted order), one image file (id 1), or a COCO
      JSON (its images and ids; file names relative to `image_dir`, default the JSON's folder).
    Raises FileNotFoundError (naming --config.images) when nothing matches.
    """
    import glob as glob_lib

    from hassod_jax import utils
    from hassod_jax.data import images as image_io

    spec = os.fspath(images)
    if spec.lower().endswith(".json") and os.path.isfile(spec):
        from hassod_jax.data.coco import load_coco_json

        folder = image_dir or os.path.dirname(os.path.abspath(spec))
        try:
            data = load_coco_json(spec)
        except ValueError as e:
            raise utils.InputError(f"--config.images={spec}: {e}") from None
        out = []
        for i, img in enumerate(data["images"]):
            if "file_name" not in img:
                raise utils.InputError(f"--config.images={spec}: images[{i}] has no 'file_name'")
            out.append((os.path.join(folder, img["file_name"]), img["id"], img["file_name"]))
        return out
    if os.path.isdir(spec):
        return [(os.path.join(spec, n), i, n) for i, n in image_io.list_images(spec)]
    if os.path.isfile(spec):
        return [(spec, 1, os.path.basename(spec))]
    if any(c in spec for c in "*?["):
        paths = sorted(p for p in glob_lib.glob(spec, recursive=True) if os.path.isfile(p))
        if paths:
            root = os.path.commonpath([os.path.dirname(os.path.abspath(p)) for p in paths])
            return [
                (p, i + 1, os.path.relpath(os.path.abspath(p), root)) for i, p in enumerate(paths)
            ]
        raise FileNotFoundError(f"--config.images={spec}: the pattern matches no file")
    raise FileNotFoundError(
        f"--config.images={spec}: no such folder or file; give a folder of images, an image "
        "file, a glob such as 'photos/*.jpg', or a COCO JSON (with --config.image_dir)"
    )
