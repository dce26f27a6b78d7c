"""One Mean Teacher step against one plain supervised training step, in the same run.

    python experiments/bench_mean_teacher.py                  # CPU: small model, 96 x 128
    python experiments/bench_mean_teacher.py --gpu            # the R50 at 800 x 1344, 8 + 8
    python experiments/bench_mean_teacher.py --gpu --dtype bfloat16 --out mt.json

The MT step is `mean_teacher.make_mt_step` (EMA, the teacher's forward on the weak unlabel
views with its targets, the student on the strong + weak label views and the strong unlabel
views, backward, SGD), the plain step `supervised.make_train_step` (stage 2.2: one forward on
one view, backward, SGD); each jitted as its `train` jits it (state replicated, batches
sharded over the local devices, state donated). Both steps see batches of the real pipeline
(`loader.DetectionBatchSource` over generated scenes held in memory, the MT streams with strong
views, uint8 images and bit-packed masks), all of one bucket, built before timing.

Per step: compile (`lower().compile()`, separate from running), then one warm-up step and
`--steps` timed steps, each synchronised, the two steps alternating so that both see the same
load; the table gives the median, and the ratio is the median over back-to-back pairs.
"images" counts what the loader feeds a step (label + unlabel for MT). By default the plain
step's batch equals the MT step's label + unlabel images (16 = 8 + 8 with --gpu, as the
original's 2.2 and MT runs), so "ratio" is the MT step's cost for the same input images. What
the MT step runs for them: the teacher's forward on B_u weak views, the student's forward and
backward on 2 B_l + B_u views, and the teacher's targets (mask pasting at the padded size,
the coverage tree); the plain step one forward and backward on B views.

Imports jax, flax, optax, numpy, PIL, absl and orbax (through `mean_teacher`), nothing else:
no pycocotools, grain, clu or ml_collections, which the GPU machine lacks.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))
sys.path.insert(0, HERE)


def make_config(args):
    from bench_train import Cfg

    model = Cfg(size=args.model)
    if args.model == "small":
        model.update(pooler_sampling_ratio=2)
    data = Cfg(
        short_edges=(args.short_edge,), max_size=args.max_size, flip_prob=0.5, copy_paste=False,
        copy_paste_rate=1.0, copy_paste_min_ratio=0.3, copy_paste_max_ratio=1.0,
        buckets=(tuple(args.bucket),), max_instances=args.max_instances, pack_masks=True,
        workers=0,
    )
    return Cfg(
        model=model, dtype=args.dtype, batch_size=args.batch, seed=0,
        # Stage 2.2's optimizer for the plain step, WarmupCosineLR's for MT (as each runs).
        base_lr=0.01, lr_steps=(30000,), lr_gamma=0.1, max_iter=2000, warmup_iters=1000,
        warmup_factor=0.001, momentum=0.9, weight_decay=5e-5, clip_norm=1.0, data=data,
    )


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--gpu", action="store_true",
                   help="the R50 at the paper's 800 x 1344 bucket, 8 label + 8 unlabel")
    p.add_argument("--model", default=None, choices=("small", "r50"))
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                   help="both steps (the original's MT step is float32)")
    p.add_argument("--label", type=int, default=None, help="label images per MT step")
    p.add_argument("--unlabel", type=int, default=None, help="unlabel images per MT step")
    p.add_argument("--batch", type=int, default=None,
                   help="plain step's batch (default label + unlabel)")
    p.add_argument("--steps", type=int, default=None, help="timed steps of each")
    p.add_argument("--max-targets", type=int, default=-1,
                   help="teacher target slots per image (-1: one per detection, the recipe)")
    p.add_argument("--score-thresh", type=float, default=0.7)
    p.add_argument("--out", default=None, help="write the results as JSON here")
    args = p.parse_args(argv)

    gpu = args.gpu
    args.model = args.model or ("r50" if gpu else "small")
    args.label = args.label or (8 if gpu else 2)
    args.unlabel = args.unlabel or (8 if gpu else 2)
    args.batch = args.batch or (args.label + args.unlabel)
    args.steps = args.steps or 10
    if gpu:
        # 480 x 640 scenes, short side 800 (the most common of §2.2's sizes): 800 x 1067 in the
        # 800 x 1344 bucket, the shape a COCO image mostly has in training.
        scene, args.short_edge, args.max_size, args.bucket = (480, 640), 800, 1333, (800, 1344)
        args.max_instances = 100
    else:
        scene, args.short_edge, args.max_size, args.bucket = (96, 128), 96, 160, (96, 128)
        args.max_instances = 16

    import jax
    from bench_train import Cfg, SceneRecords
    from jax.sharding import NamedSharding, PartitionSpec

    from hassod_jax import parallel
    from hassod_jax.data import loader
    from hassod_jax.train import mean_teacher as MT
    from hassod_jax.train import supervised

    config = make_config(args)
    mesh = parallel.local_mesh()
    n_dev = mesh.devices.size
    for name in ("label", "unlabel", "batch"):
        if getattr(args, name) % n_dev:
            raise SystemExit(f"--{name} {getattr(args, name)} must be a multiple of {n_dev}")
    data = NamedSharding(mesh, PartitionSpec("data"))
    repl = NamedSharding(mesh, PartitionSpec())
    print(f"{jax.devices()[0].device_kind} x {n_dev}; {args.model}, {args.dtype}; bucket "
          f"{tuple(args.bucket)}; MT {args.label} + {args.unlabel}, plain {args.batch}",
          flush=True)

    t = time.perf_counter()
    records = SceneRecords(max(2 * (args.label + args.unlabel), args.batch, 8), scene)
    print(f"{len(records)} scenes in {time.perf_counter() - t:.1f} s", flush=True)

    def batches(bs, seed, strong, n):
        cfg = supervised.loader_config(config, global_batch_size=bs, seed=seed,
                                       strong_views=strong)
        src = loader.DetectionBatchSource(records, cfg, num_steps=n, process_index=0,
                                          process_count=1)
        out = [src[k] for k in range(n)]
        assert {b["images"].shape[1:3] for b in out} == {tuple(args.bucket)}
        return out

    n = args.steps + 1
    t = time.perf_counter()
    plain_b = batches(args.batch, 0, False, n)
    label_b, unlabel_b = batches(args.label, 0, True, n), batches(args.unlabel, 1, True, n)
    print(f"batches built in {time.perf_counter() - t:.1f} s", flush=True)

    # The plain (stage 2.2) step: DropLoss on, its multistep schedule.
    plain_model = supervised.build_model(
        Cfg(model=Cfg(config.model, use_droploss=True), dtype=args.dtype))
    tx, sched = supervised.make_optimizer(config)
    plain_state = supervised.init_state(plain_model, tx, jax.random.PRNGKey(0))
    plain_step = jax.jit(supervised.make_train_step(plain_model, tx, sched),
                         in_shardings=(repl, data, repl), out_shardings=(repl, repl),
                         donate_argnums=(0,))
    # The MT step: DropLoss off, WarmupCosineLR; student = teacher at the start.
    mt_model = supervised.build_model(
        Cfg(model=Cfg(config.model, use_droploss=False), dtype=args.dtype))
    mt_tx, mt_sched = MT.make_optimizer(config)
    # Host copies: the plain step donates (deletes) its state's buffers.
    mt_state = MT.init_mt_state(jax.device_get(
        {"params": plain_state.params, "batch_stats": plain_state.batch_stats}), mt_tx)
    mt_step = jax.jit(
        MT.make_mt_step(mt_model, mt_tx, mt_sched, total_steps=config.max_iter,
                        score_thresh=args.score_thresh, max_targets=args.max_targets),
        in_shardings=(repl, data, data, repl), out_shardings=(repl, repl), donate_argnums=(0,))
    plain_state = jax.device_put(plain_state, repl)
    mt_state = jax.device_put(mt_state, repl)
    rng = jax.random.PRNGKey(1)

    def plain_args(k):
        return (supervised.shard_batch(plain_b[k], data), rng)

    def mt_args(k):
        return (MT._shard(label_b[k], data), MT._shard(unlabel_b[k], data), rng)

    runs = [
        dict(step="plain (2.2)", fn=plain_step, state=plain_state, make_args=plain_args,
             images=args.batch),
        dict(step="mean teacher", fn=mt_step, state=mt_state, make_args=mt_args,
             images=args.label + args.unlabel),
    ]
    del plain_state, mt_state  # each run's state lives (and is donated) in its dict
    for r in runs:
        t0 = time.perf_counter()
        r["compiled"] = r["fn"].lower(r["state"], *r["make_args"](0)).compile()
        r["compile_s"] = time.perf_counter() - t0
        r["times"] = []
        print(f"{r['step']}: compiled in {r['compile_s']:.1f} s", flush=True)
    # The two steps alternate, so that both see the same load (a shared machine's load drifts);
    # step 0 of each warms up.
    for k in range(n):
        for r in runs:
            a = r["make_args"](k)
            jax.block_until_ready(a)
            t0 = time.perf_counter()
            r["state"], r["metrics"] = r["compiled"](r["state"], *a)
            jax.block_until_ready(r["metrics"])
            r["times"].append(time.perf_counter() - t0)
    rows = []
    plain_t = np.asarray(runs[0]["times"][1:])
    for r in runs:
        t = np.asarray(r["times"][1:])
        m = r["metrics"]
        print(f"{r['step']}: steps {', '.join(f'{x:.3f}' for x in r['times'])} s (first = "
              f"warm-up), loss {float(m['total_loss']):.3f}", flush=True)
        row = dict(step=r["step"], images=r["images"], compile_s=r["compile_s"],
                   step_s=float(np.median(t)), times=r["times"],
                   # the median over step pairs (timed back to back) of MT / plain
                   ratio=float(np.median(t / plain_t)), loss=float(m["total_loss"]))
        row["images_per_s"] = row["images"] / row["step_s"]
        if "teacher/targets_per_image" in m:
            row["teacher_targets_per_image"] = float(m["teacher/targets_per_image"])
        rows.append(row)

    print()
    print("| step | images/step | compile s | step s | images/s | step / plain |")
    print("| --- | --- | --- | --- | --- | --- |")
    for r in rows:
        imgs = (f"{args.label} + {args.unlabel}" if r["step"] == "mean teacher"
                else str(r["images"]))
        print(f"| {r['step']} | {imgs} | {r['compile_s']:.1f} | {r['step_s']:.3f} | "
              f"{r['images_per_s']:.2f} | {r['ratio']:.2f} |")
    print(f"\n{jax.devices()[0].device_kind} x {n_dev}, {args.model} {args.dtype}, bucket "
          f"{args.bucket[0]} x {args.bucket[1]}, median of {args.steps} steps after a warm-up, the "
          "two steps alternating (ratio: median over back-to-back pairs); "
          f"teacher targets/image {rows[1].get('teacher_targets_per_image', 0):.1f} "
          f"(threshold {args.score_thresh}, {args.max_targets} slots)")
    # Peak device memory over both steps (where the backend reports it: GPUs and TPUs do).
    mem = jax.devices()[0].memory_stats() or {}
    peak_gib = mem.get("peak_bytes_in_use", 0) / 2**30
    if peak_gib:
        print(f"peak device memory over both steps {peak_gib:.1f} GiB "
              f"(of {mem.get('bytes_limit', 0) / 2**30:.1f} GiB the allocator may use)")
    missing = [m for m in ("clu", "grain", "pycocotools", "ml_collections") if m in sys.modules]
    if missing:
        print(f"note: imported {missing}, which the GPU machine lacks")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"args": {k: v for k, v in vars(args).items()}, "rows": rows,
                       "device": jax.devices()[0].device_kind, "devices": n_dev,
                       "peak_gib": peak_gib}, f, indent=1)
    return rows


if __name__ == "__main__":
    main()
