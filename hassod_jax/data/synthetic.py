"""Generated scenes with known part-whole composition, and their COCO ground truth.

A scene is a textured background with a few occluding objects. Each object (ellipse or
rectangle) holds 1-3 disjoint parts, each part 0-2 disjoint subparts; every region has its
own colour and texture (Gaussian noise, or stripes of random orientation and period).
Objects are painted back to front, so later objects occlude earlier ones.

Ground truth masks are the VISIBLE pixels of each region. A region's visible mask includes
its children (a part is inside its object), so: part ⊂ object, subpart ⊂ part. Children are
kept only while they are clearly smaller than their parent (visible area below
`MAX_CHILD_FRACTION` of the parent's), which makes the masks' coverage tree at
θ_cover = 0.9 (stage 1's; docs/recipe.md, Stage 1, step 4) reproduce the generated levels:
objects 0, parts 1, subparts 2.
"""

import os

import numpy as np
from PIL import Image

MAX_CHILD_FRACTION = 0.8
MIN_VISIBLE_FRACTION = 0.5  # an object keeps at least this share of its own shape visible


def _shape_mask(h, w, cy, cx, ry, rx, kind, angle):
    """(h, w) bool mask of an ellipse or rotated rectangle centred at (cy, cx)."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    dy, dx = yy - cy, xx - cx
    c, s = np.cos(angle), np.sin(angle)
    u = c * dx + s * dy
    v = -s * dx + c * dy
    if kind == "ellipse":
        return (u / rx) ** 2 + (v / ry) ** 2 <= 1.0
    return (np.abs(u) <= rx) & (np.abs(v) <= ry)


def _random_colour(rng, avoid=(), min_dist=90.0):
    """A random RGB colour (float) at least `min_dist` from every colour in `avoid`."""
    best, best_d = None, -1.0
    for _ in range(50):
        col = rng.uniform(20, 235, size=3)
        d = min((np.linalg.norm(col - a) for a in avoid), default=np.inf)
        if d >= min_dist:
            return col
        if d > best_d:
            best, best_d = col, d
    return best


def _texture(rng, h, w, colour):
    """(h, w, 3) float texture around `colour`: Gaussian noise or stripes."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    if rng.random() < 0.5:
        sigma = rng.uniform(4, 14)
        return colour + rng.normal(0, sigma, size=(h, w, 3))
    theta = rng.uniform(0, np.pi)
    period = rng.uniform(6, 14)
    amp = rng.uniform(15, 35)
    wave = np.sin(2 * np.pi * (np.cos(theta) * xx + np.sin(theta) * yy) / period)
    direction = rng.normal(size=3)
    direction /= np.linalg.norm(direction) + 1e-9
    return colour + amp * wave[..., None] * direction + rng.normal(0, 3, size=(h, w, 3))


def _place_children(rng, parent, n, scale_range, h, w, kind_choices=("ellipse", "rect")):
    """Up to n disjoint shapes fully inside `parent` (bool mask). Returns list of masks."""
    ys, xs = np.nonzero(parent)
    if ys.size == 0:
        return []
    py0, py1, px0, px1 = ys.min(), ys.max(), xs.min(), xs.max()
    ph, pw = py1 - py0 + 1, px1 - px0 + 1
    children, taken = [], np.zeros_like(parent)
    for _ in range(n):
        for _try in range(30):
            ry = rng.uniform(*scale_range) * ph / 2
            rx = rng.uniform(*scale_range) * pw / 2
            cy = rng.uniform(py0 + ry, py1 - ry + 1e-3) if ph > 2 * ry else (py0 + py1) / 2
            cx = rng.uniform(px0 + rx, px1 - rx + 1e-3) if pw > 2 * rx else (px0 + px1) / 2
            kind = kind_choices[rng.integers(len(kind_choices))]
            m = _shape_mask(h, w, cy, cx, ry, rx, kind, rng.uniform(0, np.pi))
            area = m.sum()
            if area < 30:
                continue
            # Inside the parent with a margin, and apart from its siblings.
            if (m & ~parent).sum() == 0 and not (m & taken).any():
                grown = _dilate(m, 2)
                if (grown & ~parent).sum() <= 0.02 * area and not (grown & taken).any():
                    children.append(m)
                    taken |= grown
                    break
    return children


def _dilate(m, r):
    from scipy import ndimage

    return ndimage.binary_dilation(m, iterations=r)


def _background(rng, h, w):
    """Smooth two-colour gradient with noise or stripes."""
    c0, c1 = rng.uniform(30, 220, size=3), rng.uniform(30, 220, size=3)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    theta = rng.uniform(0, 2 * np.pi)
    t = np.cos(theta) * xx / max(w, 1) + np.sin(theta) * yy / max(h, 1)
    t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
    base = c0 + t[..., None] * (c1 - c0)
    return _texture(rng, h, w, np.zeros(3)) * 0.6 + base, (c0 + c1) / 2


def make_scene(rng, size=(240, 320), n_objects=(2, 4)):
    """Generates one scene.

    Args:
      rng: numpy Generator.
      size: (H, W) of the image.
      n_objects: inclusive range of the number of objects.
    Returns:
      img: (H, W, 3) uint8.
      annotations: list of dicts {mask (H, W) bool visible pixels, hier_level 0/1/2,
        parent (index into the list or -1), object (index of its object)}; parents come
        before their children.
    """
    h, w = int(size[0]), int(size[1])
    img, bg_colour = _background(rng, h, w)
    n_obj = int(rng.integers(n_objects[0], n_objects[1] + 1))

    objects = []  # each: dict(shape, regions=[(shape, level, parent_local, texture)])
    used_colours = [bg_colour]
    for _ in range(n_obj):
        for _try in range(40):
            ry = rng.uniform(0.18, 0.32) * h
            rx = rng.uniform(0.18, 0.32) * w
            cy, cx = rng.uniform(0.15 * h, 0.85 * h), rng.uniform(0.15 * w, 0.85 * w)
            kind = "ellipse" if rng.random() < 0.6 else "rect"
            shape = _shape_mask(h, w, cy, cx, ry, rx, kind, rng.uniform(0, np.pi))
            # Must not cover image corners (background by the corner rule) and must leave
            # every earlier object mostly visible.
            corners = shape[0, 0] or shape[0, -1] or shape[-1, 0] or shape[-1, -1]
            ok = shape.sum() > 400 and not corners
            for o in objects:
                vis = o["visible"]
                if ok and (vis & ~shape).sum() < MIN_VISIBLE_FRACTION * o["shape"].sum():
                    ok = False
            if ok:
                break
        else:
            continue
        for o in objects:
            o["visible"] = o["visible"] & ~shape
        objects.append({"shape": shape, "visible": shape.copy()})

    annotations = []
    for obj in objects:
        col = _random_colour(rng, used_colours)
        used_colours.append(col)
        regions = [(obj["shape"], col, -1, 0)]  # (shape, colour, parent_region_idx, level)
        parts = _place_children(rng, obj["shape"], int(rng.integers(1, 4)), (0.3, 0.5), h, w)
        for p in parts:
            pcol = _random_colour(rng, [col, bg_colour])
            regions.append((p, pcol, 0, 1))
            p_idx = len(regions) - 1
            subs = _place_children(rng, p, int(rng.integers(0, 3)), (0.3, 0.5), h, w)
            for sm in subs:
                regions.append((sm, _random_colour(rng, [pcol, col]), p_idx, 2))
        obj["regions"] = regions

    # Paint back to front: object, then its parts, then subparts.
    for obj in objects:
        for shape, col, _, _ in obj["regions"]:
            tex = _texture(rng, h, w, col)
            img[shape] = tex[shape]

    for o_idx, obj in enumerate(objects):
        local_to_global = {}
        for r_idx, (shape, _, parent, level) in enumerate(obj["regions"]):
            visible = shape & obj["visible"]
            if parent >= 0:
                if parent not in local_to_global:
                    continue  # parent was dropped, so is the child
                pmask = annotations[local_to_global[parent]]["mask"]
                visible &= pmask
                if visible.sum() < 50 or visible.sum() >= MAX_CHILD_FRACTION * pmask.sum():
                    continue
            elif visible.sum() < 100:
                continue
            local_to_global[r_idx] = len(annotations)
            annotations.append(
                {
                    "mask": visible,
                    "hier_level": level,
                    "parent": local_to_global[parent] if parent >= 0 else -1,
                    "object": o_idx,
                }
            )
    img = np.clip(np.rint(img), 0, 255).astype(np.uint8)
    return img, annotations


def write_synthetic_dataset(
    folder, n, seed=0, size=(240, 320), image_format="png", n_objects=(2, 4)
):
    """Writes `n` scenes and their COCO ground truth.

    Images go to `folder/images/{id:06d}.{png|jpg}` (ids 1..n, numeric stems), the ground
    truth to `folder/ground_truth.json`: one category {1, 'fg'}, RLE segmentations (str
    counts), area and bbox from the RLE, iscrowd 0, hier_level 0/1/2.
    `n_objects` is passed to `make_scene` (range of whole objects per scene).
    Returns (image_dir, coco_json_path). Deterministic in `seed`.
    """
    from hassod_jax.data.coco import encode_mask, make_coco_dict
    from hassod_jax.utils import atomic_write_json

    if image_format not in ("png", "jpg"):
        raise ValueError(f"image_format must be 'png' or 'jpg', got {image_format!r}")
    image_dir = os.path.join(folder, "images")
    os.makedirs(image_dir, exist_ok=True)
    rng = np.random.default_rng(seed)
    images, anns = [], []
    for image_id in range(1, n + 1):
        img, scene = make_scene(rng, size, n_objects=n_objects)
        name = f"{image_id:06d}.{image_format}"
        path = os.path.join(image_dir, name)
        tmp = os.path.join(image_dir, f".tmp_{name}")
        if image_format == "png":
            Image.fromarray(img).save(tmp, format="PNG")
        else:
            Image.fromarray(img).save(tmp, format="JPEG", quality=95)
        os.replace(tmp, path)
        images.append(
            {"id": image_id, "file_name": name, "height": img.shape[0], "width": img.shape[1]}
        )
        for a in scene:
            enc = encode_mask(a["mask"])
            anns.append(
                {
                    "image_id": image_id,
                    "category_id": 1,
                    "iscrowd": 0,
                    "hier_level": int(a["hier_level"]),
                    **enc,
                }
            )
    json_path = os.path.join(folder, "ground_truth.json")
    atomic_write_json(
        json_path, make_coco_dict(images, anns, info={"description": "hassod_jax synthetic"})
    )
    return image_dir, json_path
