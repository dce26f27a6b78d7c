"""Training throughput (images/s) of the full train step with the input pipeline on and off.

    python experiments/bench_train.py --quick            # CPU: small model, small images
    python experiments/bench_train.py                    # full R50, the paper's sizes (§2.2)
    python experiments/bench_train.py --workers 0,4,8 --out results.json

The step is `supervised.make_train_step` (forward, losses, backward, SGD with clipping,
state donated), jitted with the batch sharded over all local devices, exactly as
`supervised.train` runs it. Data are generated scenes (`data.synthetic.make_scene`) held in
memory and fed through the real pipeline (`loader.DetectionBatchSource`: multi-scale resize,
flip, copy-paste, bucketing, padding, uint8 images and bit-packed masks). Modes:

  premade   the batches are built before timing: step time alone (+ host-to-device copy);
  inline    the pipeline runs in this process between steps (`NumpyBatchIterator`);
  grainN    grain with N worker processes (`GrainBatchIterator`), skipped without grain.

Every mode replays the same batch plan (the same seed and steps), and every bucket's step is
compiled first, so no mode pays compilation. If `inline`/`grainN` reach `premade`'s rate,
the input keeps up with the accelerator. Needs jax, flax, optax, numpy, scipy, pillow
(grain optional; no ml_collections, pycocotools or clu).

The default (full R50, bfloat16, paper sizes) is meant for an accelerator: on a CPU
bfloat16 is emulated (measured here: the R50 at 128 x 160 in bfloat16 ran 0.02 images/s).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


class Cfg(dict):
    """Attribute access over a dict: stands in for the ml_collections config."""

    __getattr__ = dict.__getitem__

    def get(self, k, default=None):
        return dict.get(self, k, default)


class SceneRecords:
    """In-memory generated scenes with the `CocoRecords` interface (no files, no pycocotools)."""

    def __init__(self, n, size, seed=0, n_objects=(2, 4)):
        from hassod_jax.data import augment
        from hassod_jax.data.synthetic import make_scene

        rng = np.random.default_rng(seed)
        self.examples = []
        for _ in range(n):
            img, anns = make_scene(rng, size, n_objects=n_objects)
            masks = np.stack([a["mask"] for a in anns]) if anns else np.zeros((0,) + size, bool)
            self.examples.append(
                {
                    "image": img,
                    "masks": masks,
                    "boxes": augment.masks_to_boxes(masks).astype(np.float32),
                    "levels": np.array([a["hier_level"] for a in anns], np.int32),
                }
            )
        self.sizes = np.array([e["image"].shape[:2] for e in self.examples], np.int64)
        self.image_ids = np.arange(1, n + 1, dtype=np.int64)

    def __len__(self):
        return len(self.examples)

    def load(self, i):
        return {k: v.copy() for k, v in self.examples[i].items()}


def make_config(args):
    small = args.model == "small"
    model = Cfg(size=args.model, use_droploss=True)
    if small:
        model.update(pooler_sampling_ratio=2)
    data = Cfg(
        short_edges=tuple(args.short_edges),
        max_size=args.max_size,
        flip_prob=0.5,
        copy_paste=True,
        copy_paste_rate=1.0,
        copy_paste_min_ratio=0.3,
        copy_paste_max_ratio=1.0,
        buckets=tuple(tuple(b) for b in args.buckets) if args.buckets else (),
        max_instances=args.max_instances,
        pack_masks=True,
        workers=0,
    )
    return Cfg(
        model=model,
        dtype=args.dtype,
        batch_size=args.batch,
        seed=0,
        base_lr=0.01,
        lr_steps=(30000,),
        lr_gamma=0.1,
        warmup_iters=1000,
        warmup_factor=0.001,
        momentum=0.9,
        weight_decay=5e-5,
        clip_norm=1.0,
        data=data,
    )


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small model, small images, few steps")
    p.add_argument("--model", default=None, choices=("small", "r50"))
    p.add_argument("--dtype", default=None, choices=("float32", "bfloat16"))
    p.add_argument("--batch", type=int, default=None, help="global batch (default 16; quick 4)")
    p.add_argument("--steps", type=int, default=None, help="timed steps per mode")
    p.add_argument("--scenes", type=int, default=None, help="generated scenes in memory")
    p.add_argument("--workers", default=None, help="grain worker counts, e.g. 2,4 ('' = none)")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    args = p.parse_args(argv)

    quick = args.quick
    args.model = args.model or ("small" if quick else "r50")
    args.dtype = args.dtype or ("float32" if quick else "bfloat16")
    args.batch = args.batch or (4 if quick else 16)
    args.steps = args.steps or (12 if quick else 30)
    args.scenes = args.scenes or (16 if quick else 64)
    if args.workers is None:
        args.workers = "2" if quick else "4,8"
    workers = [int(w) for w in args.workers.split(",") if w.strip()]
    if quick:
        # Scenes of 96 x 128, short side 96..128, max 160: CPU-sized.
        scene_size, args.short_edges, args.max_size = (96, 128), (96, 128), 160
        args.buckets = ((96, 160), (128, 160), (160, 96), (160, 128))
        args.max_instances = 16
    else:
        # COCO-like 480 x 640 scenes through the paper's multi-scale resize (§2.2).
        from hassod_jax.data import augment

        scene_size, args.short_edges, args.max_size = (480, 640), augment.SHORT_EDGES, 1333
        args.buckets, args.max_instances = None, 100

    import jax
    from jax.sharding import NamedSharding, PartitionSpec

    from hassod_jax import parallel
    from hassod_jax.data import loader
    from hassod_jax.train import supervised

    config = make_config(args)
    mesh = parallel.local_mesh()
    if args.batch % mesh.devices.size:
        raise SystemExit(f"--batch {args.batch} must be a multiple of {mesh.devices.size} devices")
    data_sharding = NamedSharding(mesh, PartitionSpec("data"))
    replicated = NamedSharding(mesh, PartitionSpec())
    model = supervised.build_model(config)
    tx, schedule = supervised.make_optimizer(config)
    state = jax.device_put(supervised.init_state(model, tx, jax.random.PRNGKey(0)), replicated)
    step_fn = jax.jit(
        supervised.make_train_step(model, tx, schedule),
        in_shardings=(replicated, data_sharding, replicated),
        out_shardings=(replicated, replicated),
        donate_argnums=(0,),
    )
    rng = jax.random.PRNGKey(1)

    t = time.perf_counter()
    records = SceneRecords(args.scenes, scene_size)
    print(f"{args.scenes} scenes generated in {time.perf_counter() - t:.1f} s", flush=True)
    lcfg = supervised.loader_config(config)
    source = loader.DetectionBatchSource(
        records, lcfg, num_steps=args.steps, process_index=0, process_count=1
    )
    t = time.perf_counter()
    premade = [source[k] for k in range(args.steps)]
    build_s = (time.perf_counter() - t) / args.steps
    shapes = sorted({b["images"].shape[1:3] for b in premade})
    print(f"buckets used: {shapes}; building a batch in-process: {build_s:.3f} s", flush=True)

    # Compile every bucket's step (and warm up) outside the timings.
    t = time.perf_counter()
    seen = set()
    for b in premade:
        if b["images"].shape[1:3] not in seen:
            seen.add(b["images"].shape[1:3])
            state, m = step_fn(state, supervised.shard_batch(b, data_sharding), rng)
    jax.block_until_ready(m)
    compile_s = time.perf_counter() - t
    print(f"compile + first steps: {compile_s:.1f} s", flush=True)

    def timed(batches):
        nonlocal state
        t0 = time.perf_counter()
        n, m = 0, None
        for b in batches:
            state, m = step_fn(state, supervised.shard_batch(b, data_sharding), rng)
            n += int(b["images"].shape[0])
        jax.block_until_ready(m)
        dt = time.perf_counter() - t0
        return n / dt, float(m["total_loss"])

    rows = []
    modes = [
        ("premade", lambda: iter(premade)),
        ("inline", lambda: loader.NumpyBatchIterator(source)),
    ]
    try:
        import grain.python  # noqa: F401

        for w in workers:
            modes.append(
                (f"grain{w}", lambda w=w: loader.GrainBatchIterator(source, worker_count=w))
            )
    except ImportError:
        print("grain is not installed: grain modes skipped", flush=True)
    for name, make in modes:
        it = make()
        if name.startswith("grain"):
            # Worker start-up is not throughput: the first batch is taken before timing
            # (the timed steps are then steps - 1).
            state, m = step_fn(state, supervised.shard_batch(next(it), data_sharding), rng)
            jax.block_until_ready(m)
        ips, loss = timed(it)
        if hasattr(it, "close"):
            it.close()
        rows.append({"mode": name, "images_per_s": ips, "final_loss": loss})
        print(f"{name:>10s}: {ips:8.2f} images/s", flush=True)

    result = {
        "device": str(jax.devices()[0].device_kind),
        "platform": jax.default_backend(),
        "devices": int(mesh.devices.size),
        "model": args.model,
        "dtype": args.dtype,
        "global_batch": args.batch,
        "steps": args.steps,
        "scene_size": list(scene_size),
        "short_edges": list(args.short_edges),
        "max_size": args.max_size,
        "buckets_used": [list(s) for s in shapes],
        "batch_build_s_inline": build_s,
        "compile_s": compile_s,
        "rows": rows,
    }
    print()
    print(f"{'mode':>10s} {'images/s':>10s}   ({result['device']}, {args.model}, {args.dtype})")
    for r in rows:
        print(f"{r['mode']:>10s} {r['images_per_s']:10.2f}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main()
