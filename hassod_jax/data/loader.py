"""Training input pipeline: COCO-format records -> augmented, bucketed, padded NumPy batches.

Design (docs/recipe.md, Stage 2: the detector; detectron2's defaults where HASSOD sets nothing):

* **Records.** `CocoRecords` reads a COCO JSON and an image folder (`tfds_source.py` gives the
  same interface over ArrayRecord files). Crowd annotations are ignored for training and
  images left without any annotation are skipped (detectron2's `FILTER_EMPTY_ANNOTATIONS`,
  which HASSOD's stage 2.2 and both Mean Teacher streams use); `open_records` logs how many;
  `hier_level` is optional (-> 0).
* **Empty instances.** After the resize and flip an instance whose box has width or height
  <= 1e-5 or whose mask has no pixel is dropped (detectron2's `filter_empty_instances` in the
  dataset mapper, `augment.drop_empty`); copy-paste drops the existing instances it hides
  completely and pasted masks left empty by their downscale (`augment.copy_paste`), and
  recomputes every box from its mask, so no batch holds an empty instance. An image may end
  with no instance at all; like detectron2, it stays in the batch (all `valid` False).
* **A plan fixed by the seed.** The short side of every resize and every flip are drawn,
  together with the shuffling, per epoch from `np.random.default_rng([seed, 0, epoch])`.
  With the image sizes from the JSON this fixes each example's output size, hence its
  *bucket*, before any pixel is read. Examples are then grouped like detectron2's
  `AspectRatioGroupedDataset`: in stream order, each waits in its bucket's queue and a global
  batch is emitted when a queue holds `global_batch_size` examples (queues carry over epoch
  ends, as detectron2's infinite sampler does). Global batch k is therefore a pure function of
  (seed, k): resuming at step k needs no other state, every host computes the same plan, and
  all hosts agree on the bucket of step k (one global array per step).
* **Host shards.** Host p of P reads only its slice `[p * B/P, (p + 1) * B/P)` of each global
  batch (P = jax.process_count() unless given), so the hosts' examples are disjoint and
  together form the global batch.
* **Copy-paste** (CutLER/HASSOD, `augment.copy_paste`) is applied within the host's local
  batch, example i receiving instances of example B_local-1-i (CutLER pastes `data[::-1]`
  into `data` per GPU); its randomness is `np.random.default_rng([seed, 1, k, j])` for global
  example j of step k.
* **Padding.** Each image is padded at the bottom/right to its bucket (Hb, Wb), the smallest
  (by area, first on ties) bucket in `buckets` containing the image rounded up to multiples of
  `size_divisibility` (32, as detectron2 pads for FPN); instances are padded to
  `max_instances` with a `valid` mask. All examples of a batch share one bucket, so a jitted
  step compiles at most once per bucket.

Batch layout (`B` = local batch, `G` = max_instances):
  images       (B, Hb, Wb, 3) float32 `(x - pixel_mean) / pixel_std`, padding 0 (= detectron2,
               which normalises then pads with 0); with `image_dtype='uint8'` raw RGB with
               padding 0, 4x less to transfer: normalise on device and zero the padding with
               `image_sizes` (`normalize_padded`).
  image_sizes  (B, 2) int32 (height, width) of the valid region.
  boxes        (B, G, 4) float32 xyxy in pixels of the resized image; 0 where not valid.
  masks        (B, G, Hb, Wb) bool full-image masks at bucket size (what crop-and-resize mask
               targets need). Memory: B * G * Hb * Wb bytes, e.g. 16 x 100 x 1024 x 1344 =
               2.2 GB at the largest default bucket; `pack_masks=True` stores them bit-packed
               along W as (B, G, Hb, Wb / 8) uint8 (8x less; `unpack_masks` restores them,
               also under jit).
  levels       (B, G) int32 hierarchy level; 0 where not valid.
  valid        (B, G) bool.
  image_ids    (B,) int64 dataset image ids.
When an image holds more than G instances after resizing, the G largest (by mask area) are
kept; copy-paste then only pastes as many as there is room for. `image_ids` is for logging
(keep it on the host: int64 does not survive jax's default 32-bit mode).

Throughput: float32 images and unpacked masks are the expensive part of a batch (building
them and moving them through grain's shared memory and to the device); `image_dtype='uint8'`
with `normalize_padded` inside the jitted step, and `pack_masks=True` with `unpack_masks`,
give identical values at a fraction of the cost.
"""

import dataclasses
import threading
from typing import Sequence

import numpy as np

from hassod_jax.data import augment, strong_augment
from hassod_jax.data.images import load_image_rgb
from hassod_jax.data.tfds_source import ArrayRecordRecords

PIXEL_MEAN = (123.675, 116.28, 103.53)
PIXEL_STD = (58.395, 57.12, 57.375)
# (H, W) buckets. Landscape then portrait; every ResizeShortestEdge output of stage 2 (short side
# <= 1024, long side <= 1333) fits one of them, so no image is ever refused with the defaults.
DEFAULT_BUCKETS = (
    (320, 576),
    (512, 896),
    (800, 1344),
    (1024, 1344),
    (576, 320),
    (896, 512),
    (1344, 800),
    (1344, 1024),
)
_PLAN_TAG, _PASTE_TAG, _STRONG_TAG = 0, 1, 2


@dataclasses.dataclass(frozen=True)
class LoaderConfig:
    """Options of the training pipeline (defaults: the original HASSOD's and detectron2's)."""

    global_batch_size: int = 16
    seed: int = 0
    short_edges: Sequence[int] = augment.SHORT_EDGES
    max_size: int = augment.MAX_SIZE
    flip_prob: float = 0.5
    copy_paste: bool = True
    copy_paste_rate: float = 1.0
    copy_paste_min_ratio: float = 0.3
    copy_paste_max_ratio: float = 1.0
    copy_paste_random_num: bool = True
    buckets: Sequence[Sequence[int]] = DEFAULT_BUCKETS
    size_divisibility: int = 32
    max_instances: int = 100
    image_dtype: str = "float32"
    pixel_mean: Sequence[float] = PIXEL_MEAN
    pixel_std: Sequence[float] = PIXEL_STD
    pack_masks: bool = False
    # Mean Teacher: each example also carries a strong view ("images_strong"), the weak
    # view (the resized, flipped image) through `strong_augment.strong_view`, same geometry.
    strong_views: bool = False

    def validate(self):
        """ConfigError (a ValueError) naming the config field (config.data.X, or the batch
        size) of the first invalid option."""
        from hassod_jax.utils import ConfigError

        def bad(field, text):
            return ConfigError(f"--config.{field}: {text}")

        if self.global_batch_size < 1:
            raise ConfigError(f"the global batch size must be >= 1, got {self.global_batch_size}")
        if not self.short_edges or min(self.short_edges) < 1:
            raise bad("data.short_edges", f"must be positive sizes, got {self.short_edges}")
        if not self.buckets:
            raise bad("data.buckets", "must list at least one (height, width)")
        for b in self.buckets:
            if len(b) != 2 or any(int(v) % self.size_divisibility for v in b):
                raise bad(
                    "data.buckets",
                    f"bucket {tuple(b)} must be (height, width) multiples of "
                    f"size_divisibility={self.size_divisibility}",
                )
        if self.pack_masks and any(int(b[1]) % 8 for b in self.buckets):
            raise bad("data.pack_masks", "needs bucket widths that are multiples of 8")
        if self.image_dtype not in ("float32", "uint8"):
            raise ValueError(f"image_dtype must be 'float32' or 'uint8', got {self.image_dtype!r}")
        if self.max_instances < 1:
            raise bad("data.max_instances", f"must be >= 1, got {self.max_instances}")
        if not 0.0 < self.copy_paste_min_ratio <= self.copy_paste_max_ratio <= 1.0:
            raise bad(
                "data.copy_paste_min_ratio",
                "need 0 < copy_paste_min_ratio <= copy_paste_max_ratio <= 1, got "
                f"{self.copy_paste_min_ratio}, {self.copy_paste_max_ratio}",
            )
        return self


# ----------------------------------------------------------------------------------------------
# Records.


class CocoRecords:
    """Random access to the training images of a COCO-format dataset.

    Args:
      coco: path of a COCO JSON file, or an already loaded dict.
      image_dir: folder that `file_name`s are relative to.
      filter_empty: skip images with no non-crowd annotation.
    Attributes:
      sizes: (N, 2) int64 (height, width) per record, from the JSON (or the image header when
        the JSON omits them).
      image_ids: (N,) int64.
    `load(i)` returns an example dict (see `augment`): image (H, W, 3) uint8, masks (n, H, W)
    bool, boxes (n, 4) float32 xyxy (the annotation's `bbox`, or the mask's box without one),
    levels (n,) int32.
    """

    def __init__(self, coco, image_dir, filter_empty=True):
        from hassod_jax.data.coco import load_coco_json, validate_coco_dict
        from hassod_jax.utils import InputError

        if isinstance(coco, dict):
            data, self.source = validate_coco_dict(coco, "COCO data"), "COCO data"
        else:
            data, self.source = load_coco_json(coco), f"COCO JSON file {coco}"
        self.image_dir = str(image_dir)
        by_image = {}
        for ann in data["annotations"]:
            if ann.get("iscrowd", 0):
                continue  # crowd regions are not training targets (detectron2's mapper)
            level = ann.get("hier_level", 0)
            if not isinstance(level, (int, np.integer)) or not 0 <= int(level) <= 2:
                raise InputError(
                    f"{self.source}: annotation {ann.get('id', '?')} has hier_level "
                    f"{level!r}; expected an integer 0, 1 or 2"
                )
            if "segmentation" not in ann:
                raise InputError(
                    f"{self.source}: annotation {ann.get('id', '?')} has no "
                    "'segmentation' (masks are needed for training)"
                )
            # Only what training reads is kept (smaller to hold and to send to workers).
            slim = {"segmentation": ann["segmentation"], "hier_level": int(level)}
            if "bbox" in ann:
                slim["bbox"] = tuple(float(v) for v in ann["bbox"])
            if "id" in ann:
                slim["id"] = ann["id"]
            by_image.setdefault(ann["image_id"], []).append(slim)
        self.images, self.annotations = [], []
        self.num_dropped = 0  # images without a non-crowd annotation (filter_empty)
        for i, img in enumerate(data["images"]):
            anns = by_image.get(img["id"], [])
            if filter_empty and not anns:
                self.num_dropped += 1
                continue
            if "file_name" not in img:
                raise InputError(f"{self.source}: images[{i}] (id {img['id']}) has no 'file_name'")
            self.images.append(
                {
                    "id": img["id"],
                    "file_name": img["file_name"],
                    **{k: img[k] for k in ("height", "width") if k in img},
                }
            )
            self.annotations.append(anns)
        if not self.images:
            raise InputError(f"{self.source}: no image with a non-crowd annotation to train on")
        self.image_ids = np.array([img["id"] for img in self.images], dtype=np.int64)
        self.sizes = np.array([self._size(img) for img in self.images], dtype=np.int64)

    def _size(self, img):
        if "height" in img and "width" in img:
            return int(img["height"]), int(img["width"])
        import os

        from PIL import Image

        path = os.path.join(self.image_dir, img["file_name"])
        try:
            with Image.open(path) as im:
                w, h = im.size
        except (OSError, ValueError) as e:
            from hassod_jax.utils import InputError

            raise InputError(
                f"{self.source}: image {img['id']} states no height/width and "
                f"{path} cannot be opened to read them ({e})"
            ) from None
        return h, w

    def __len__(self):
        return len(self.images)

    def load(self, i):
        import os

        from hassod_jax.data.coco import annotation_to_mask

        img = self.images[i]
        h, w = (int(v) for v in self.sizes[i])
        path = os.path.join(self.image_dir, img["file_name"])
        image = load_image_rgb(path)
        if image.shape[:2] != (h, w):
            raise ValueError(
                f"{self.source}: image {img['id']} is {image.shape[0]}x"
                f"{image.shape[1]} in {path} but the JSON says {h}x{w}"
            )
        anns = self.annotations[i]
        masks = np.zeros((len(anns), h, w), dtype=bool)
        boxes = np.zeros((len(anns), 4), dtype=np.float32)
        for j, ann in enumerate(anns):
            try:
                masks[j] = annotation_to_mask(ann, h, w)
            except ValueError as e:
                raise ValueError(
                    f"{self.source}: annotation {ann.get('id', '?')} of image {img['id']}: {e}"
                ) from None
            if "bbox" in ann:
                x, y, bw, bh = (float(v) for v in ann["bbox"])
                boxes[j] = (x, y, x + bw, y + bh)
            else:
                boxes[j] = augment.masks_to_boxes(masks[j : j + 1])[0]
        levels = np.array([int(a.get("hier_level", 0)) for a in anns], dtype=np.int32)
        return {"image": image, "masks": masks, "boxes": boxes, "levels": levels}


def open_records(train_json=None, images=None, tfds_dir=None, split="train", filter_empty=True):
    """Training records from a COCO JSON + image folder, or from TFDS-layout ArrayRecord shards
    (`tfds_dir`, see `tfds_source`); exactly one of the two must be given.

    For COCO-scale data prefer the ArrayRecord form (`tfds_source.write_tfds_detection`
    converts a COCO folder): `CocoRecords` holds every annotation in memory and grain copies
    it into each worker process, while ArrayRecord records are read on demand.
    """
    if tfds_dir and (train_json or images):
        raise ValueError("give either tfds_dir or train_json + images, not both")
    if tfds_dir:
        records = ArrayRecordRecords(tfds_dir, split=split, filter_empty=filter_empty)
        dropped, source = len(records.examples) - len(records), tfds_dir
    else:
        if not train_json or not images:
            raise ValueError(
                "training data: set train_json and images (a COCO JSON file and its "
                "image folder), or tfds_dir (ArrayRecord shards)"
            )
        records = CocoRecords(train_json, images, filter_empty=filter_empty)
        dropped, source = records.num_dropped, train_json
    log_dropped(dropped, len(records), source)
    return records


def log_dropped(dropped, kept, source):
    """Logs how many images were left out for having no (non-crowd) pseudo-label."""
    from absl import logging

    total = dropped + kept
    logging.info(
        "Training images: %d of %d in %s have no non-crowd annotation and are left out "
        "(detectron2's FILTER_EMPTY_ANNOTATIONS, %.1f%%); %d remain",
        dropped,
        total,
        source,
        100.0 * dropped / max(total, 1),
        kept,
    )


# ----------------------------------------------------------------------------------------------
# Buckets and the batch plan.


def round_up(v, d):
    return int(-(-int(v) // int(d)) * int(d))


def choose_bucket(h, w, buckets, size_divisibility=32):
    """Index of the smallest-area bucket (first on ties) holding (h, w) rounded up to
    multiples of `size_divisibility`; ValueError naming the size when none does."""
    hr, wr = round_up(h, size_divisibility), round_up(w, size_divisibility)
    best, best_area = -1, None
    for i, (bh, bw) in enumerate(buckets):
        if bh >= hr and bw >= wr and (best_area is None or bh * bw < best_area):
            best, best_area = i, bh * bw
    if best < 0:
        raise ValueError(
            f"no bucket holds a {h}x{w} image (padded {hr}x{wr}); buckets are "
            f"{[tuple(b) for b in buckets]}: add a larger one"
        )
    return best


class BatchPlan:
    """Which examples (record index, short side, flip) form global batch k, and its bucket.

    Deterministic in (seed, sizes, config); extended lazily one epoch at a time.
    """

    def __init__(self, sizes, config):
        self.sizes = np.asarray(sizes, dtype=np.int64).reshape(-1, 2)
        self.cfg = config
        self.n = len(self.sizes)
        if self.n == 0:
            raise ValueError("BatchPlan: the dataset is empty")
        self.buckets = [tuple(int(v) for v in b) for b in config.buckets]
        self._rows, self._bucket_of = [], []  # per batch: (B, 3) int64 [index, short, flip]
        self._queues = [[] for _ in self.buckets]
        self._epoch = 0
        self._bucket_cache = {}
        self._lock = threading.Lock()

    def _bucket(self, h, w, short):
        key = (h, w, short)
        b = self._bucket_cache.get(key)
        if b is None:
            nh, nw = augment.resize_output_shape(h, w, short, self.cfg.max_size)
            b = choose_bucket(nh, nw, self.buckets, self.cfg.size_divisibility)
            self._bucket_cache[key] = b
        return b

    def _extend_one_epoch(self):
        cfg = self.cfg
        rng = np.random.default_rng([cfg.seed, _PLAN_TAG, self._epoch])
        perm = rng.permutation(self.n)
        short = np.asarray(cfg.short_edges, dtype=np.int64)[
            rng.integers(len(cfg.short_edges), size=self.n)
        ]
        flip = rng.random(self.n) < cfg.flip_prob
        bsz = cfg.global_batch_size
        for idx, s, f in zip(perm.tolist(), short.tolist(), flip.tolist()):
            h, w = self.sizes[idx]
            b = self._bucket(int(h), int(w), s)
            q = self._queues[b]
            q.append((idx, s, int(f)))
            if len(q) == bsz:
                self._rows.append(np.array(q, dtype=np.int64))
                self._bucket_of.append(b)
                q.clear()
        self._epoch += 1

    def batch(self, k):
        """(rows (B, 3) int64 [record index, short side, flip], bucket index) of batch k."""
        if k < 0:
            raise IndexError(f"batch index must be >= 0, got {k}")
        with self._lock:
            while len(self._rows) <= k:
                before = len(self._rows)
                self._extend_one_epoch()
                if len(self._rows) == before and self._epoch > 4 * self.cfg.global_batch_size:
                    raise ValueError(
                        "BatchPlan: no batch can be formed; is the dataset smaller "
                        "than the batch across every bucket?"
                    )
            return self._rows[k], self._bucket_of[k]

    def __getstate__(self):
        # The plan is recomputed where it is needed (e.g. in each grain worker).
        state = dict(self.__dict__)
        state.update(
            _rows=[], _bucket_of=[], _queues=[[] for _ in self.buckets], _epoch=0, _lock=None
        )
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._lock = threading.Lock()


# ----------------------------------------------------------------------------------------------
# Batches.


def host_shard(process_index=None, process_count=None):
    """(index, count) of this host: explicit values, else jax.process_index()/process_count()."""
    if process_index is None or process_count is None:
        import jax

        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    process_index, process_count = int(process_index), int(process_count)
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} not in [0, {process_count})")
    return process_index, process_count


def _keep_largest(example, max_instances):
    n = len(example["masks"])
    if n <= max_instances:
        return example
    area = example["masks"].sum(axis=(1, 2))
    keep = np.sort(np.argsort(-area, kind="stable")[:max_instances])
    return {
        **example,
        "masks": example["masks"][keep],
        "boxes": example["boxes"][keep],
        "levels": example["levels"][keep],
    }


def pad_examples(examples, bucket_hw, config, image_ids=None):
    """Stacks examples of one bucket into a padded batch dict (layout in the module docstring)."""
    hb, wb = (int(v) for v in bucket_hw)
    g = int(config.max_instances)
    b = len(examples)
    if config.image_dtype == "float32":
        images = np.zeros((b, hb, wb, 3), dtype=np.float32)
    else:
        images = np.zeros((b, hb, wb, 3), dtype=np.uint8)
    sizes = np.zeros((b, 2), dtype=np.int32)
    boxes = np.zeros((b, g, 4), dtype=np.float32)
    if config.pack_masks:
        masks = np.zeros((b, g, hb, wb // 8), dtype=np.uint8)
    else:
        masks = np.zeros((b, g, hb, wb), dtype=bool)
    levels = np.zeros((b, g), dtype=np.int32)
    valid = np.zeros((b, g), dtype=bool)
    mean = np.asarray(config.pixel_mean, dtype=np.float32)
    inv_std = 1.0 / np.asarray(config.pixel_std, dtype=np.float32)
    strong = np.zeros_like(images) if examples and "image_strong" in examples[0] else None

    def put(dst, i, img):
        h, w = img.shape[:2]
        if config.image_dtype == "float32":
            x = img.astype(np.float32)  # contiguous temporary: faster than strided ops
            x -= mean
            x *= inv_std
            dst[i, :h, :w] = x
        else:
            dst[i, :h, :w] = img

    for i, ex in enumerate(examples):
        h, w = ex["image"].shape[:2]
        if h > hb or w > wb:
            raise ValueError(f"example {i} of size {h}x{w} does not fit bucket {hb}x{wb}")
        put(images, i, ex["image"])
        if strong is not None:
            if ex["image_strong"].shape != ex["image"].shape:
                raise ValueError(f"example {i}: the strong view's shape differs from the weak's")
            put(strong, i, ex["image_strong"])
        sizes[i] = (h, w)
        n = len(ex["masks"])
        if n > g:
            raise ValueError(f"example {i} has {n} instances, more than max_instances={g}")
        boxes[i, :n] = ex["boxes"]
        if config.pack_masks:  # pack only the filled rows of the filled slots
            row = np.zeros((n, h, wb), dtype=bool)
            row[:, :, :w] = ex["masks"]
            masks[i, :n, :h] = np.packbits(row, axis=-1)
        else:
            masks[i, :n, :h, :w] = ex["masks"]
        levels[i, :n] = ex["levels"]
        valid[i, :n] = True
    out = {
        "images": images,
        "image_sizes": sizes,
        "boxes": boxes,
        "masks": masks,
        "levels": levels,
        "valid": valid,
    }
    if strong is not None:
        out["images_strong"] = strong
    out["image_ids"] = (
        np.zeros((b,), np.int64) if image_ids is None else np.asarray(image_ids, dtype=np.int64)
    )
    return out


def unpack_masks(packed, width=None):
    """Inverse of `pack_masks`: (..., W / 8) uint8 -> (..., W) bool (NumPy or jax arrays)."""
    if isinstance(packed, np.ndarray):
        out = np.unpackbits(packed, axis=-1).astype(bool)
    else:
        import jax.numpy as jnp

        out = jnp.unpackbits(packed, axis=-1).astype(bool)
    return out if width is None else out[..., :width]


def normalize_padded(images, image_sizes, pixel_mean=PIXEL_MEAN, pixel_std=PIXEL_STD):
    """uint8 padded images (B, H, W, 3) -> float32 normalised with the padding set to 0.

    Works on NumPy or jax arrays (use it inside the jitted step for `image_dtype='uint8'`);
    gives exactly the `image_dtype='float32'` batch.
    """
    xp = np
    if not isinstance(images, np.ndarray):
        import jax.numpy as xp
    h, w = images.shape[1:3]
    x = (images.astype(xp.float32) - xp.asarray(pixel_mean, xp.float32)) * (
        1.0 / xp.asarray(pixel_std, xp.float32)
    )
    rows = xp.arange(h)[None, :, None] < image_sizes[:, 0, None, None]
    cols = xp.arange(w)[None, None, :] < image_sizes[:, 1, None, None]
    return xp.where((rows & cols)[..., None], x, xp.zeros((), xp.float32))


class DetectionBatchSource:
    """Random-access source of this host's training batches: `source[k]` is step k's batch.

    Args:
      records: `CocoRecords` or anything with `sizes`, `image_ids`, `__len__` and `load(i)`.
      config: LoaderConfig.
      num_steps: number of batches (`len(source)`); step k reads global batch k of the plan.
      process_index, process_count: this host's shard (default: jax's).
    Picklable (grain sends it to its worker processes, which rebuild the plan as needed).
    """

    def __init__(
        self,
        records,
        config=LoaderConfig(),
        num_steps=10**9,
        process_index=None,
        process_count=None,
    ):
        self.records = records
        self.cfg = config.validate()
        self.num_steps = int(num_steps)
        self.process_index, self.process_count = host_shard(process_index, process_count)
        if config.global_batch_size % self.process_count:
            raise ValueError(
                f"global_batch_size {config.global_batch_size} is not divisible by "
                f"the number of hosts {self.process_count}"
            )
        self.local_batch_size = config.global_batch_size // self.process_count
        self.plan = BatchPlan(records.sizes, config)

    def __len__(self):
        return self.num_steps

    def bucket_of(self, k):
        """(Hb, Wb) of step k's batch (the same on every host)."""
        return self.plan.buckets[self.plan.batch(k)[1]]

    def local_rows(self, k):
        """(B_local, 3) int64 [record index, short side, flip] this host reads at step k."""
        rows, _ = self.plan.batch(k)
        lo = self.process_index * self.local_batch_size
        return rows[lo : lo + self.local_batch_size]

    def __getitem__(self, k):
        k = int(k)
        if not 0 <= k < self.num_steps:
            raise IndexError(f"step {k} out of range [0, {self.num_steps})")
        cfg = self.cfg
        rows, b = self.plan.batch(k)
        lo = self.process_index * self.local_batch_size
        rows = rows[lo : lo + self.local_batch_size]
        examples = []
        for idx, short, flip in rows.tolist():
            ex = self.records.load(idx)
            ex = augment.resize_flip(ex, short, bool(flip), cfg.max_size)
            examples.append(_keep_largest(ex, cfg.max_instances))
        if cfg.copy_paste:
            rngs = [
                np.random.default_rng([cfg.seed, _PASTE_TAG, k, lo + i])
                for i in range(len(examples))
            ]
            examples = augment.copy_paste_batch(
                examples,
                rngs,
                rate=cfg.copy_paste_rate,
                min_ratio=cfg.copy_paste_min_ratio,
                max_ratio=cfg.copy_paste_max_ratio,
                random_num=cfg.copy_paste_random_num,
                max_instances=cfg.max_instances,
            )
        if cfg.strong_views:
            examples = [
                {**ex, "image_strong": strong_augment.strong_view(
                    ex["image"], np.random.default_rng([cfg.seed, _STRONG_TAG, k, lo + i]))}
                for i, ex in enumerate(examples)
            ]
        ids = self.records.image_ids[rows[:, 0]]
        return pad_examples(examples, self.plan.buckets[b], cfg, image_ids=ids)


# ----------------------------------------------------------------------------------------------
# Iterators with saveable state.


class NumpyBatchIterator:
    """In-process iterator over `source[start_step:]` (no worker processes; for tests/debug).

    `get_state()` -> {'next_step': int} (JSON-ready); `set_state(state)` continues from there.
    """

    def __init__(self, source, start_step=0):
        self.source = source
        self.step = int(start_step)

    def __iter__(self):
        return self

    def __next__(self):
        if self.step >= len(self.source):
            raise StopIteration
        batch = self.source[self.step]
        self.step += 1
        return batch

    def get_state(self):
        return {"next_step": int(self.step)}

    def set_state(self, state):
        self.step = int(state["next_step"])


class _OffsetSource:
    """`source[start + i]`: lets a grain DataLoader begin at any step."""

    def __init__(self, source, start):
        self.source, self.start = source, int(start)

    def __len__(self):
        return max(len(self.source) - self.start, 0)

    def __getitem__(self, i):
        return self.source[self.start + int(i)]


class GrainBatchIterator:
    """Batches from a grain `DataLoader` with `worker_count` worker processes.

    Each grain record is a whole batch (a pure function of the step), so the worker processes
    assemble different steps in parallel and grain returns them in step order. State is the
    next step, `{'next_step': int}`: `set_state` starts a new DataLoader there, so a resumed run
    sees exactly the batches it would have seen (what grain's own `get_state` would give,
    without tying checkpoints to grain's internal format).
    """

    def __init__(self, source, worker_count=2, start_step=0, worker_buffer_size=2, read_threads=1):
        self.source = source
        self.worker_count = int(worker_count)
        self.worker_buffer_size = int(worker_buffer_size)
        self.read_threads = int(read_threads)
        self._start(start_step)

    def _start(self, step):
        import grain.python as grain
        from absl import flags

        if not flags.FLAGS.is_parsed():
            # grain reads its absl flags; outside an absl app (tests, notebooks) use defaults.
            flags.FLAGS.mark_as_parsed()
        self.step = int(step)
        view = _OffsetSource(self.source, self.step)
        if len(view) == 0:
            self._it = iter(())
            return
        sampler = grain.IndexSampler(
            num_records=len(view),
            shard_options=grain.NoSharding(),
            shuffle=False,
            num_epochs=1,
            seed=0,
        )
        loader = grain.DataLoader(
            data_source=view,
            sampler=sampler,
            operations=(),
            worker_count=self.worker_count,
            worker_buffer_size=self.worker_buffer_size,
            read_options=grain.ReadOptions(
                num_threads=self.read_threads, prefetch_buffer_size=max(self.read_threads, 1)
            ),
        )
        self._it = iter(loader)

    def __iter__(self):
        return self

    def __next__(self):
        batch = next(self._it)
        self.step += 1
        return batch

    def get_state(self):
        return {"next_step": int(self.step)}

    def set_state(self, state):
        self.close()
        self._start(int(state["next_step"]))

    def close(self):
        # Dropping the grain iterator stops its worker processes.
        self._it = None


def make_train_iterator(
    records,
    config=LoaderConfig(),
    num_steps=10**9,
    start_step=0,
    worker_count=0,
    process_index=None,
    process_count=None,
):
    """The training batch iterator: grain workers when `worker_count > 0`, else in-process."""
    source = DetectionBatchSource(records, config, num_steps, process_index, process_count)
    if worker_count > 0:
        return GrainBatchIterator(source, worker_count=worker_count, start_step=start_step)
    return NumpyBatchIterator(source, start_step=start_step)
