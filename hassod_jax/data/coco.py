"""COCO-format JSON helpers: loading with clear errors, masks from annotations, writing.

Segmentations follow the COCO conventions that pycocotools implements:
- compressed RLE `{"size": [h, w], "counts": str | bytes}`,
- uncompressed RLE `{"size": [h, w], "counts": [int, ...]}` (column-major run lengths),
- polygons `[[x0, y0, x1, y1, ...], ...]` in pixel coordinates.
Boxes are `[x, y, w, h]` in pixels (COCO xywh).
"""

import copy

import numpy as np

from hassod_jax.utils import InputError, read_json

FG_CATEGORY = {"id": 1, "name": "fg", "supercategory": "fg"}


def _mask_utils():
    # Imported lazily: pycocotools is not needed by every stage (e.g. GPU benchmark hosts).
    import pycocotools.mask as mask_utils

    return mask_utils


def validate_coco_dict(data, source="COCO data"):
    """Checks the top-level structure of a COCO dict; raises InputError (a ValueError)
    naming `source`.

    Requires a dict with an 'images' list of dicts that have 'id'. 'annotations' is required
    and must be a list (an image-list-only file may pass `annotations: []`).
    """
    if not isinstance(data, dict):
        raise InputError(
            f"{source}: expected a JSON object at the top level, got {type(data).__name__}"
        )
    for key in ("images", "annotations"):
        if key not in data:
            raise InputError(
                f"{source}: missing the required key {key!r} (a COCO file has "
                "'images' and 'annotations' lists)"
            )
        if not isinstance(data[key], list):
            raise InputError(f"{source}: {key!r} must be a list, got {type(data[key]).__name__}")
    for i, img in enumerate(data["images"]):
        if not isinstance(img, dict) or "id" not in img:
            raise InputError(f"{source}: images[{i}] has no 'id'")
    ids = [img["id"] for img in data["images"]]
    if len(set(ids)) != len(ids):
        dup = sorted({i for i in ids if ids.count(i) > 1})[:5]
        raise InputError(f"{source}: duplicate image ids, e.g. {dup}")
    for i, ann in enumerate(data["annotations"]):
        if not isinstance(ann, dict) or "image_id" not in ann:
            raise InputError(f"{source}: annotations[{i}] has no 'image_id'")
    return data


def load_coco_json(path):
    """Reads and validates a COCO JSON file. Errors name the file and the problem.

    Returns the parsed dict (images, annotations, and whatever else the file holds).
    """
    data = read_json(path, what="COCO JSON file")
    return validate_coco_dict(data, source=f"COCO JSON file {path}")


def image_sizes(data):
    """Returns {image_id: (height, width)} for images that state both."""
    return {
        img["id"]: (int(img["height"]), int(img["width"]))
        for img in data["images"]
        if "height" in img and "width" in img
    }


def segmentation_to_rle(segm, h, w):
    """Any COCO segmentation (polygons, uncompressed or compressed RLE) -> compressed RLE.

    The returned RLE has `counts` as bytes (pycocotools' native form).
    """
    mask_utils = _mask_utils()
    if isinstance(segm, list):
        if len(segm) == 0:
            return mask_utils.encode(np.zeros((h, w, 1), dtype=np.uint8, order="F"))[0]
        polys = [list(map(float, p)) for p in segm]
        return mask_utils.merge(mask_utils.frPyObjects(polys, h, w))
    if isinstance(segm, dict) and "counts" in segm and "size" in segm:
        if list(segm["size"]) != [h, w]:
            raise InputError(
                f"RLE size {list(segm['size'])} does not match the image size {[h, w]}"
            )
        counts = segm["counts"]
        if isinstance(counts, list):
            return mask_utils.frPyObjects(segm, h, w)
        if isinstance(counts, str):
            return {"size": [h, w], "counts": counts.encode("ascii")}
        if isinstance(counts, bytes):
            return {"size": [h, w], "counts": counts}
        raise InputError(
            f"RLE counts must be str, bytes or a list of ints, got {type(counts).__name__}"
        )
    raise InputError(
        "segmentation must be a polygon list or an RLE dict with 'size' and 'counts', "
        f"got {type(segm).__name__}"
    )


def annotation_to_mask(ann, h, w):
    """Decodes `ann['segmentation']` to a (h, w) bool mask (polygons and both RLE forms)."""
    if "segmentation" not in ann:
        raise InputError(f"annotation {ann.get('id', '?')} has no 'segmentation'")
    rle = segmentation_to_rle(ann["segmentation"], h, w)
    return _mask_utils().decode(rle).astype(bool)


def rle_to_json(rle):
    """A pycocotools RLE with bytes counts -> a JSON-ready dict with str counts."""
    counts = rle["counts"]
    if isinstance(counts, bytes):
        counts = counts.decode("ascii")
    return {"size": [int(rle["size"][0]), int(rle["size"][1])], "counts": counts}


def encode_mask(mask):
    """(H, W) bool mask -> dict(segmentation RLE with str counts, area int, bbox [x,y,w,h])."""
    mask_utils = _mask_utils()
    rle = mask_utils.encode(np.asfortranarray(np.asarray(mask, dtype=np.uint8)))
    return {
        "segmentation": rle_to_json(rle),
        "area": int(mask_utils.area(rle)),
        "bbox": [float(v) for v in mask_utils.toBbox(rle)],
    }


def make_coco_dict(images, annotations, categories=None, info=None):
    """Assembles a COCO instance dict with the single class-agnostic category {id 1, 'fg'}.

    images: list of dicts with id, file_name, height, width. annotations: list of dicts;
    `category_id` defaults to 1 and `iscrowd` to 0, missing `id`s are numbered from 1 in order.
    """
    anns = []
    next_id = 1 + max([a["id"] for a in annotations if "id" in a], default=0)
    for a in annotations:
        a = dict(a)
        a.setdefault("category_id", 1)
        a.setdefault("iscrowd", 0)
        if "id" not in a:
            a["id"] = next_id
            next_id += 1
        anns.append(a)
    out = {
        "info": info or {"description": "hassod_jax"},
        "images": list(images),
        "annotations": anns,
        "categories": copy.deepcopy(categories) if categories else [dict(FG_CATEGORY)],
    }
    return out


def to_class_agnostic(data):
    """Copy of a COCO dict with every category mapped to {id 1, 'fg'} (iscrowd kept)."""
    out = dict(data)
    out["annotations"] = [dict(a, category_id=1) for a in data["annotations"]]
    out["categories"] = [dict(FG_CATEGORY)]
    return out
