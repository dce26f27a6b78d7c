"""Detector inference on images -> class-agnostic COCO result dicts (docs/recipe.md, "Using the
detector"): one jitted `CascadeMaskRCNN` forward per batch (`make_predict_fn`, or
`make_sharded_predict_fn` over several devices), with the host pre- and post-processing of
`inference.processing` around it.

Entry points: `detect` (one NumPy image -> NumPy arrays, as detectron2's DefaultPredictor),
`predict` (many images -> result dicts, for evaluation); `list_inputs`, `batch_by_shape` and
`run_batch` are mode=predict's pieces (`modes/predict.py`: a checkpoint on a folder, glob,
file or COCO JSON of images -> predictions.json with `level_probs`, pictures, a skipped list;
batches split over every local device).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Sequence

import numpy as np

from hassod_jax.data import images as image_io
from hassod_jax.data import loader
from hassod_jax.data.images import check_rgb_uint8, load_image_rgb
from hassod_jax.inference.processing import (
    SIZE_DIVISIBILITY,
    detections_to_coco,
    padded_shape,
    postprocess_detections,
    resize_for_test,
)

def make_sharded_predict_fn(model, devices=None):
    """`make_predict_fn`'s function over several devices: the batch (a multiple of the device
    count) is split along its first axis and each device runs the detector on its share
    (`shard_map`), the variables replicated. One device: `make_predict_fn(model)` itself.
    Returns (fn, put) with put(variables) placing the variables as fn expects them."""
    import jax
    from jax.sharding import Mesh, NamedSharding, PartitionSpec


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


def list_inputs(images, image_dir=""):
    """The images `config.images` names, as [(path, image_id, file_name)].

    images: a folder (its image files, ids as `data.images.list_images` gives them), a glob
      pattern ('photos/*.jpg'; ids 1..N in sorted order), one image file (id 1), or a COCO
      JSON (its images and ids; file names relative to `image_dir`, default the JSON's folder).
    Raises FileNotFoundError (naming --config.images) when nothing matches.
    """
    import glob as glob_lib

    from hassod_jax import utils

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
