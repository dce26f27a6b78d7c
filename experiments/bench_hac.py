"""Benchmark of HAC and the coverage tree (docs/recipe.md, Stage 1, steps 2 and 4).

Measures ms per image for a 60x60x768 feature map (DINO ViT-B/8 keys at 480 px) with the
paper's thresholds (0.4, 0.2, 0.1) and with a 100-threshold sweep, one image at a time and
batched, against the float64 NumPy oracle of tests/discovery/hac_reference.py in the same
run (once: it is slow); both merge loops: the jit-compiled one (`xla` rows) and the host C
loop (`host` rows, when the extension is built); and the tree on 13, 50 and 300 masks of
480x640 (pooled from 3 partitions, as HAC's refined masks are, and random ellipses).

  python experiments/bench_hac.py [--quick] [--batch 8 64] [--out results.json]

Needs only jax and numpy.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import jax
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from hassod_jax.discovery import hac  # noqa: E402
from hassod_jax.discovery.hierarchy import hierarchy_levels  # noqa: E402
from tests.discovery.hac_reference import dino_like_features, reference_partitions  # noqa: E402

PAPER = (0.4, 0.2, 0.1)
SWEEP = tuple(np.linspace(0.0, 0.99, 100))


def _blobs(rng, n, h, w):
    """n random elliptical masks (pseudo-label-like blobs) of an h x w image."""
    yy, xx = np.mgrid[0:h, 0:w]
    cy, cx = rng.uniform(0, h, n), rng.uniform(0, w, n)
    ry, rx = rng.uniform(10, h / 2, n), rng.uniform(10, w / 2, n)
    return np.stack(
        [((yy - cy[i]) / ry[i]) ** 2 + ((xx - cx[i]) / rx[i]) ** 2 <= 1 for i in range(n)]
    )


def _pool(rng, n, h, w, patch=8):
    """n masks pooled from 3 partitions of an h x w image, like HAC's refined masks.

    Each partition is a Voronoi partition of the (h/patch, w/patch) patch grid (n/6, n/3 and
    the rest of the n regions) upsampled by `patch`; every mask is then shifted by up to 3
    pixels, as the CRF refinement moves boundaries (so masks overlap and leave gaps).
    """
    gh, gw = h // patch, w // patch
    yy, xx = np.mgrid[0:gh, 0:gw]
    sizes = [max(1, n // 6), max(1, n // 3)]
    sizes.append(n - sum(sizes))
    out = []
    for k in sizes:
        seeds = rng.uniform(0, [gh, gw], size=(k, 2))
        dist = (yy[..., None] - seeds[:, 0]) ** 2 + (xx[..., None] - seeds[:, 1]) ** 2
        lab = np.repeat(np.repeat(np.argmin(dist, -1), patch, 0), patch, 1)
        lab = np.pad(lab, ((0, h - lab.shape[0]), (0, w - lab.shape[1])), mode="edge")
        for j in range(k):
            shift = tuple(int(s) for s in rng.integers(-3, 4, 2))
            out.append(np.roll(lab == j, shift, axis=(0, 1)))
    return np.stack(out)


def _time(fn, repeats):
    """Median wall-clock seconds and median process CPU seconds (all threads) of fn()."""
    fn()  # compile / warm up
    wall, cpu = [], []
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        wall.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return float(np.median(wall)), float(np.median(cpu))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer repeats, small batches")
    ap.add_argument("--batch", type=int, nargs="*", default=None, help="batch sizes")
    ap.add_argument("--size", type=int, nargs=3, default=(60, 60, 768), metavar=("H", "W", "D"))
    ap.add_argument("--no-oracle", action="store_true", help="skip the NumPy oracle")
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    args = ap.parse_args(argv)
    h, w, d = args.size
    repeats = 2 if args.quick else 5
    on_gpu = jax.default_backend() != "cpu"
    batches = args.batch or ([8] if args.quick else ([8, 64, 256] if on_gpu else [8]))
    rng = np.random.default_rng(0)
    rows = []

    def record(name, times, per):
        wall, cpu = times
        rows.append(
            {
                "case": name,
                "ms_per_image": 1e3 * wall / per,
                "cpu_ms_per_image": 1e3 * cpu / per,
                "images_per_s": per / wall,
            }
        )

    one_np = dino_like_features(rng, 1, h, w, d)[0]
    one = jax.device_put(one_np)
    host = hac.native_available()
    if not host:
        print("note: hassod_jax.discovery._hac_native is not built; host rows skipped")

    def cut(merge, feats, thr):
        return lambda: np.asarray(hac.cut_labels(merge(feats), thr))

    for name, thr in (("(0.4,0.2,0.1)", PAPER), ("100 thresholds", SWEEP)):
        tag = f"{h}x{w}x{d} merge+cut {name}"
        record(f"xla  single {tag}", _time(cut(hac.merge_sequence, one, thr), repeats), 1)
        if host:
            record(
                f"host single {tag}", _time(cut(hac.merge_sequence_host, one_np, thr), repeats), 1
            )
    for name, thr in (("(0.4,0.2,0.1)", PAPER), ("100 thresholds", SWEEP)):
        run = lambda thr=thr: hac.hac_partitions(one, thr)  # noqa: E731
        record(f"hac_partitions single {name} (R, h, w) masks", _time(run, repeats), 1)
    for b in batches:
        feats_np = dino_like_features(rng, b, h, w, d)
        feats = jax.device_put(feats_np)
        for name, thr in (("(0.4,0.2,0.1)", PAPER), ("100 thresholds", SWEEP)):
            run = cut(hac.merge_sequence_batch, feats, thr)
            record(f"xla  batch {b} merge+cut {name}", _time(run, max(1, repeats // 2)), b)
            if host:
                # hac_partitions' host path: one C loop per image in a thread pool.
                run = lambda f=feats_np, thr=thr: hac.hac_partitions(f, thr, backend="host")  # noqa: E731
                record(f"host batch {b} partitions {name}", _time(run, max(1, repeats // 2)), b)

    tree_rng = np.random.default_rng(1)
    for n_tree in (13, 50, 300):
        for kind, make in (("3 partitions", _pool), ("random ellipses", _blobs)):
            tree_masks = make(tree_rng, n_tree, 480, 640)
            record(
                f"tree {n_tree} masks 480x640, {kind}",
                _time(lambda m=tree_masks: hierarchy_levels(m, 0.9), repeats),
                1,
            )

    if not args.no_oracle:
        f64 = np.asarray(one, np.float64)
        t0, c0 = time.perf_counter(), time.process_time()
        reference_partitions(f64, PAPER)
        times = (time.perf_counter() - t0, time.process_time() - c0)
        record("NumPy float64 oracle (0.4,0.2,0.1), once", times, 1)

    print(f"device: {jax.devices()[0].device_kind} ({jax.default_backend()})")
    print("wall ms: elapsed time; CPU ms: process CPU time, all threads (robust to sharing)")
    print(f"{'case':<58} {'wall ms/img':>12} {'CPU ms/img':>12} {'images/s':>10}")
    for row in rows:
        print(
            f"{row['case']:<58} {row['ms_per_image']:>12.2f} {row['cpu_ms_per_image']:>12.2f} "
            f"{row['images_per_s']:>10.1f}"
        )
    if args.out:
        with open(args.out, "w") as fh:
            json.dump({"device": str(jax.devices()[0]), "rows": rows}, fh, indent=2)


if __name__ == "__main__":
    main()
