"""torchvision's Mask R-CNN R50-FPN training step: the same-run peer of bench_train.py --gpu.

    python experiments/bench_torchvision.py --batch 16 --out torchvision.json   # GPU
    python experiments/bench_torchvision.py --quick                             # CPU

`torchvision.models.detection.maskrcnn_resnet50_fpn(weights=None, weights_backbone=None)`
(nothing downloaded) in train mode, min_size/max_size set to the images' size (800 x 1333 by
default: its transform then resizes by 1.0 and pads to 800 x 1344, the bucket our step runs),
on random images and random box targets (filled-box masks, one class), `--instances` per image.
One step is what torchvision's reference recipe (references/detection/train.py) runs: zero
grads, forward with the loss dict, backward of the summed losses, SGD with momentum 0.9 and
weight decay 1e-4 (at the warmup's first LR, 0.02 x 0.001, so random weights stay finite).
Per dtype: float32, and bfloat16 autocast (`amp-bf16`; no grad scaler needed for bfloat16).
cuDNN autotuning (`cudnn.benchmark`) is on: the images' size is fixed. A batch that runs out
of memory is halved. Reports images/s, the first step's seconds (cuDNN autotuning, allocator
growth: torch's counterpart of a compile) and peak memory (`max_memory_allocated`). The JSON is
rewritten after every row. Needs torch, torchvision and numpy only.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from bench_train import write_json  # noqa: E402


def random_targets(rng, b, h, w, g):
    """(b, g, 4) xyxy float32 boxes of 5-30 % of the image side, and their filled masks."""
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
    return boxes, masks


def bench(amp, b, h, w, g, steps, warmup, dev):
    import torch
    import torchvision

    model = torchvision.models.detection.maskrcnn_resnet50_fpn(
        weights=None, weights_backbone=None, min_size=min(h, w), max_size=max(h, w)
    ).to(dev)
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.02 * 0.001, momentum=0.9, weight_decay=1e-4)
    rng = np.random.default_rng(0)
    boxes, masks = random_targets(rng, b, h, w, g)
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
        opt.zero_grad(set_to_none=True)
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=amp):
            losses = model(images, targets)
            loss = sum(losses.values())
        loss.backward()
        opt.step()
        return loss

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize()

    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    step()
    sync()
    first_s = time.perf_counter() - t0
    for _ in range(warmup):
        step()
    sync()
    t0 = time.perf_counter()
    for _ in range(steps):
        loss = step()
    sync()
    dt = time.perf_counter() - t0
    row = {
        "images_per_s": b * steps / dt,
        "step_s": dt / steps,
        "first_step_s": first_s,
        "batch": b,
        "steps": steps,
        "loss": float(loss.detach()),
        "device": torch.cuda.get_device_name() if dev.type == "cuda" else "cpu",
    }
    if dev.type == "cuda":
        row["peak_bytes"] = int(torch.cuda.max_memory_allocated())
        row["peak_reserved_bytes"] = int(torch.cuda.max_memory_reserved())
    return row


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="128 x 128, batch 2, 2 steps (CPU)")
    p.add_argument("--height", type=int, default=None)
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--batch", type=int, default=None, help="images per step (default 16)")
    p.add_argument("--instances", type=int, default=15, help="gt instances per image")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--warmup", type=int, default=None, help="untimed steps after the first")
    p.add_argument("--dtypes", default="float32,amp-bf16")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    a = p.parse_args(argv)

    import torch
    import torchvision

    h = a.height or (128 if a.quick else 800)
    w = a.width or (128 if a.quick else 1333)
    batch = a.batch or (2 if a.quick else 16)
    steps = a.steps or (2 if a.quick else 10)
    warmup = a.warmup if a.warmup is not None else (0 if a.quick else 2)
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.backends.cudnn.benchmark = True
    result = {
        "model": "torchvision maskrcnn_resnet50_fpn (weights=None)",
        "height": h, "width": w, "instances": a.instances, "asked_batch": batch,
        "torch": torch.__version__, "torchvision": torchvision.__version__,
        "cudnn_benchmark": True, "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
        "matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32, "rows": [],
    }  # fmt: skip
    print(f"torch {torch.__version__}, torchvision {torchvision.__version__} on {dev}; "
          f"{h}x{w}, batch {batch}, {a.instances} instances/image, {steps} timed steps",
          flush=True)  # fmt: skip
    for name in [d for d in a.dtypes.split(",") if d]:
        if name not in ("float32", "amp-bf16"):
            raise SystemExit(f"unknown dtype {name}: float32 or amp-bf16")
        b = batch
        while True:
            try:
                r = bench(name == "amp-bf16", b, h, w, a.instances, steps, warmup, dev)
                break
            except torch.OutOfMemoryError as e:
                print(f"{name} batch {b}: out of memory ({str(e).splitlines()[0][:120]})")
                torch.cuda.empty_cache()
                if b == 1:
                    r = None
                    break
                b //= 2
        if r is None:
            continue
        r["dtype"] = name
        result["rows"].append(r)
        print(f"torchvision {name:9s} batch {r['batch']:3d}: {r['images_per_s']:8.2f} images/s, "
              f"step {r['step_s']:.3f} s, first step {r['first_step_s']:.1f} s"
              + (f", peak {r['peak_bytes'] / 2**30:.1f} GiB" if "peak_bytes" in r else ""),
              flush=True)  # fmt: skip
        write_json(a.out, result)
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    write_json(a.out, result)
    return result


if __name__ == "__main__":
    main()
