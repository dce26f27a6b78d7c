"""Class-agnostic COCO ground truth from the benchmarks' official files (mode=prepare_gt:
modes/prepare_gt.py).

    python -m hassod_jax.main --config configs/prepare_gt.py --workdir W \
        --config.format=lvis --config.input=/data/lvis/lvis_v1_val.json

Writes one COCO instance JSON with the single
category {id 1, "fg"} (default `W/<format>_cls_agnostic.json`) and a summary beside it
(`<output>.summary.json`: images, instances, per image, what was dropped and why, with the
first few records of each reason). The original HASSOD evaluates on such files, prepared
offline "following CutLER" with rules it does not publish; the rules used here are written
out below and in docs/reproduce.md.

Common rules (every format):
- every category maps to 1; `iscrowd` is kept (0 where the source has none);
- masks are written as compressed RLE (`counts` a str): polygons go through pycocotools
  (`frPyObjects` + `merge`), uncompressed RLE is compressed, compressed RLE is checked (its
  `size` against the image's, its runs summing to height x width) and kept as it is;
- `area` and `bbox` are the source's where it has valid ones (COCOeval's area ranges use the
  ground truth's `area`, so the official value is kept), else computed from the mask
  (pycocotools `area` / `toBbox`) or, for boxes, w x h;
- annotation ids are renumbered 1..N in output order; images keep their ids and get
  `id, file_name, height, width` only;
- a malformed record (a missing field, no usable polygon, an RLE of the wrong size, a box
  with no area, an annotation of an unknown image) is skipped and counted in the summary;
  with `--config.strict=True` it stops the run with one line naming the file and the record.
- a polygon part with fewer than 3 points or an odd number of coordinates is dropped from its
  annotation and counted ('polygon parts dropped (...)', one reason each); the annotation
  goes only when no part is left. This is detectron2's `load_coco_json` rule, which CutLER
  copies (`len(poly) % 2 == 0 and len(poly) >= 6`). A dropped part is not a skipped record:
  strict mode counts it and goes on.

Formats (`--config.format`), `--config.input` and what each reads:
- `coco`: `instances_val2017.json` (images with `file_name`; polygons, crowd RLE).
- `lvis`: LVIS v1 `lvis_v1_val.json` (images with `coco_url`, no `file_name`; polygons;
  no `iscrowd`; per-image `not_exhaustive_category_ids` / `neg_category_ids`, which name
  categories and mean nothing for one class: they are dropped and the images carrying them
  counted). `file_name` is the URL's last two parts (`val2017/000000397133.jpg`; the default
  `--config.lvis_file_name=split`), so the COCO folder is the one image root for LVIS v1
  val's images, which come from both train2017 and val2017: detectron2's LVIS loader builds
  its paths so, and CutLER (and HASSOD after it) registers its class-agnostic LVIS file with
  the COCO folder as image root. `last` gives the URL's last part (`000000397133.jpg`): the
  plain COCO-loader convention, for one folder that holds the images of both splits.
- `coco_lvis`: `input` = COCO's instances_val2017.json, `lvis_json` = lvis_v1_val.json; on
  the images both hold, every COCO instance and the LVIS instances that `dedup_rule` keeps:
  `vs_coco` (ours, the default) those whose mask IoU with every COCO instance of the image
  is below `dedup_iou` (0.9); `cutler` (the merge of CutLER's get_self_training_ann.py)
  those whose IoU with every instance kept so far (COCO's, then the LVIS ones kept before
  it in file order) is below 0.5. The summary gives both rules' counts (`dedup_rules`).
- `objects365`: Objects365 v2 `zhiyuan_objv2_val.json` (COCO-like, boxes only; `iscrowd`
  kept; `isfake` / `isreflected` are not used) -> box-only ground truth.
- `sa1b`: a folder of SA-1B per-image JSONs (`sa_<n>.json`: `image` {image_id, width, height,
  file_name}, `annotations` [{segmentation (compressed RLE), bbox, area, ...}]); files in
  natural order of their names (sa_2 before sa_10); `--config.max_images=N` takes the first N.
- `uvo`: a UVO v1.0 file: the frame set (COCO form, e.g. `UVO_frame_val.json`) is read as
  `coco`; a video file (YouTube-VIS form: `videos` with `file_names`, annotations with
  per-frame `segmentations` / `bboxes` / `areas`, null where the object is not annotated)
  becomes one image per frame that holds at least one annotation (ids 1.. in video, frame
  order; file_name the video's `file_names[t]`).
- `kitti`: the KITTI object `training` folder (`label_2/<id>.txt`, `image_2/<id>.png`):
  one box per label line (`type truncated occluded alpha left top right bottom ...`, 15
  fields, a 16th score tolerated), bbox [left, top, right - left, bottom - top]; `DontCare`
  regions become `iscrowd` 1 (`--config.kitti_dontcare=drop` drops them); image sizes from
  the image files' headers; file_name `image_2/<id>.png` (relative to `input`).
`--config.max_images=N` keeps the first N images of any format (file order; sorted for sa1b).
"""

import math
import os
import re

import numpy as np

from hassod_jax import utils
from hassod_jax.data.coco import FG_CATEGORY

FORMATS = ("coco", "lvis", "coco_lvis", "objects365", "sa1b", "uvo", "kitti")
MASK_FORMATS = ("coco", "lvis", "coco_lvis", "sa1b", "uvo")
KITTI_FIELDS = 15
POLYGON_PARTS_DROPPED = "polygon parts dropped (fewer than 3 points)"
POLYGON_PARTS_ODD = "polygon parts dropped (odd number of coordinates)"
NO_VALID_POLYGON = "no polygon with 3 or more points and an even number of coordinates"
DEDUP_RULES = ("vs_coco", "cutler")
CUTLER_MERGE_IOU = 0.5  # CutLER's get_self_training_ann.py: a mask joins below this IoU


def _mask_utils():
    import pycocotools.mask as mask_utils

    return mask_utils


# ----------------------------------------------------------------------------------------------
# Problems: a counted skip, or (strict) a one-line error naming the file and the record.


class Problems:
    """Counts skipped records by reason (with the first `max_examples` of each); in strict
    mode the first problem raises InputError `<source>: <record>: <reason>`."""

    def __init__(self, strict=False, max_examples=5):
        self.strict = bool(strict)
        self.max_examples = int(max_examples)
        self.counts = {}
        self.examples = {}

    def __call__(self, source, record, reason, detail=""):
        text = f"{reason} ({detail})" if detail else reason
        if self.strict:
            raise utils.InputError(
                f"{source}: {record}: {text} (--config.strict=False skips such records and "
                "counts them in the summary)"
            )
        self.counts[reason] = self.counts.get(reason, 0) + 1
        shown = self.examples.setdefault(reason, [])
        if len(shown) < self.max_examples:
            shown.append(f"{source}: {record}" + (f" ({detail})" if detail else ""))

    def parts_dropped(self, source, record, reason, n):
        """`n` polygon parts dropped from an annotation that keeps others: counted, never an
        error (strict mode stops only at what normal mode skips whole)."""
        self.counts[reason] = self.counts.get(reason, 0) + n
        shown = self.examples.setdefault(reason, [])
        if len(shown) < self.max_examples:
            shown.append(f"{source}: {record} ({n})")

    def summary(self):
        return {"dropped": dict(self.counts), "examples": dict(self.examples)}


# ----------------------------------------------------------------------------------------------
# Segmentations, boxes, areas.


def rle_string_counts(s):
    """The run lengths of a COCO compressed RLE string (pycocotools' `rleFrString`), as an
    int64 array; ValueError for a string that is not one (bad characters, truncated, a
    negative run)."""
    if isinstance(s, bytes):
        s = s.decode("ascii")
    try:
        c = np.frombuffer(s.encode("ascii"), np.uint8).astype(np.int64) - 48
    except UnicodeEncodeError:
        raise ValueError("RLE counts hold non-ASCII characters") from None
    if c.size == 0:
        return np.zeros(0, np.int64)
    if (c < 0).any() or (c > 63).any():
        raise ValueError("RLE counts hold characters outside '0'..'o'")
    more = (c & 0x20) != 0
    if more[-1]:
        raise ValueError("RLE counts end inside a number")
    ends = ~more
    group = np.concatenate([[0], np.cumsum(ends)[:-1]])
    starts = np.concatenate([[True], ends[:-1]])
    idx = np.arange(c.size)
    k = idx - np.maximum.accumulate(np.where(starts, idx, 0))
    if k.max() > 11:
        raise ValueError("RLE counts hold a number longer than 12 characters")
    x = np.zeros(int(ends.sum()), np.int64)
    np.add.at(x, group, (c & 0x1F) << (5 * k))
    neg = (c[ends] & 0x10) != 0
    x[neg] |= np.left_shift(np.int64(-1), 5 * (k[ends][neg] + 1))
    # cnts[m] += cnts[m - 2] for m > 2: running sums along the odd indices from 1 and along
    # the even indices from 2 (cnts[0] stands alone).
    if x.size > 3:
        x[1::2] = np.cumsum(x[1::2])
        x[2::2] = np.cumsum(x[2::2])
    if (x < 0).any():
        raise ValueError("RLE counts hold a negative run")
    return x


def _is_number(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def convert_segmentation(segm, h, w):
    """A COCO segmentation -> (compressed RLE dict with str counts, None, parts dropped), or
    (None, (reason, detail), parts dropped) for one that is malformed.

    As detectron2's `load_coco_json` (and CutLER's copy of it), a polygon part with an odd
    number of coordinates or fewer than 3 points is dropped and the others are kept; the
    segmentation fails only when none is left. `parts dropped` is {reason: count}."""
    mask_utils = _mask_utils()
    if isinstance(segm, list):
        if not segm:
            return None, ("empty polygon list", ""), {}
        polys, dropped = [], {}
        for p in segm:
            if not isinstance(p, list) or not all(_is_number(v) for v in p):
                return None, ("polygon that is not a list of numbers", ""), {}
            why = POLYGON_PARTS_ODD if len(p) % 2 else POLYGON_PARTS_DROPPED if len(p) < 6 else ""
            if why:
                dropped[why] = dropped.get(why, 0) + 1
                continue
            polys.append([float(v) for v in p])
        if not polys:
            return None, (NO_VALID_POLYGON, f"{sum(dropped.values())} part(s)"), dropped
        rle = mask_utils.merge(mask_utils.frPyObjects(polys, h, w))
        return _json_rle(rle, h, w), None, dropped
    elif isinstance(segm, dict) and "counts" in segm and "size" in segm:
        size = segm["size"]
        if not (isinstance(size, list) and len(size) == 2 and list(size) == [h, w]):
            return (
                None,
                ("RLE size differs from the image size", f"RLE {size}, image [{h}, {w}]"),
                {},
            )
        counts = segm["counts"]
        if isinstance(counts, list):
            if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in counts):
                return None, ("uncompressed RLE counts that are not non-negative integers", ""), {}
            total = sum(counts)
            if total != h * w:
                return None, ("RLE runs do not sum to height x width", f"{total} != {h * w}"), {}
            rle = mask_utils.frPyObjects({"size": [h, w], "counts": counts}, h, w)
            return _json_rle(rle, h, w), None, {}
        elif isinstance(counts, (str, bytes)):
            try:
                total = int(rle_string_counts(counts).sum())
            except ValueError as e:
                return None, ("malformed RLE string", str(e)), {}
            if total != h * w:
                return None, ("RLE runs do not sum to height x width", f"{total} != {h * w}"), {}
            counts = counts.decode("ascii") if isinstance(counts, bytes) else counts
            return {"size": [h, w], "counts": counts}, None, {}
        else:
            return None, ("RLE counts neither a list nor a string", type(counts).__name__), {}
    else:
        return None, ("segmentation neither polygons nor RLE", type(segm).__name__), {}


def _json_rle(rle, h, w):
    counts = rle["counts"]
    return {
        "size": [h, w],
        "counts": counts.decode("ascii") if isinstance(counts, bytes) else counts,
    }


def _valid_box(b):
    return isinstance(b, (list, tuple)) and len(b) == 4 and all(_is_number(v) for v in b)


def _iscrowd(a):
    v = a.get("iscrowd", 0)
    if isinstance(v, bool) or v in (0, 1):
        return int(v), None
    return None, f"iscrowd {v!r} (not 0 or 1)"


class _Builder:
    """Collects images and annotations in output order, checking each record."""

    def __init__(self, problems, masks):
        self.problems = problems
        self.masks = masks
        self.images = []
        self.sizes = {}
        self.annotations = []

    def add_image(self, source, record, image_id, file_name, height, width, extra=None):
        """Returns True when the image was added."""
        if image_id is None:
            self.problems(source, record, "image without 'id'")
            return False
        if isinstance(image_id, bool) or not isinstance(image_id, (int, str)):
            self.problems(source, record, "image with an invalid 'id'", f"{image_id!r}")
            return False
        if image_id in self.sizes:
            self.problems(source, record, "duplicate image id", f"id {image_id}")
            return False
        if not isinstance(file_name, str) or not file_name:
            self.problems(source, record, "image without 'file_name'")
            return False
        for name, v in (("height", height), ("width", width)):
            if v is None:
                self.problems(source, record, f"image without '{name}'")
                return False
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                self.problems(source, record, f"image with an invalid '{name}'", f"{v!r}")
                return False
        self.sizes[image_id] = (height, width)
        self.images.append(
            {
                "id": image_id,
                "file_name": file_name,
                "height": height,
                "width": width,
                **(extra or {}),
            }
        )
        return True

    def convert_annotation(self, source, record, a):
        """One annotation -> the output dict (without id), or None after a counted problem."""
        p = self.problems
        if not isinstance(a, dict):
            p(source, record, "annotation that is not an object")
            return None
        if "image_id" not in a:
            p(source, record, "annotation without 'image_id'")
            return None
        size = self.sizes.get(a["image_id"])
        if size is None:
            p(
                source,
                record,
                "annotation of an unknown or skipped image",
                f"image_id {a['image_id']!r}",
            )
            return None
        h, w = size
        crowd, why = _iscrowd(a)
        if why:
            p(source, record, "invalid iscrowd", why)
            return None
        out = {"image_id": a["image_id"], "category_id": 1, "iscrowd": crowd}
        rle = None
        if self.masks:
            if "segmentation" not in a or a["segmentation"] is None:
                p(source, record, "annotation without 'segmentation'")
                return None
            rle, why, dropped = convert_segmentation(a["segmentation"], h, w)
            if why:
                p(source, record, *why)
                return None
            for reason, n in dropped.items():
                p.parts_dropped(source, record, reason, n)
        box = a.get("bbox")
        if box is not None and not _valid_box(box):
            p(source, record, "bbox that is not 4 numbers", f"{box!r}")
            return None
        if box is None:
            if rle is None:
                p(source, record, "annotation without 'bbox'")
                return None
            box = [float(v) for v in _mask_utils().toBbox(rle)]
        box = [float(v) for v in box]
        if rle is None and (box[2] <= 0 or box[3] <= 0):
            p(source, record, "box with no area", f"bbox {box}")
            return None
        area = a.get("area")
        if not _is_number(area) or area < 0:
            if rle is not None:
                area = float(_mask_utils().area(rle))
            else:
                area = box[2] * box[3]
        out["bbox"] = box
        out["area"] = float(area)
        if rle is not None:
            out["segmentation"] = rle
        return out

    def add_annotation(self, source, record, a):
        out = self.convert_annotation(source, record, a)
        if out is not None:
            self.annotations.append(out)
        return out


def _record(kind, i, obj):
    rid = obj.get("id") if isinstance(obj, dict) else None
    return f"{kind}[{i}]" + (f" (id {rid})" if rid is not None else "")


def _read_coco_like(path, what):
    data = utils.read_json(path, what=what)
    if not isinstance(data, dict):
        raise utils.InputError(f"{what} {path}: expected a JSON object, got {type(data).__name__}")
    for key in ("images", "annotations"):
        if not isinstance(data.get(key), list):
            raise utils.InputError(f"{what} {path}: no {key!r} list (is this the right file?)")
    return data


def _first_images(images, max_images):
    return images if max_images is None or max_images < 0 else images[:max_images]


def _coco_file_name(im):
    name = im.get("file_name")
    if not isinstance(name, str) or not name:
        return None, "image without 'file_name'"
    return name, None


def lvis_file_name(im, rule="split"):
    """LVIS images carry `coco_url` (http://images.cocodataset.org/val2017/000000397133.jpg)
    and no file_name: 'last' -> '000000397133.jpg', 'split' -> 'val2017/000000397133.jpg'."""
    url = im.get("coco_url")
    if not isinstance(url, str) or "/" not in url.rstrip("/"):
        name = im.get("file_name")
        if isinstance(name, str) and name:
            return name, None
        return None, "image without 'coco_url' (or 'file_name')"
    parts = url.rstrip("/").split("/")
    if rule == "last":
        return parts[-1], None
    if rule == "split":
        return "/".join(parts[-2:]), None
    raise utils.ConfigError(f"--config.lvis_file_name must be 'last' or 'split', got {rule!r}")


# ----------------------------------------------------------------------------------------------
# The converters. Each returns (images, annotations, format-specific summary entries).


def _coco_like(path, data, problems, masks, file_name_of, max_images=-1, image_ids=None):
    """Images then annotations of a COCO-like dict into a _Builder. Only the first
    `max_images` images, and only those in `image_ids` when given, are read, with the
    annotations of those images: the others are left out on purpose and are no problem.
    Records are named by their index in the file."""
    builder = _Builder(problems, masks=masks)
    picked = [
        (i, im)
        for i, im in enumerate(data["images"])
        if image_ids is None or (isinstance(im, dict) and im.get("id") in image_ids)
    ]
    limited = max_images is not None and max_images >= 0
    picked = picked[:max_images] if limited else picked
    wanted = None
    if limited or image_ids is not None:
        wanted = {im.get("id") for _, im in picked if isinstance(im, dict)}
    for i, im in picked:
        rec = _record("images", i, im)
        if not isinstance(im, dict):
            problems(path, rec, "image that is not an object")
            continue
        name, why = file_name_of(im)
        if why:
            problems(path, rec, why)
            continue
        builder.add_image(path, rec, im.get("id"), name, im.get("height"), im.get("width"))
    for i, a in enumerate(data["annotations"]):
        if wanted is not None and isinstance(a, dict) and a.get("image_id") not in wanted:
            continue
        builder.add_annotation(path, _record("annotations", i, a), a)
    return builder


def convert_coco(path, problems, max_images=-1):
    data = _read_coco_like(path, "COCO instances file")
    b = _coco_like(path, data, problems, True, _coco_file_name, max_images)
    return b.images, b.annotations, {"source_categories": len(data.get("categories") or [])}


def convert_lvis(path, problems, max_images=-1, file_name_rule="split"):
    data = _read_coco_like(path, "LVIS file")
    images = data["images"][: max_images if max_images is not None and max_images >= 0 else None]
    extra = {
        "images_with_not_exhaustive_category_ids": sum(
            1 for im in images if isinstance(im, dict) and im.get("not_exhaustive_category_ids")
        ),
        "images_with_neg_category_ids": sum(
            1 for im in images if isinstance(im, dict) and im.get("neg_category_ids")
        ),
        "source_categories": len(data.get("categories") or []),
        "lvis_file_name": file_name_rule,
    }
    b = _coco_like(
        path, data, problems, True, lambda im: lvis_file_name(im, file_name_rule), max_images
    )
    return b.images, b.annotations, extra


def _iou(a, b):
    """Mask IoU matrix (len(a), len(b)) of compressed RLEs, every mask taken as non-crowd."""
    if not a or not b:
        return np.zeros((len(a), len(b)))
    return np.asarray(_mask_utils().iou(a, b, [0] * len(b))).reshape(len(a), len(b))


def lvis_duplicates(l_masks, c_masks, dedup_iou=0.9):
    """Which LVIS masks of one image each rule leaves out, as {rule: (L,) bool}:
    - 'vs_coco' (ours): mask IoU >= dedup_iou with a COCO mask of the image;
    - 'cutler' (CutLER's get_self_training_ann.py merge): the COCO masks are kept, then each
      LVIS mask in file order joins only when its IoU with every mask kept so far is below
      CUTLER_MERGE_IOU (0.5), so near-copies inside LVIS go too."""
    iou_lc, iou_ll = _iou(l_masks, c_masks), _iou(l_masks, l_masks)
    vs_coco = (
        iou_lc.max(axis=1) >= float(dedup_iou) if c_masks else np.zeros(len(l_masks), bool)
    )
    cutler = np.zeros(len(l_masks), bool)
    kept = []
    for i in range(len(l_masks)):
        worst = max([*iou_lc[i], *iou_ll[i, kept]], default=0.0)
        cutler[i] = worst >= CUTLER_MERGE_IOU
        if not cutler[i]:
            kept.append(i)
    return {"vs_coco": vs_coco, "cutler": cutler}


def convert_coco_lvis(
    coco_path, lvis_path, problems, dedup_iou=0.9, max_images=-1, dedup_rule="vs_coco"
):
    """COCO and LVIS on the images both hold; every COCO instance, and the LVIS instances the
    duplicate rule `dedup_rule` keeps (`lvis_duplicates`). The summary holds both rules'
    counts on this input."""
    if not 0.0 < float(dedup_iou) <= 1.0:
        raise utils.ConfigError(f"--config.dedup_iou must be in (0, 1], got {dedup_iou}")
    if dedup_rule not in DEDUP_RULES:
        raise utils.ConfigError(
            f"--config.dedup_rule must be one of {', '.join(DEDUP_RULES)}; got {dedup_rule!r}"
        )
    coco = _read_coco_like(coco_path, "COCO instances file")
    lvis = _read_coco_like(lvis_path, "LVIS file")
    lvis_ids = {im.get("id") for im in lvis["images"] if isinstance(im, dict)}
    shared = [im for im in coco["images"] if isinstance(im, dict) and im.get("id") in lvis_ids]
    shared = _first_images(shared, max_images)
    shared_ids = {im["id"] for im in shared}
    b_coco = _coco_like(coco_path, coco, problems, True, _coco_file_name, image_ids=shared_ids)
    kept_ids = {im["id"] for im in b_coco.images}
    b_lvis = _coco_like(lvis_path, lvis, problems, True, lvis_file_name, image_ids=kept_ids)
    by_image = {}
    for a in b_coco.annotations:
        by_image.setdefault(a["image_id"], []).append(a)
    lvis_by_image = {}
    for a in b_lvis.annotations:
        lvis_by_image.setdefault(a["image_id"], []).append(a)
    anns, removed = [], dict.fromkeys(DEDUP_RULES, 0)
    for im in b_coco.images:
        c_anns = by_image.get(im["id"], [])
        l_anns = lvis_by_image.get(im["id"], [])
        lvis_size = b_lvis.sizes.get(im["id"])
        if l_anns and lvis_size != (im["height"], im["width"]):
            problems(
                lvis_path,
                f"image {im['id']}",
                "LVIS image size differs from COCO's",
                f"LVIS {lvis_size}, COCO {(im['height'], im['width'])}: its LVIS "
                "instances left out",
            )
            l_anns = []
        for a in c_anns:
            anns.append(dict(a, source="coco"))
        if not l_anns:
            continue
        duplicate = lvis_duplicates(
            [a["segmentation"] for a in l_anns], [a["segmentation"] for a in c_anns], dedup_iou
        )
        for rule, d in duplicate.items():
            removed[rule] += int(d.sum())
        anns.extend(
            dict(a, source="lvis") for a, d in zip(l_anns, duplicate[dedup_rule]) if not d
        )
    n_img = len(b_coco.images)
    candidates = len(anns) + removed[dedup_rule]  # what both rules choose from
    extra = {
        "coco_images": len(coco["images"]),
        "lvis_images": len(lvis["images"]),
        "shared_images": len(shared),
        "coco_instances": len(b_coco.annotations),
        "lvis_instances": len(b_lvis.annotations),
        "dedup_rule": dedup_rule,
        "dedup_iou": float(dedup_iou),
        "duplicates_removed": removed[dedup_rule],
        # Both rules on this input, whichever wrote the file (LVIS instances of an image
        # whose sizes disagree are left out by both and counted under 'dropped').
        "dedup_rules": {
            rule: {
                "instances": candidates - n,
                "instances_per_image": round((candidates - n) / n_img, 4) if n_img else 0.0,
                "duplicates_removed": n,
            }
            for rule, n in removed.items()
        },
    }
    return b_coco.images, anns, extra


def convert_objects365(path, problems, max_images=-1):
    data = _read_coco_like(path, "Objects365 file")
    b = _coco_like(path, data, problems, False, _coco_file_name, max_images)
    return b.images, b.annotations, {"source_categories": len(data.get("categories") or [])}


def _natural_key(name):
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def sa1b_files(folder, max_images=-1):
    """The per-image JSONs of an SA-1B folder in natural name order (the first N)."""
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"SA-1B folder not found: {folder} (set --config.input)")
    names = sorted(
        (n for n in os.listdir(folder) if n.endswith(".json") and not n.startswith(".")),
        key=_natural_key,
    )
    if not names:
        raise FileNotFoundError(f"SA-1B folder {folder} holds no per-image .json files")
    return [os.path.join(folder, n) for n in _first_images(names, max_images)]


def convert_sa1b(folder, problems, max_images=-1):
    builder = _Builder(problems, masks=True)
    files = sa1b_files(folder, max_images)
    for path in files:
        try:
            data = utils.read_json(path, what="SA-1B file")
        except utils.InputError as e:
            problems(path, "the file", "unreadable JSON", str(e).split(": ", 1)[-1][:120])
            continue
        im = data.get("image") if isinstance(data, dict) else None
        if not isinstance(im, dict):
            problems(path, "the file", "no 'image' object")
            continue
        if not isinstance(data.get("annotations"), list):
            problems(path, "the file", "no 'annotations' list")
            continue
        if not builder.add_image(
            path,
            "image",
            im.get("image_id"),
            im.get("file_name"),
            im.get("height"),
            im.get("width"),
        ):
            continue
        for i, a in enumerate(data["annotations"]):
            if isinstance(a, dict):
                a = dict(a, image_id=im["image_id"])
            builder.add_annotation(path, _record("annotations", i, a), a)
    return builder.images, builder.annotations, {"files": len(files)}


def convert_uvo(path, problems, max_images=-1):
    data = utils.read_json(path, what="UVO file")
    if isinstance(data, dict) and "videos" in data:
        return _convert_ytvis(path, data, problems, max_images)
    if isinstance(data, dict) and "images" in data:
        data = _read_coco_like(path, "UVO frame file")
        b = _coco_like(path, data, problems, True, _coco_file_name, max_images)
        return b.images, b.annotations, {"uvo_form": "frames (COCO)"}
    raise utils.InputError(
        f"UVO file {path}: neither a frame file (COCO 'images') nor a video file ('videos')"
    )


def _convert_ytvis(path, data, problems, max_images):
    """YouTube-VIS form: one image per (video, frame) with at least one annotation."""
    if not isinstance(data.get("annotations"), list) or not isinstance(data["videos"], list):
        raise utils.InputError(f"UVO video file {path}: 'videos' and 'annotations' lists needed")
    videos = {}
    for i, v in enumerate(data["videos"]):
        rec = _record("videos", i, v)
        if not isinstance(v, dict) or "id" not in v:
            problems(path, rec, "video without 'id'")
            continue
        if not isinstance(v.get("file_names"), list):
            problems(path, rec, "video without 'file_names'")
            continue
        videos[v["id"]] = v
    frames = {}  # (video id, t) -> [(record, annotation)]
    for i, a in enumerate(data["annotations"]):
        rec = _record("annotations", i, a)
        if not isinstance(a, dict) or a.get("video_id") not in videos:
            problems(path, rec, "annotation of an unknown video")
            continue
        segs = a.get("segmentations")
        if not isinstance(segs, list):
            problems(path, rec, "annotation without 'segmentations'")
            continue
        boxes, areas = a.get("bboxes") or [], a.get("areas") or []
        for t, s in enumerate(segs):
            if s is None:
                continue
            one = {"image_id": None, "segmentation": s, "iscrowd": a.get("iscrowd", 0)}
            if t < len(boxes) and boxes[t] is not None:
                one["bbox"] = boxes[t]
            if t < len(areas) and areas[t] is not None:
                one["area"] = areas[t]
            frames.setdefault((a["video_id"], t), []).append((f"{rec} frame {t}", one))
    builder = _Builder(problems, masks=True)
    next_id = 1
    order = []
    for vid in videos:
        for t in sorted(t for (x, t) in frames if x == vid):
            order.append((vid, t))
    for vid, t in _first_images(order, max_images):
        v = videos[vid]
        name = v["file_names"][t] if t < len(v["file_names"]) else None
        extra = {"video_id": vid, "frame_index": t}
        if builder.add_image(
            path, f"video {vid} frame {t}", next_id, name, v.get("height"), v.get("width"), extra
        ):
            for rec, one in frames[(vid, t)]:
                builder.add_annotation(path, rec, dict(one, image_id=next_id))
        next_id += 1
    return (
        builder.images,
        builder.annotations,
        {"uvo_form": "videos (YouTube-VIS)", "videos": len(videos)},
    )


def convert_kitti(folder, problems, max_images=-1, dontcare="crowd"):
    from PIL import Image

    if dontcare not in ("crowd", "drop"):
        raise utils.ConfigError(f"--config.kitti_dontcare must be crowd or drop, got {dontcare!r}")
    label_dir, image_dir = os.path.join(folder, "label_2"), os.path.join(folder, "image_2")
    for d in (label_dir, image_dir):
        if not os.path.isdir(d):
            raise FileNotFoundError(
                f"KITTI folder {folder} has no {os.path.basename(d)}/ (set --config.input to "
                "the object benchmark's 'training' folder)"
            )
    names = sorted(n for n in os.listdir(label_dir) if n.endswith(".txt"))
    builder = _Builder(problems, masks=False)
    dropped_dontcare = 0
    for name in _first_images(names, max_images):
        stem = os.path.splitext(name)[0]
        path = os.path.join(label_dir, name)
        image_name = next(
            (
                f"image_2/{stem}{ext}"
                for ext in (".png", ".jpg")
                if os.path.isfile(os.path.join(folder, "image_2", stem + ext))
            ),
            None,
        )
        if image_name is None:
            problems(path, "the file", "image file missing", f"image_2/{stem}.png")
            continue
        try:
            with Image.open(os.path.join(folder, image_name)) as img:
                width, height = img.size
        except OSError as e:
            problems(path, "the file", "unreadable image", f"{image_name}: {e}")
            continue
        image_id = int(stem) if stem.isdigit() else stem
        if not builder.add_image(path, "the file", image_id, image_name, height, width):
            continue
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
        for k, line in enumerate(lines):
            rec = f"line {k + 1}"
            fields = line.split()
            if not fields:
                continue
            if len(fields) not in (KITTI_FIELDS, KITTI_FIELDS + 1):
                problems(
                    path, rec, f"label line without {KITTI_FIELDS} fields", f"{len(fields)} fields"
                )
                continue
            try:
                left, top, right, bottom = (float(v) for v in fields[4:8])
            except ValueError:
                problems(path, rec, "label line with a non-numeric box", " ".join(fields[4:8]))
                continue
            crowd = 0
            if fields[0] == "DontCare":
                if dontcare == "drop":
                    dropped_dontcare += 1
                    continue
                crowd = 1
            builder.add_annotation(
                path,
                rec,
                {
                    "image_id": image_id,
                    "iscrowd": crowd,
                    "kitti_type": fields[0],
                    "bbox": [left, top, right - left, bottom - top],
                },
            )
    return (
        builder.images,
        builder.annotations,
        {
            "kitti_dontcare": dontcare,
            "dontcare_dropped": dropped_dontcare,
            "label_files": len(names),
        },
    )


# ----------------------------------------------------------------------------------------------
# Assembling, the mode.


def assemble(images, annotations, info):
    """The class-agnostic COCO dict: annotation ids 1..N in order, category {1, 'fg'}."""
    anns = []
    for i, a in enumerate(annotations):
        out = {"id": i + 1}
        out.update({k: v for k, v in a.items() if k not in ("id", "kitti_type")})
        anns.append(out)
    return {
        "info": info,
        "images": list(images),
        "annotations": anns,
        "categories": [dict(FG_CATEGORY)],
    }


def prepare(
    fmt,
    input_path,
    *,
    lvis_json="",
    max_images=-1,
    dedup_iou=0.9,
    dedup_rule="vs_coco",
    lvis_file_name_rule="split",
    kitti_dontcare="crowd",
    strict=False,
    max_examples=5,
):
    """Converts one benchmark; returns (COCO dict, summary dict)."""
    if fmt not in FORMATS:
        raise utils.ConfigError(f"--config.format must be one of {', '.join(FORMATS)}; got {fmt!r}")
    if not input_path:
        raise utils.ConfigError(f"--config.input is required for format {fmt}")
    if not os.path.exists(input_path):
        raise FileNotFoundError(f"--config.input not found: {input_path}")
    problems = Problems(strict=strict, max_examples=max_examples)
    inputs = {"input": str(input_path)}
    if fmt == "coco":
        images, anns, extra = convert_coco(input_path, problems, max_images)
    elif fmt == "lvis":
        images, anns, extra = convert_lvis(input_path, problems, max_images, lvis_file_name_rule)
    elif fmt == "coco_lvis":
        if not lvis_json:
            raise utils.ConfigError(
                "format coco_lvis needs --config.lvis_json=lvis_v1_val.json (and --config.input="
                "instances_val2017.json)"
            )
        if not os.path.exists(lvis_json):
            raise FileNotFoundError(f"--config.lvis_json not found: {lvis_json}")
        inputs["lvis_json"] = str(lvis_json)
        images, anns, extra = convert_coco_lvis(
            input_path, lvis_json, problems, dedup_iou, max_images, dedup_rule
        )
    elif fmt == "objects365":
        images, anns, extra = convert_objects365(input_path, problems, max_images)
    elif fmt == "sa1b":
        images, anns, extra = convert_sa1b(input_path, problems, max_images)
    elif fmt == "uvo":
        images, anns, extra = convert_uvo(input_path, problems, max_images)
    else:
        images, anns, extra = convert_kitti(input_path, problems, max_images, kitti_dontcare)
    info = {
        "description": f"class-agnostic ground truth ({fmt}) written by hassod_jax prepare_gt",
        "format": fmt,
        **inputs,
    }
    data = assemble(images, anns, info)
    n_img, n_ann = len(images), len(anns)
    summary = {
        "format": fmt,
        **inputs,
        "images": n_img,
        "instances": n_ann,
        "instances_per_image": round(n_ann / n_img, 4) if n_img else 0.0,
        "crowd": sum(1 for a in anns if a.get("iscrowd")),
        "images_without_instances": n_img - len({a["image_id"] for a in anns}),
        "masks": fmt in MASK_FORMATS,
        "max_images": max_images,
        "strict": bool(strict),
        **extra,
        **problems.summary(),
    }
    return data, summary


def summary_path(output):
    stem = output[:-5] if output.endswith(".json") else output
    return stem + ".summary.json"
