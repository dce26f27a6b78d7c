"""What mode=sweep costs: 12 thresholds (0.05 ... 0.6) on the demo's images, refined (one dense
CRF per image and threshold) and raw (`refine=False`, no CRF).

    python experiments/bench_sweep.py                     # 4 demo images, this tree (~3 min)
    python experiments/bench_sweep.py --baseline DIR      # and other code, same run
    python experiments/bench_sweep.py --images 12         # the demo's 12 (about 4x longer)

The images are the demo's (configs/demo.py): generated 240 x 320 scenes and scikit-image's
photos, alternating from the first scene and the first photo so that a few images hold both
kinds. The backbone is the weight-free stand-in (what the demo runs without a DINO
checkpoint), the CRF pydensecrf, workers as the config's default (one per core but one). Each
row runs in a fresh process on the code of its tree (`--baseline DIR`: a copy of other code,
e.g. `git archive REV | tar -x -C DIR` plus the built `_hac_native` extension). `s/refine` is
the wall time per (image, threshold) refinement; `demo 12 img` extrapolates the run to the
demo's 12 images from it.
"""

import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from bench_discovery_memory import common_args, run_child  # noqa: E402


def write_demo_images(folder, n):
    """The first n of the demo's images, scenes and photos alternating; returns the list file."""
    from hassod_jax import utils
    from hassod_jax.modes import demo

    image_dir, image_list, _ = demo.prepare_data(
        folder, 6, 0, (240, 320), demo.SKIMAGE_PHOTOS
    )
    images = utils.read_json(image_list, "image list")["images"]
    scenes = [im for im in images if not im["file_name"].startswith("skimage_")]
    photos = [im for im in images if im["file_name"].startswith("skimage_")]
    mixed = [im for pair in zip(scenes, photos) for im in pair][:n]
    path = os.path.join(folder, "bench_list.json")
    utils.atomic_write_json(path, {"images": mixed, "annotations": [], "categories": []})
    return image_dir, path


def child(args):
    from hassod_jax import defaults
    from hassod_jax.modes import discovery as discovery_modes

    c = defaults.sweep()
    c.images, c.coco_json = args.image_dir, args.image_list
    c.backbone = "standin"
    c.crf_backend = "pydensecrf"
    c.max_pictures = 0
    if args.refine == "false":
        c.refine = False
    workdir = os.path.join(args.tmp, f"w_{os.getpid()}")
    t0 = time.perf_counter()
    report = discovery_modes.run_sweep(c, workdir)
    wall = time.perf_counter() - t0
    import hassod_jax

    n = report["images"]
    stats = report["statistics"]
    out = {
        "package": os.path.dirname(hassod_jax.__file__),
        "wall_s": wall,
        "images": n,
        "thresholds": len(c.thresholds),
        "masks_per_image": {k: v["masks_per_image"] for k, v in stats.items()},
        "regions_per_image": [v["regions_per_image"] for k, v in stats.items() if k != "ensemble"],
    }
    print("RESULT " + json.dumps(out), flush=True)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=4)
    common_args(p, timeout=1800)
    p.add_argument("--image-dir", default="", help=argparse.SUPPRESS)
    p.add_argument("--image-list", default="", help=argparse.SUPPRESS)
    p.add_argument("--refine", default="true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child(args)
    this = os.path.dirname(HERE)
    rows = [("this tree", this, "true"), ("this tree", this, "false")]
    if args.baseline:
        rows.insert(0, ("baseline", os.path.abspath(args.baseline), "true"))
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        image_dir, image_list = write_demo_images(os.path.join(tmp, "data"), args.images)
        for name, code, refine in rows:
            extra = ["--tmp", tmp, "--image-dir", image_dir, "--image-list", image_list,
                     "--refine", refine]  # fmt: skip
            res = run_child(code, __file__, extra, args.timeout)
            res.update(tree=name, refine=refine == "true")
            results.append(res)
            print(json.dumps(res), flush=True)
    print()
    print(
        f"{'tree':>10} {'refine':>6} {'img':>4} {'thr':>4} {'wall s':>8} {'s/img':>7} "
        f"{'s/refine':>8} {'demo 12 img':>11} {'masks/img (ensemble)':>21}"
    )
    for r in results:
        if "error" in r:
            print(f"{r['tree']:>10} {str(r['refine']):>6}  error: {r['error'][-300:]!r}")
            continue
        n, t = r["images"], r["thresholds"]
        print(
            f"{r['tree']:>10} {str(r['refine']):>6} {n:4d} {t:4d} {r['wall_s']:8.1f} "
            f"{r['wall_s'] / n:7.1f} {r['wall_s'] / (n * t):8.2f} "
            f"{r['wall_s'] / n * 12 / 60:9.1f} m {r['masks_per_image']['ensemble']:21.1f}"
        )
    regions = np.round(results[-1].get("regions_per_image", []), 1).tolist()
    print("regions per image at each threshold:", regions)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
