"""Where the detector's training step spends its time: a breakdown for the #6/#7 speed work.

    python experiments/profile_detector.py                 # full R50 at 800x1333 (GPU)
    python experiments/profile_detector.py --quick         # small variant, 128x128 (CPU)
    python experiments/profile_detector.py --quick --r50 --size 320 512 --dtype float32
    python experiments/profile_detector.py --out profile.json

On the current backend, forward+backward (one jitted `value_and_grad`, as
bench_detector.py) of:
  * the whole Cascade Mask R-CNN step with the configured ROIAlign (adaptive sampling, cap
    --max-sampling), and the same step with fixed sampling_ratio 2 (torchvision's
    MultiScaleRoIAlign default; far fewer samples per bin) - the difference bounds what a
    faster ROIAlign can buy;
  * the backbone + FPN alone (ResNet and FPN of the same config, sum of the P2-P6 outputs);
  * the multi-level ROIAlign alone at the box heads' shape (B x 512 boxes, 7x7, once per
    cascade stage in the real step) and the mask head's (B x 128 boxes, 14x14), with the
    FPN's channel count and the images' level sizes, boxes drawn like proposals.
Prints one table; needs only jax, flax and numpy.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_detector import bench_ours  # noqa: E402


def _timed(fn, args, steps, warmup):
    """Compile seconds and median seconds per call of a jitted fn(*args)."""
    import jax

    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    compile_s = time.perf_counter() - t0
    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return compile_s, float(np.median(times))


def _proposal_like_boxes(rng, k, h, w):
    """k boxes with log-uniform sizes 16..max(h, w)/2 and aspect ratios 1/3..3, clipped."""
    side = np.exp(rng.uniform(np.log(16), np.log(max(h, w) / 2), k))
    aspect = np.exp(rng.uniform(np.log(1 / 3), np.log(3), k))
    bw, bh = side * np.sqrt(aspect), side / np.sqrt(aspect)
    x0, y0 = rng.uniform(0, w - 8, k), rng.uniform(0, h - 8, k)
    boxes = np.stack([x0, y0, np.minimum(x0 + bw, w - 1), np.minimum(y0 + bh, h - 1)], -1)
    return boxes.astype(np.float32)


def backbone_fpn(cfg, dtype, b, hp, wp, steps, warmup):
    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    from hassod_jax.models.fpn import FPN
    from hassod_jax.models.resnet import ResNet

    class BackboneFPN(nn.Module):
        @nn.compact
        def __call__(self, x, train):
            return FPN(cfg.fpn_channels, cfg.fpn_norm, dtype=dtype)(
                ResNet(cfg.resnet, dtype=dtype)(x, train), train
            )

    model = BackboneFPN()
    images = jnp.asarray(np.random.default_rng(0).normal(size=(b, hp, wp, 3)), jnp.float32)
    variables = jax.jit(lambda x: model.init(jax.random.PRNGKey(0), x, False))(images[:1])

    def loss(params, bstats, x):
        out, upd = model.apply(
            {"params": params, "batch_stats": bstats}, x, True, mutable=["batch_stats"]
        )
        return sum(jnp.sum(v.astype(jnp.float32)) for v in out.values()), upd

    step = jax.jit(jax.value_and_grad(loss, has_aux=True))
    args = (variables["params"], variables.get("batch_stats", {}), images)
    return _timed(step, args, steps, warmup)


def roi_align_alone(cfg, dtype, b, hp, wp, k_per_image, size, steps, warmup):
    import jax
    import jax.numpy as jnp

    from hassod_jax import ops

    rng = np.random.default_rng(1)
    strides = (4, 8, 16, 32)
    c = cfg.fpn_channels
    feats = [jnp.asarray(rng.normal(size=(b, hp // s, wp // s, c)), dtype) for s in strides]
    boxes = jnp.asarray(
        np.stack([_proposal_like_boxes(rng, k_per_image, hp, wp) for _ in range(b)])
    )

    def loss(fs, bx):
        out = ops.multilevel_roi_align(
            fs,
            bx,
            output_size=size,
            strides=strides,
            sampling_ratio=cfg.pooler_sampling_ratio,
            max_sampling=cfg.pooler_max_sampling,
        )
        return jnp.sum(out.astype(jnp.float32) ** 2)

    step = jax.jit(jax.value_and_grad(loss))
    return _timed(step, (feats, boxes), steps, warmup)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small variant, 128x128 (CPU)")
    p.add_argument("--r50", action="store_true", help="with --quick: the full R50 config")
    p.add_argument("--size", type=int, nargs=2, default=None, metavar=("H", "W"))
    p.add_argument("--dtype", default="bfloat16", choices=("float32", "bfloat16"))
    p.add_argument("--batch-per-device", type=int, default=2)
    p.add_argument("--max-sampling", type=int, default=4, help="adaptive ROIAlign cap")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--out", default=None, help="write the results as JSON here")
    a = p.parse_args(argv)

    import jax
    import jax.numpy as jnp

    from hassod_jax.models.detector import SMALL_CONFIG, DetectorConfig

    base = SMALL_CONFIG if a.quick and not a.r50 else DetectorConfig()
    cfg = dataclasses.replace(base, pooler_max_sampling=a.max_sampling)
    h, w = a.size or ((128, 128) if a.quick else (800, 1333))
    hp, wp = -(-h // 32) * 32, -(-w // 32) * 32
    g = 5 if a.quick else 20
    steps = a.steps or (3 if a.quick else 10)
    warmup = 1
    dtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[a.dtype]
    b = a.batch_per_device * jax.local_device_count()
    rows = []

    def add(name, compile_s, step_s, images):
        rows.append(
            {
                "part": name,
                "step_ms": 1e3 * step_s,
                "compile_s": compile_s,
                "images_per_s": images / step_s if images else None,
            }
        )
        print(rows[-1], flush=True)

    r = bench_ours(cfg, a.dtype, a.batch_per_device, h, w, g, steps, warmup)
    add(f"whole step, adaptive ROIAlign cap {a.max_sampling}", r["compile_s"], r["step_s"], b)
    fixed = dataclasses.replace(cfg, pooler_sampling_ratio=2)
    r = bench_ours(fixed, a.dtype, a.batch_per_device, h, w, g, steps, warmup)
    add("whole step, ROIAlign sampling_ratio 2", r["compile_s"], r["step_s"], b)
    add("backbone + FPN", *backbone_fpn(cfg, dtype, b, hp, wp, steps, warmup), b)
    k_box = cfg.roi_batch_size_per_image
    k_mask = cfg.mask_max_fg or int(cfg.roi_batch_size_per_image * cfg.roi_positive_fraction)
    # The float32 row: the gradient of the gather is a scatter-add into the feature table,
    # which GPUs may emulate for bfloat16 (compare-and-swap loops) but do natively in float32.
    for name, k, size, sub, table_dtype in (
        ("box", k_box, cfg.box_pooler_resolution, cfg, dtype),
        ("mask", k_mask, cfg.mask_pooler_resolution, cfg, dtype),
        ("box", k_box, cfg.box_pooler_resolution, fixed, dtype),
        ("box", k_box, cfg.box_pooler_resolution, cfg, jnp.float32),
    ):
        mode = (
            f"cap {sub.pooler_max_sampling}"
            if sub.pooler_sampling_ratio == 0
            else f"sampling_ratio {sub.pooler_sampling_ratio}"
        )
        times = roi_align_alone(sub, table_dtype, b, hp, wp, k, size, steps, warmup)
        label = f"{name} head ({b}x{k} boxes, {size}x{size}, {mode}, {jnp.dtype(table_dtype)})"
        add(f"ROIAlign alone, {label}", *times, 0)

    device = jax.devices()[0].device_kind
    print()
    print(f"{device}, {a.dtype}, images {h}x{w}, batch {b}, forward+backward, median of {steps}")
    print(f"{'part':80s} {'ms':>9s} {'img/s':>8s} {'compile s':>10s}")
    for r in rows:
        ips = f"{r['images_per_s']:8.2f}" if r["images_per_s"] else f"{'':8s}"
        print(f"{r['part']:80s} {r['step_ms']:9.1f} {ips} {r['compile_s']:10.1f}")
    print("(the box-head ROIAlign runs once per cascade stage: 3x in the step)")
    if a.out:
        with open(a.out, "w") as f:
            json.dump({"device": device, "dtype": a.dtype, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
