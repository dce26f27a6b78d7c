"""End-to-end stage-1 throughput: images -> hierarchical pseudo-labels, with the per-stage split.

    python experiments/bench_discovery.py --quick                         # CPU: a few images
    python experiments/bench_discovery.py --images 48 --batch 16 --crf jax  # GPU
    python experiments/bench_discovery.py --features vit                  # the ViT's own keys

The run is `pipeline.discover` on a folder of images (decode, 480x480 resize, ViT-B/8 keys,
HAC, dense CRF, refinement, coverage tree, in its worker processes), twice: a first, untimed
pass over ALL the images compiles every shape (the ViT, HAC, and the CRF at every label bucket
the images meet; the same images give the same buckets), then the timed pass. Compilations
during the timed pass are counted (`compiles_in_timed_pass`, 0 in a steady state).

The backbone is a ViT-B/8 with RANDOM weights written in our converted format (no download;
its speed does not depend on its weights). Random keys give a few regions per image (6 / 2 / 2
at θ 0.4 / 0.2 / 0.1), far from what DINO gives on COCO (100+ at θ 0.4), and the CRF and
refinement costs grow with the regions. So by default (`--features coco`) the ViT runs and is
timed as it is, and its output is then replaced by a COCO-like feature map of the same shape:
SLIC superpixels of the image at three scales (about 170, 40 and 12 per 60x60 grid, scaled
with the grid) give each patch a sum of three random directions (the coarse, middle and fine
segment's) plus per-patch noise, in proportions that make HAC stop at the fine segments at
θ 0.4, the middle ones at 0.2 and the coarse ones at 0.1 (on the first 32 photos at 480 px:
98-137 / 28-45 / 11-34 regions, means 113 / 37 / 22, CRF label buckets 16 to 256; HAC on
this CPU). The maps are made in the untimed pass and looked up by image content in the timed
one, so the "features" stage is the ViT's time. `--features vit` keeps the random ViT's keys.

The images are scikit-image's bundled photos, mirrored and cropped to give distinct inputs.
The baseline is the published figure of the PyTorch original: 13.8 s per image on one worker.
Needs ml_collections and pycocotools (the pipeline's config and RLE masks; experiments/
gpu_bench.sh carries their wheels to the GPU machine), scikit-image, scipy, PIL, jax, flax.
The JSON (`--out`) is rewritten after each pass.
"""

import argparse
import hashlib
import os
import sys
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

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


def _parent_of(child, parent):
    """For each child label, the parent label that holds most of its cells."""
    counts = np.zeros((child.max() + 1, parent.max() + 1), np.int64)
    np.add.at(counts, (child.ravel(), parent.ravel()), 1)
    return counts.argmax(1)


# Squared shares of the coarse, middle and fine directions in a segment's feature: two fine
# segments of one middle segment have cosine 0.045 + 0.255 = 0.3 (merged at θ 0.2, not 0.4);
# two merged middle segments of one coarse one 0.045 / 0.3 = 0.15 (merged at θ 0.1, not 0.2);
# patches of one fine segment 1 / (1 + 0.6**2) = 0.74 (merged first).
SHARES = (0.045, 0.255, 0.70)
NOISE = 0.6
SEGMENTS_PER_3600 = (170, 40, 12)


def coco_like_features(image_u8, grid, dim, seed):
    """(h, w, dim) float32 features whose HAC regions follow the image's SLIC superpixels at
    three scales (module docstring)."""
    from skimage.segmentation import slic

    h, w = grid
    s = image_u8.shape[0] // h
    small = image_u8[: h * s, : w * s].reshape(h, s, w, s, 3).mean((1, 3))
    area = h * w / 3600.0

    def segments(n):
        lab = slic(small, n_segments=max(2, int(round(n * area))), compactness=10.0,
                   start_label=0, channel_axis=-1)  # fmt: skip
        return np.unique(lab, return_inverse=True)[1].reshape(h, w)

    fine, mid, coarse = (segments(n) for n in SEGMENTS_PER_3600)
    f2m = _parent_of(fine, mid)
    m2c = _parent_of(mid, coarse)
    rng = np.random.default_rng(seed)

    def directions(n):
        return (rng.normal(size=(n, dim)) / np.sqrt(dim)).astype(np.float32)

    cd, md, fd = directions(coarse.max() + 1), directions(mid.max() + 1), directions(fine.max() + 1)
    a, b, c = np.sqrt(SHARES)
    seg = a * cd[m2c[f2m]] + b * md[f2m] + c * fd
    return (seg[fine] + NOISE * directions(h * w).reshape(h, w, dim)).astype(np.float32)


class CocoLikeFeatures:
    """A `pipeline.FeatureExtractor` stand-in: runs the real extractor (timed as it is), then
    returns COCO-like maps of the same shape, made once per image content and cached."""

    def __init__(self, real_cls):
        self.real_cls = real_cls
        self.cache, self.made_s = {}, 0.0

    def __call__(self, config):
        inner = self.real_cls(config)
        outer = self

        class Extractor:
            patch = inner.patch
            description = inner.description + " -> COCO-like feature maps (bench_discovery)"

            def __call__(self, normalized, uint8_images):
                feats = inner(normalized, uint8_images)
                out = np.empty_like(feats)
                for i, im in enumerate(uint8_images):
                    key = hashlib.blake2b(np.ascontiguousarray(im).tobytes(), digest_size=16)
                    key = key.hexdigest()
                    if key not in outer.cache:
                        t = time.perf_counter()
                        seed = int(key[:8], 16)
                        outer.cache[key] = coco_like_features(im, feats.shape[1:3],
                                                              feats.shape[3], seed)  # fmt: skip
                        outer.made_s += time.perf_counter() - t
                    out[i] = outer.cache[key]
                return out

        return Extractor()


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
    c.num_workers = args.workers
    c.image_size = args.size
    c.max_pictures = 0
    t = time.perf_counter()
    result = pipeline.discover(c, workdir)
    wall = time.perf_counter() - t
    rows = result["rows"]
    regions = np.array([res["regions"] for _, res in rows])
    masks = float(np.mean([len(res["ensemble"]) for _, res in rows]))
    return wall, result["timing"], regions, masks


class CompileCounter:
    """Counts XLA compilations (backend compile events) while `active`."""

    def __init__(self):
        import jax

        self.active, self.count, self.seconds = False, 0, 0.0

        def listener(event, duration, **kwargs):
            if self.active and "backend_compile" in event:
                self.count += 1
                self.seconds += duration

        try:
            jax.monitoring.register_event_duration_secs_listener(listener)
        except Exception:  # noqa: BLE001 - the monitoring API moved between versions
            self.count = None


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true",
                   help="4 images, ViT-S/8 at 224 px, batch 2 (CPU)")  # fmt: skip
    p.add_argument("--images", type=int, default=48)
    p.add_argument("--backbone", choices=("vit", "standin"), default="vit")
    p.add_argument("--vit", default="vit_base_patch8", help="the random ViT's architecture")
    p.add_argument(
        "--features",
        choices=("coco", "vit"),
        default="coco",
        help="coco: COCO-like maps after the ViT (default); vit: its own keys",
    )
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--crf", choices=("auto", "jax", "pydensecrf"), default="auto")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--workers", type=int, default=-1)
    p.add_argument("--size", type=int, default=480)
    p.add_argument("--out", default="")
    args = p.parse_args()
    if args.quick:
        args.images, args.batch, args.size, args.vit = 4, 2, 224, "vit_small_patch8"
    import jax
    from bench_train import imported_not_on_device, write_json

    from hassod_jax.discovery import pipeline

    coco = None
    if args.features == "coco":
        coco = CocoLikeFeatures(pipeline.FeatureExtractor)
        pipeline.FeatureExtractor = coco
    counter = CompileCounter()
    row = {
        "device": str(jax.devices()[0]),
        "jax": jax.__version__,
        "backbone": (
            f"random {args.vit} ({args.dtype})" if args.backbone == "vit" else "stand-in"
        ),  # fmt: skip
        "features": args.features,
        "crf": pipeline.resolve_crf_backend(args.crf),
        "images": args.images,
        "batch": args.batch,
        "size": args.size,
        "workers": args.workers if args.workers >= 0 else max(1, (os.cpu_count() or 2) - 1),
    }
    with tempfile.TemporaryDirectory() as tmp:
        args.vit_dir = (write_random_vit(os.path.join(tmp, "vit"), args.vit)
                        if args.backbone == "vit" else "")  # fmt: skip
        write_images(os.path.join(tmp, "images"), args.images)
        # A full untimed pass first, so every label bucket's CRF shape is compiled before timing.
        counter.active = True
        warm, warm_timing, regions, _ = run_once(
            os.path.join(tmp, "images"), os.path.join(tmp, "warm"), args, args.images
        )
        row.update(warm_s=warm, warm_stage_seconds=warm_timing["stage_seconds"],
                   warm_compiles=counter.count, warm_compile_s=counter.seconds,
                   feature_maps_made_s=coco.made_s if coco else 0.0)  # fmt: skip
        buckets = sorted({pipeline.label_bucket(int(r)) for r in regions.ravel() if r > 0})
        row["crf_label_buckets"] = buckets
        row["regions_per_image_per_threshold"] = regions.mean(0).tolist()
        row["regions_min_max_per_threshold"] = [regions.min(0).tolist(), regions.max(0).tolist()]
        write_json(args.out, row)
        print(f"warm-up pass {warm:.1f} s ({counter.count} compiles, {counter.seconds:.1f} s); "
              f"regions per image at (0.4, 0.2, 0.1): {np.round(regions.mean(0), 1).tolist()} "
              f"(min {regions.min(0).tolist()}, max {regions.max(0).tolist()}); CRF label "
              f"buckets {buckets}", flush=True)  # fmt: skip
        counter.count, counter.seconds = (None if counter.count is None else 0), 0.0
        wall, timing, regions, masks = run_once(
            os.path.join(tmp, "images"), os.path.join(tmp, "w"), args, args.images
        )
        counter.active = False

    per_image = wall / args.images
    stages = timing["stage_seconds"]
    total_stage = sum(stages.values()) or 1.0
    row.update(
        s_per_image=per_image,
        images_per_s=1.0 / per_image,
        speedup_vs_original_one_worker=ORIGINAL_S_PER_IMAGE / per_image,
        original_s_per_image=ORIGINAL_S_PER_IMAGE,
        stage_seconds=stages,
        stage_share={k: v / total_stage for k, v in stages.items()},
        regions_per_image_per_threshold=regions.mean(0).tolist(),
        masks_per_image=masks,
        compiles_in_timed_pass=counter.count,
        imported_not_on_device=imported_not_on_device(),
    )
    write_json(args.out, row)
    print(
        f"{'device':>10} {'backbone':>28} {'crf':>5} {'img':>4} "
        f"{'s/img':>7} {'img/s':>7} {'x orig':>7}"
    )
    print(
        f"{row['device'][:10]:>10} {row['backbone'][:28]:>28} {row['crf']:>5} {args.images:4d} "
        f"{per_image:7.3f} {1 / per_image:7.2f} {row['speedup_vs_original_one_worker']:7.1f}"
    )
    print("stage seconds:", ", ".join(f"{k} {v:.2f} ({100 * v / total_stage:.0f}%)"
                                      for k, v in stages.items()))  # fmt: skip
    mean_regions = [round(r, 1) for r in row["regions_per_image_per_threshold"]]
    print(f"HAC regions per image at (0.4, 0.2, 0.1): {mean_regions} | kept masks: {masks:.1f}"
          f" | compiles in the timed pass: {counter.count}")  # fmt: skip


if __name__ == "__main__":
    main()
