"""End-to-end stage-1 throughput: images -> hierarchical pseudo-labels, with the per-stage split.

    python experiments/bench_discovery.py --quick                 # CPU: a few images
    python experiments/bench_discovery.py --images 64 --crf jax   # GPU
    python experiments/bench_discovery.py --out results.json

The backbone is a ViT-B/8 with RANDOM weights written in our converted format (no download;
the speed of the ViT does not depend on its weights), or the weight-free stand-in
(`--backbone standin`). Random ViT keys partition images differently from trained DINO keys
(the number of regions per threshold, which drives the CRF cost, is printed beside the
timing). The images are scikit-image's photos, mirrored and cropped to give distinct inputs.
A first, untimed pass over the same images compiles every shape (the ViT, HAC and each
label bucket of the CRF); the second pass is timed. The baseline is the
published figure of the PyTorch original: 13.8 s per image on one worker.
"""

import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

ORIGINAL_S_PER_IMAGE = 13.8


def write_images(folder, n):
    import skimage.data
    from PIL import Image

    names = ("astronaut", "coffee", "chelsea", "rocket", "horse", "coins")
    os.makedirs(folder, exist_ok=True)
    for i in range(n):
        img = np.asarray(getattr(skimage.data, names[i % len(names)])())
        if img.ndim == 2 or img.dtype == bool:
            img = np.stack([img.astype(np.uint8) * (255 if img.dtype == bool else 1)] * 3, -1)
        variant = i // len(names)
        if variant % 2:
            img = img[:, ::-1]
        crop = (variant // 2) * 8
        img = img[crop:, crop:, :3]
        Image.fromarray(np.ascontiguousarray(img)).save(os.path.join(folder, f"{i + 1:08d}.png"))


def write_random_vit(folder, name="vit_base_patch8", seed=0):
    import jax

    from hassod_jax.models import vit
    from hassod_jax.weights import formats

    module = vit.make_vit(name)
    params = module.init(jax.random.PRNGKey(seed), np.zeros((1, 224, 224, 3), np.float32))["params"]
    arch = {
        k: getattr(module, k)
        for k in ("patch_size", "embed_dim", "depth", "num_heads", "mlp_dim", "pos_grid")
    }
    formats.save_converted(folder, params, arch, family="vit", source=f"random {name}")
    return folder


def run_once(images_dir, workdir, args, n):
    from hassod_jax import defaults
    from hassod_jax.discovery import pipeline

    c = defaults.discovery()
    c.images = images_dir
    c.max_images = n
    c.backbone = "dino" if args.backbone == "vit" else "standin"
    c.dino_checkpoint = args.vit_dir or ""
    c.dtype = args.dtype
    c.crf_backend = args.crf
    c.batch_size = args.batch
    c.chunk_size = max(args.batch, 8)
    c.num_workers = args.workers
    c.image_size = args.size
    t = time.perf_counter()
    result = pipeline.discover(c, workdir)
    wall = time.perf_counter() - t
    rows = result["rows"]
    regions = np.mean([res["regions"] for _, res in rows], axis=0).tolist()
    masks = float(np.mean([len(res["ensemble"]) for _, res in rows]))
    return wall, result["timing"], regions, masks


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="6 images (CPU)")
    p.add_argument("--images", type=int, default=48)
    p.add_argument("--backbone", choices=("vit", "standin"), default="vit")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--crf", choices=("auto", "jax", "pydensecrf"), default="auto")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--workers", type=int, default=-1)
    p.add_argument("--size", type=int, default=480)
    p.add_argument("--out", default="")
    args = p.parse_args()
    if args.quick:
        args.images, args.batch = 6, 2
    import jax

    with tempfile.TemporaryDirectory() as tmp:
        args.vit_dir = write_random_vit(os.path.join(tmp, "vit")) if args.backbone == "vit" else ""
        write_images(os.path.join(tmp, "images"), args.images)
        # A full untimed pass first, so every label bucket's CRF shape is compiled before timing.
        run_once(os.path.join(tmp, "images"), os.path.join(tmp, "warm"), args, args.images)
        wall, timing, regions, masks = run_once(
            os.path.join(tmp, "images"), os.path.join(tmp, "w"), args, args.images
        )
    from hassod_jax.discovery import pipeline

    per_image = wall / args.images
    stages = timing["stage_seconds"]
    total_stage = sum(stages.values()) or 1.0
    row = {
        "device": str(jax.devices()[0]),
        "backbone": f"random ViT-B/8 ({args.dtype})" if args.backbone == "vit" else "stand-in",
        "crf": pipeline.resolve_crf_backend(args.crf),
        "images": args.images,
        "size": args.size,
        "s_per_image": per_image,
        "images_per_s": 1.0 / per_image,
        "speedup_vs_original_one_worker": ORIGINAL_S_PER_IMAGE / per_image,
        "stage_share": {k: v / total_stage for k, v in stages.items()},
        "regions_per_image_per_threshold": regions,
        "masks_per_image": masks,
    }
    print(
        f"{'device':>10} {'backbone':>24} {'crf':>10} {'img':>4} "
        f"{'s/img':>7} {'img/s':>7} {'x orig':>7}"
    )
    print(
        f"{row['device'][:10]:>10} {row['backbone']:>24} {row['crf']:>10} {args.images:4d} "
        f"{per_image:7.3f} {1 / per_image:7.2f} {row['speedup_vs_original_one_worker']:7.1f}"
    )
    print("stage share:", ", ".join(f"{k} {100 * v:.0f}%" for k, v in row["stage_share"].items()))
    print(
        "HAC regions per image at (0.4, 0.2, 0.1):",
        [round(r, 1) for r in regions],
        "| kept masks:",
        round(masks, 1),
    )
    if args.out:
        with open(args.out, "w") as f:
            json.dump(row, f, indent=1)


if __name__ == "__main__":
    main()
