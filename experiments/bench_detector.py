"""Forward+backward throughput of the Cascade Mask R-CNN against torchvision's Mask R-CNN.

    python experiments/bench_detector.py            # full R50 at 800x1333, 2 images/device
    python experiments/bench_detector.py --quick    # CPU: small variant, small images
    python experiments/bench_detector.py --out results.json

Measures images/s of one jitted `value_and_grad` of the summed training losses (no
optimizer update) with the batch sharded over all local devices (2 per device), in float32
and bfloat16 compute, and in the same run torchvision's `maskrcnn_resnet50_fpn`
(weights=None, train mode, random targets, loss.backward()). Needs only jax, flax, numpy,
torch and torchvision.
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


def random_targets(rng, b, h, w, g):
    x0 = rng.uniform(0, w * 0.7, size=(b, g))
    y0 = rng.uniform(0, h * 0.7, size=(b, g))
    bw = rng.uniform(0.05, 0.3, size=(b, g)) * w
    bh = rng.uniform(0.05, 0.3, size=(b, g)) * h
    boxes = np.stack([x0, y0, np.minimum(x0 + bw, w - 1), np.minimum(y0 + bh, h - 1)], -1)
    boxes = boxes.astype(np.float32)
    yy = np.arange(h)[None, None, :, None]
    xx = np.arange(w)[None, None, None, :]
    masks = (
        (xx >= boxes[..., 0, None, None])
        & (xx < boxes[..., 2, None, None])
        & (yy >= boxes[..., 1, None, None])
        & (yy < boxes[..., 3, None, None])
    )
    levels = rng.integers(0, 3, size=(b, g)).astype(np.int32)
    return boxes, masks, levels


def bench_ours(cfg, dtype_name, b_per_dev, h, w, g, steps, warmup):
    import jax
    import jax.numpy as jnp
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    from hassod_jax.models.detector import CascadeMaskRCNN

    devices = np.array(jax.local_devices())
    mesh = Mesh(devices, ("data",))
    data = NamedSharding(mesh, P("data"))
    repl = NamedSharding(mesh, P())
    b = b_per_dev * devices.size
    hp, wp = -(-h // 32) * 32, -(-w // 32) * 32  # pad to a multiple of 32
    rng = np.random.default_rng(0)
    images = rng.normal(size=(b, hp, wp, 3)).astype(np.float32)
    boxes, masks, levels = random_targets(rng, b, h, w, g)
    masks = np.pad(masks, ((0, 0), (0, 0), (0, hp - h), (0, wp - w)))
    targets = {"boxes": boxes, "masks": masks, "levels": levels, "valid": np.ones((b, g), bool)}
    sizes = np.tile(np.array([[h, w]], np.int32), (b, 1))
    dtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[dtype_name]
    model = CascadeMaskRCNN(cfg, dtype=dtype)
    variables = jax.jit(
        lambda im: model.init(jax.random.PRNGKey(0), im, train=False), out_shardings=repl
    )(images[:1])

    def loss_fn(params, bstats, images, targets, sizes, key):
        losses, upd = model.apply(
            {"params": params, "batch_stats": bstats},
            images,
            targets,
            train=True,
            rng=key,
            image_sizes=sizes,
            mutable=["batch_stats"],
        )
        return sum(losses.values()), upd["batch_stats"]

    step = jax.jit(
        jax.value_and_grad(loss_fn, has_aux=True),
        in_shardings=(repl, repl, data, data, data, repl),
    )
    args = [variables["params"], variables["batch_stats"]]
    args += jax.device_put([images, targets, sizes], data)
    t0 = time.perf_counter()
    out = step(*args, jax.random.PRNGKey(0))
    jax.block_until_ready(out)
    compile_s = time.perf_counter() - t0
    for i in range(warmup):
        jax.block_until_ready(step(*args, jax.random.PRNGKey(i + 1)))
    t0 = time.perf_counter()
    for i in range(steps):
        out = step(*args, jax.random.PRNGKey(100 + i))
    jax.block_until_ready(out)
    dt = time.perf_counter() - t0
    loss = float(out[0][0])
    return {
        "images_per_s": b * steps / dt,
        "step_s": dt / steps,
        "compile_s": compile_s,
        "batch": b,
        "loss": loss,
        "device": str(devices[0].device_kind),
        "n_devices": int(devices.size),
    }


def bench_torchvision(b, h, w, g, steps, warmup, amp):
    import torch
    import torchvision

    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = torchvision.models.detection.maskrcnn_resnet50_fpn(
        weights=None, weights_backbone=None, min_size=min(h, w), max_size=max(h, w)
    ).to(dev)
    model.train()
    rng = np.random.default_rng(0)
    boxes, masks, _ = random_targets(rng, b, h, w, g)
    images = [torch.rand(3, h, w, device=dev) for _ in range(b)]
    targets = [
        {
            "boxes": torch.from_numpy(boxes[i]).to(dev),
            "labels": torch.ones(g, dtype=torch.int64, device=dev),
            "masks": torch.from_numpy(masks[i].astype(np.uint8)).to(dev),
        }
        for i in range(b)
    ]

    def step():
        model.zero_grad(set_to_none=True)
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=amp):
            losses = model(images, targets)
            loss = sum(losses.values())
        loss.backward()
        return loss

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize()

    for _ in range(max(warmup, 1)):
        step()
    sync()
    t0 = time.perf_counter()
    for _ in range(steps):
        loss = step()
    sync()
    dt = time.perf_counter() - t0
    name = torch.cuda.get_device_name() if dev.type == "cuda" else "cpu"
    return {
        "images_per_s": b * steps / dt,
        "step_s": dt / steps,
        "batch": b,
        "loss": float(loss.detach()),
        "device": name,
    }


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small variant, small images (CPU)")
    p.add_argument("--r50", action="store_true", help="with --quick: also our full R50")
    p.add_argument("--height", type=int, default=None)
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--batch-per-device", type=int, default=2)
    p.add_argument("--instances", type=int, default=None, help="gt instances per image")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--no-torch", action="store_true")
    p.add_argument(
        "--max-sampling",
        type=int,
        default=None,
        help="ROIAlign cap on adaptive samples per bin, gh * gw (config default 64)",
    )
    p.add_argument("--out", default=None, help="write the results as JSON here")
    a = p.parse_args(argv)

    from hassod_jax.models.detector import SMALL_CONFIG, DetectorConfig

    h = a.height or (128 if a.quick else 800)
    w = a.width or (128 if a.quick else 1333)
    g = a.instances or (5 if a.quick else 20)
    steps = a.steps or (3 if a.quick else 20)
    warmup = 1 if a.quick else a.warmup
    configs = [("small", SMALL_CONFIG)] if a.quick else [("R50", DetectorConfig())]
    if a.quick and a.r50:
        configs.append(("R50", DetectorConfig()))
    rows = []
    for name, cfg in configs:
        for dt in a.dtypes.split(","):
            if a.max_sampling:
                cfg = dataclasses.replace(cfg, pooler_max_sampling=a.max_sampling)
            r = bench_ours(cfg, dt, a.batch_per_device, h, w, g, steps, warmup)
            rows.append({"model": f"ours {name} cascade", "dtype": dt, **r})
            print(rows[-1], flush=True)
    if not a.no_torch:
        # torchvision runs on one device: its batch is one device's share.
        b = a.batch_per_device
        for amp in (False, True):
            try:
                r = bench_torchvision(b, h, w, g, steps, warmup, amp)
            except Exception as e:  # bf16 autocast may be unsupported on some backends
                print(f"torchvision amp={amp} failed: {e}", flush=True)
                continue
            dt = "amp-bf16" if amp else "float32"
            rows.append({"model": "torchvision maskrcnn_resnet50_fpn", "dtype": dt, **r})
            print(rows[-1], flush=True)
    print()
    print(f"images {h}x{w}, {g} instances/image, {steps} timed steps (forward+backward)")
    print(f"{'model':38s} {'dtype':9s} {'device':22s} {'batch':>5s} {'img/s':>8s} {'step s':>8s}")
    for r in rows:
        print(
            f"{r['model']:38s} {r['dtype']:9s} {r['device'][:22]:22s} {r['batch']:5d} "
            f"{r['images_per_s']:8.2f} {r['step_s']:8.3f}"
        )
    if a.out:
        with open(a.out, "w") as f:
            json.dump({"height": h, "width": w, "instances": g, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
