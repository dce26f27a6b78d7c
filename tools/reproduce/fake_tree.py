"""A generated tree in the official layouts, a few images each, for the reproduction scripts'
dry runs and for their toy run (generated scenes with whole / part / subpart masks):

    ROOT/coco/{train2017,unlabeled2017,val2017}/<12-digit id>.jpg
    ROOT/coco/annotations/instances_val2017.json    COCO: polygons, one crowd RLE, 3 classes
    ROOT/lvis/lvis_v1_val.json                      LVIS v1: coco_url (val2017 and train2017),
                                                    no file_name, no iscrowd, polygons,
                                                    not_exhaustive / neg category ids
    ROOT/objects365/val/zhiyuan_objv2_val.json      Objects365 v2: boxes, isfake, isreflected,
    ROOT/objects365/val/images/v1/patch0/*.jpg      file_name images/v1/patch0/...
    ROOT/sa1b/sa_000000/sa_<n>.{jpg,json}           SA-1B per-image JSONs, compressed RLE
    ROOT/weights/dino_vitbase8_pretrain.pth, dino_resnet50_pretrain.pth   placeholders: zip
                                                    archives with torch's header and no
                                                    tensors (a dry run checks the header only)

    python tools/reproduce/fake_tree.py ROOT [--train 4 --unlabeled 2 --val 3 ...]

`paths(ROOT)` gives the arguments of the scripts for such a tree.
"""

import argparse
import json
import os
import sys
import zipfile

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))


def _polygons(mask):
    """The mask's convex hull as one COCO polygon (x, y pairs over pixel corners): the shape
    of the official polygons, cheap to make (an occluded object's hull covers its hidden part
    too, which a generated benchmark may do)."""
    ys, xs = np.nonzero(mask)
    if ys.size == 0:
        return []
    pts = set()
    for y in np.unique(ys):
        row = xs[ys == y]
        for x in (row.min(), row.max() + 1):
            pts.update({(float(x), float(y)), (float(x), float(y + 1))})
    pts = sorted(pts)

    def half(points):
        out = []
        for p in points:
            while (
                len(out) >= 2
                and (
                    (out[-1][0] - out[-2][0]) * (p[1] - out[-2][1])
                    - (out[-1][1] - out[-2][1]) * (p[0] - out[-2][0])
                )
                <= 0
            ):
                out.pop()
            out.append(p)
        return out

    hull = half(pts)[:-1] + half(pts[::-1])[:-1]  # Andrew's monotone chain
    if len(hull) < 3:
        return []
    return [[v for p in hull for v in p]]


def _rle(mask):
    import pycocotools.mask as mask_utils

    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    box = [float(v) for v in mask_utils.toBbox(rle)]
    return (
        {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")},
        box,
        int(mask_utils.area(rle)),
    )


def _uncompressed(mask):
    flat = mask.astype(np.uint8).flatten(order="F")
    change = np.flatnonzero(np.diff(flat)) + 1
    bounds = np.concatenate([[0], change, [flat.size]])
    runs = np.diff(bounds).tolist()
    if flat[0]:
        runs = [0] + runs
    return {"counts": [int(r) for r in runs], "size": list(mask.shape)}


def _save(img, path):
    from PIL import Image

    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(img).save(path, quality=95)


def _write_json(path, obj):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(obj, f)


def paths(root):
    root = os.path.abspath(root)
    return {
        "coco": os.path.join(root, "coco"),
        "lvis": os.path.join(root, "lvis", "lvis_v1_val.json"),
        "objects365_json": os.path.join(root, "objects365", "val", "zhiyuan_objv2_val.json"),
        "objects365_images": os.path.join(root, "objects365", "val"),
        "sa1b": os.path.join(root, "sa1b", "sa_000000"),
        "dino_vit": os.path.join(root, "weights", "dino_vitbase8_pretrain.pth"),
        "dino_resnet": os.path.join(root, "weights", "dino_resnet50_pretrain.pth"),
    }


def script_args(root):
    """The data arguments of hassod.py / pseudo_labels.py for a generated tree."""
    p = paths(root)
    return [
        "--coco",
        p["coco"],
        "--lvis",
        p["lvis"],
        "--objects365-json",
        p["objects365_json"],
        "--objects365-images",
        p["objects365_images"],
        "--sa1b",
        p["sa1b"],
        "--dino-vit",
        p["dino_vit"],
        "--dino-resnet",
        p["dino_resnet"],
    ]


def write_tree(root, train=4, unlabeled=2, val=3, objects365=2, sa1b=3, size=(96, 128), seed=0):
    """Writes the tree; returns paths(root)."""
    sys.path.insert(0, REPO)
    try:
        from hassod_jax.data.synthetic import make_scene
    finally:
        sys.path.pop(0)
    rng = np.random.default_rng(seed)
    p = paths(root)
    h, w = size

    def scene():
        return make_scene(rng, size, n_objects=(2, 3))

    next_id = 1
    for folder, n in (("train2017", train), ("unlabeled2017", unlabeled)):
        for _ in range(n):
            img, _ = scene()
            _save(img, os.path.join(p["coco"], folder, f"{next_id:012d}.jpg"))
            next_id += 1

    # COCO val2017 with instances_val2017.json; LVIS v1 val on the same images, plus one
    # train2017 image (LVIS v1 val draws from both splits).
    coco_images, coco_anns, lvis_images, lvis_anns = [], [], [], []
    ann_id = 1
    for k in range(val):
        image_id = 100 + k
        name = f"{image_id:012d}.jpg"
        img, regions = scene()
        _save(img, os.path.join(p["coco"], "val2017", name))
        coco_images.append(
            {
                "license": 1,
                "file_name": name,
                "height": h,
                "width": w,
                "id": image_id,
                "coco_url": f"http://images.cocodataset.org/val2017/{name}",
                "date_captured": "2013-11-14 17:02:52",
                "flickr_url": "http://farm4.example/x.jpg",
            }
        )
        lvis_images.append(
            {
                "date_captured": "2013-11-14 17:02:52",
                "id": image_id,
                "license": 1,
                "height": h,
                "width": w,
                "flickr_url": "http://farm4.example/x.jpg",
                "coco_url": f"http://images.cocodataset.org/val2017/{name}",
                "neg_category_ids": [3] if k == 0 else [],
                "not_exhaustive_category_ids": [2] if k == 1 else [],
            }
        )
        for r in regions:
            polys = _polygons(r["mask"])
            if not polys:
                continue
            _, box, area = _rle(r["mask"])
            ann = {"segmentation": polys, "area": float(area), "bbox": box, "image_id": image_id}
            if r["hier_level"] == 0:  # COCO: the whole objects
                coco_anns.append({**ann, "iscrowd": 0, "category_id": 1 + ann_id % 3, "id": ann_id})
                ann_id += 1
                if len(lvis_anns) % 2 == 0:  # LVIS repeats some of them (duplicates)
                    lvis_anns.append({**ann, "category_id": 10, "id": len(lvis_anns) + 1})
            else:  # LVIS: the parts
                lvis_anns.append(
                    {**ann, "category_id": 11 + r["hier_level"], "id": len(lvis_anns) + 1}
                )
        if k == 0:  # one crowd region in COCO's uncompressed RLE form
            crowd = np.zeros((h, w), bool)
            crowd[: h // 6, : w // 6] = True
            coco_anns.append(
                {
                    "segmentation": _uncompressed(crowd),
                    "area": int(crowd.sum()),
                    "iscrowd": 1,
                    "image_id": image_id,
                    "bbox": _rle(crowd)[1],
                    "category_id": 1,
                    "id": ann_id,
                }
            )
            ann_id += 1
    train_name = f"{1:012d}.jpg"
    lvis_images.append(
        {
            "date_captured": "2013-11-14 17:02:52",
            "id": 1,
            "license": 1,
            "height": h,
            "width": w,
            "flickr_url": "http://farm4.example/x.jpg",
            "coco_url": f"http://images.cocodataset.org/train2017/{train_name}",
            "neg_category_ids": [],
            "not_exhaustive_category_ids": [],
        }
    )
    box = [2.0, 2.0, 20.0, 16.0]
    lvis_anns.append(
        {
            "segmentation": [[2.0, 2.0, 22.0, 2.0, 22.0, 18.0, 2.0, 18.0]],
            "area": 320.0,
            "bbox": box,
            "image_id": 1,
            "category_id": 10,
            "id": len(lvis_anns) + 1,
        }
    )
    _write_json(
        os.path.join(p["coco"], "annotations", "instances_val2017.json"),
        {
            "info": {
                "description": "COCO 2017 Dataset (generated)",
                "version": "1.0",
                "year": 2017,
            },
            "licenses": [
                {
                    "url": "http://creativecommons.org/licenses/by/2.0/",
                    "id": 1,
                    "name": "Attribution License",
                }
            ],
            "images": coco_images,
            "annotations": coco_anns,
            "categories": [
                {"supercategory": "thing", "id": i, "name": f"class{i}"} for i in (1, 2, 3)
            ],
        },
    )
    _write_json(
        p["lvis"],
        {
            "info": {"description": "LVIS v1.0 (generated)", "version": "1.0"},
            "licenses": [{"id": 1, "name": "Attribution License", "url": ""}],
            "images": lvis_images,
            "annotations": lvis_anns,
            "categories": [
                {
                    "frequency": "f",
                    "id": i,
                    "synset": f"thing{i}.n.01",
                    "image_count": 1,
                    "instance_count": 1,
                    "synonyms": [f"thing{i}"],
                    "def": "a thing",
                    "name": f"thing{i}",
                }
                for i in (2, 3, 10, 12, 13)
            ],
        },
    )

    # Objects365 v2 val: boxes.
    o_images, o_anns = [], []
    for k in range(objects365):
        image_id = k + 1
        name = f"images/v1/patch0/objects365_v1_{image_id:08d}.jpg"
        img, regions = scene()
        _save(img, os.path.join(p["objects365_images"], name))
        o_images.append(
            {
                "height": h,
                "id": image_id,
                "license": 5,
                "width": w,
                "file_name": name,
                "url": f"http://example/{name}",
            }
        )
        for r in regions:
            if r["hier_level"] == 0:
                _, box, _ = _rle(r["mask"])
                o_anns.append(
                    {
                        "id": len(o_anns) + 1,
                        "iscrowd": 0,
                        "isfake": 0,
                        "area": box[2] * box[3],
                        "isreflected": 0,
                        "bbox": box,
                        "image_id": image_id,
                        "category_id": 1,
                    }
                )
    _write_json(
        p["objects365_json"],
        {
            "images": o_images,
            "annotations": o_anns,
            "categories": [{"name": "Person", "id": 1}],
            "licenses": [{"name": "", "id": 5, "url": ""}],
        },
    )

    # SA-1B: sa_<n>.jpg and sa_<n>.json.
    for k in range(sa1b):
        image_id = k + 1
        img, regions = scene()
        _save(img, os.path.join(p["sa1b"], f"sa_{image_id}.jpg"))
        anns = []
        for j, r in enumerate(regions):
            rle, box, area = _rle(r["mask"])
            anns.append(
                {
                    "id": image_id * 1000 + j,
                    "segmentation": rle,
                    "bbox": box,
                    "area": area,
                    "predicted_iou": 0.9,
                    "stability_score": 0.95,
                    "crop_box": [0.0, 0.0, float(w), float(h)],
                    "point_coords": [[box[0] + box[2] / 2, box[1] + box[3] / 2]],
                }
            )
        _write_json(
            os.path.join(p["sa1b"], f"sa_{image_id}.json"),
            {
                "image": {
                    "image_id": image_id,
                    "width": w,
                    "height": h,
                    "file_name": f"sa_{image_id}.jpg",
                },
                "annotations": anns,
            },
        )

    for key in ("dino_vit", "dino_resnet"):
        # A zip archive as torch.save writes (its header), holding no tensors: enough for a
        # dry run, which checks that a checkpoint is there and looks like one.
        os.makedirs(os.path.dirname(p[key]), exist_ok=True)
        with zipfile.ZipFile(p[key], "w") as z:
            z.writestr("archive/placeholder.txt", "generated by fake_tree.py; no tensors\n")
    return p


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("root")
    for name, default in (
        ("train", 4),
        ("unlabeled", 2),
        ("val", 3),
        ("objects365", 2),
        ("sa1b", 3),
    ):
        ap.add_argument(f"--{name}", type=int, default=default)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    p = write_tree(a.root, a.train, a.unlabeled, a.val, a.objects365, a.sa1b, seed=a.seed)
    print(json.dumps(p, indent=1))


if __name__ == "__main__":
    main()
