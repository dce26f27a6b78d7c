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
`--steps` timed steps, each synchronised. The plain step is compiled and timed alone first
("plain_alone" in the JSON: our training step with the pipeline off, secured before the MT
step's longer compile); then both run again, alternating so that both see the same load; the
table gives the medians, and the ratio is the median over back-to-back pairs.
"images" counts what the loader feeds a step (label + unlabel for MT). By default the plain
step's batch equals the MT step's label + unlabel images (16 = 8 + 8 with --gpu, as the
original's 2.2 and MT runs), so "ratio" is the MT step's cost for the same input images. What
the MT step runs for them: the teacher's forward on B_u weak views, the student's forward and
backward on 2 B_l + B_u views, and the teacher's targets (mask pasting at the padded size,
the coverage tree); the plain step one forward and backward on B views.

The batches are built in a process pool before JAX starts. Each step is compiled ahead of
time and its memory analysis checked against the device's allocator limit: while the MT step
does not fit, label, unlabel and plain batches are halved (the paper's 8 + 8 "or the most per
device that fits"). The plain step's program is bench_train.py --gpu's at the same dtype and
batch (stage 2.2's optimizer), so a persistent compilation cache shared with that run serves
it. The JSON (`--out`) is rewritten after the compiles and after the timings.

Imports jax, flax, optax, numpy, PIL, absl and orbax (through `mean_teacher`), nothing else:
no pycocotools, grain, clu or ml_collections, which the GPU machine lacks.
"""

from __future__ import annotations

import argparse
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
        # Stage 2.2's optimizer for the plain step (defaults.training(): its 80000 milestone
        # lies beyond any max_iter here, so the LR is constant after the warmup, and the plain
        # step is the same program as bench_train.py's), WarmupCosineLR's for MT.
        base_lr=0.01, lr_steps=(80000,), lr_gamma=0.02, max_iter=2000, warmup_iters=1000,
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
    p.add_argument("--limit-bytes", type=float, default=None,
                   help="take this as the device's memory limit (to check the halving on CPU)")
    p.add_argument("--pool", type=int, default=None,
                   help="processes that build scenes and batches (default: CPUs)")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    args = p.parse_args(argv)

    gpu = args.gpu
    args.model = args.model or ("r50" if gpu else "small")
    args.label = args.label or (8 if gpu else 2)
    args.unlabel = args.unlabel or (8 if gpu else 2)
    args.batch = args.batch or (args.label + args.unlabel)
    args.steps = args.steps or (5 if gpu else 10)
    if gpu:
        # 480 x 640 scenes, short side 800 (the most common of the training resize's sizes):
        # 800 x 1067 in the 800 x 1344 bucket, the shape a COCO image mostly has in training.
        scene, args.short_edge, args.max_size, args.bucket = (480, 640), 800, 1333, (800, 1344)
        args.max_instances = 100
    else:
        scene, args.short_edge, args.max_size, args.bucket = (96, 128), 96, 160, (96, 128)
        args.max_instances = 16

    from bench_train import (
        Cfg,
        SceneRecords,
        build_batches,
        check_loader_cfg,
        device_memory,
        halve_batch,
        imported_not_on_device,
        is_oom,
        loader_cfg,
        memory_fit,
        write_json,
    )  # fmt: skip

    config = make_config(args)
    n = args.steps + 1
    streams = {  # name: (global batch, sampler seed, strong views)
        "plain": (args.batch, 0, False),
        "label": (args.label, 0, True),
        "unlabel": (args.unlabel, 1, True),
    }
    # Host work first, in forked processes, before JAX starts any thread.
    procs = args.pool if args.pool is not None else (os.cpu_count() or 1)
    t = time.perf_counter()
    records = SceneRecords(max(2 * (args.label + args.unlabel), args.batch, 8), scene,
                           workers=procs)  # fmt: skip
    scenes_s = time.perf_counter() - t
    t = time.perf_counter()
    built = {}
    for name, (bs, seed, strong) in streams.items():
        lcfg = loader_cfg(config, global_batch_size=bs, seed=seed, strong_views=strong)
        built[name] = build_batches(records, lcfg, n, procs)
        assert {b["images"].shape[1:3] for b in built[name]} == {tuple(args.bucket)}
    build_s = time.perf_counter() - t
    print(f"{len(records)} scenes in {scenes_s:.1f} s; batches built in {build_s:.1f} s",
          flush=True)  # fmt: skip

    import jax
    from jax.sharding import NamedSharding, PartitionSpec

    from hassod_jax import parallel
    from hassod_jax.modes import mean_teacher as mt_mode
    from hassod_jax.modes import train as train_mode
    from hassod_jax.train import mean_teacher as MT
    from hassod_jax.train import supervised

    for bs, seed, strong in streams.values():
        check_loader_cfg(loader_cfg(config, global_batch_size=bs, seed=seed, strong_views=strong),
                         config, global_batch_size=bs, seed=seed, strong_views=strong)
    mesh = parallel.local_mesh()
    n_dev = mesh.devices.size
    for name in ("label", "unlabel", "batch"):
        if getattr(args, name) % n_dev:
            raise SystemExit(f"--{name} {getattr(args, name)} must be a multiple of {n_dev}")
    data = NamedSharding(mesh, PartitionSpec("data"))
    repl = NamedSharding(mesh, PartitionSpec())
    device = jax.devices()[0].device_kind
    print(f"{device} x {n_dev}; {args.model}, {args.dtype}; bucket {tuple(args.bucket)}; MT "
          f"{args.label} + {args.unlabel}, plain {args.batch}", flush=True)  # fmt: skip
    result = {"args": dict(vars(args)), "device": device, "devices": n_dev,
              "jax": jax.__version__, "scenes_s": scenes_s, "build_s": build_s}  # fmt: skip

    # The plain (stage 2.2) step: DropLoss on, its multistep schedule.
    plain_model = train_mode.build_model(
        Cfg(model=Cfg(config.model, use_droploss=True), dtype=args.dtype))
    tx, sched = train_mode.make_optimizer(config)
    plain_host = jax.device_get(supervised.init_state(plain_model, tx, jax.random.PRNGKey(0)))
    plain_step = jax.jit(supervised.make_train_step(plain_model, tx, sched),
                         in_shardings=(repl, data, repl), out_shardings=(repl, repl),
                         donate_argnums=(0,))
    # The MT step: DropLoss off, WarmupCosineLR; student = teacher at the start.
    mt_model = train_mode.build_model(
        Cfg(model=Cfg(config.model, use_droploss=False), dtype=args.dtype))
    mt_tx, mt_sched = mt_mode.make_optimizer(config)
    mt_host = jax.device_get(MT.init_mt_state(
        {"params": plain_host.params, "batch_stats": plain_host.batch_stats}, mt_tx))
    mt_step = jax.jit(
        MT.make_mt_step(mt_model, mt_tx, mt_sched, total_steps=config.max_iter,
                        score_thresh=args.score_thresh, max_targets=args.max_targets),
        in_shardings=(repl, data, data, repl), out_shardings=(repl, repl), donate_argnums=(0,))
    rng = jax.random.PRNGKey(1)

    def plain_args(k):
        return (supervised.shard_batch(built["plain"][k], data), rng)

    def mt_args(k):
        return (MT._shard(built["label"][k], data), MT._shard(built["unlabel"][k], data), rng)

    _, limit = device_memory()
    limit = args.limit_bytes or limit
    plain = dict(step="plain (2.2)", fn=plain_step, host=plain_host, make_args=plain_args)
    mt = dict(step="mean teacher", fn=mt_step, host=mt_host, make_args=mt_args)

    def compile_run(r):
        r["images"] = args.batch if r is plain else args.label + args.unlabel
        t0 = time.perf_counter()
        r["state"] = jax.device_put(r["host"], repl)
        r["compiled"] = r["fn"].lower(r["state"], *r["make_args"](0)).compile()
        r["compile_s"] = time.perf_counter() - t0
        r["memory"] = memory_fit(r["compiled"], r["images"], limit)
        r["times"] = []
        print(f"{r['step']} ({r['images']} images): compiled in {r['compile_s']:.1f} s; "
              f"memory {r['memory']}", flush=True)  # fmt: skip
        result.setdefault("compile", {})[r["step"]] = {
            "compile_s": r["compile_s"], "memory": r["memory"], "images": r["images"]}
        write_json(args.out, result)
        return r["memory"]["fits"]

    def run(r, k):
        a = r["make_args"](k)
        jax.block_until_ready(a)
        t0 = time.perf_counter()
        r["state"], r["metrics"] = r["compiled"](r["state"], *a)
        jax.block_until_ready(r["metrics"])
        return time.perf_counter() - t0

    def halve_all(why):
        label, unlabel = halve_batch(args.label, n_dev), halve_batch(args.unlabel, n_dev)
        batch = halve_batch(args.batch, n_dev)
        print(f"{why}: MT {args.label} + {args.unlabel} -> {label} + {unlabel}, plain "
              f"{args.batch} -> {batch}", flush=True)  # fmt: skip
        for name, new in (("label", label), ("unlabel", unlabel), ("plain", batch)):
            built[name] = [{k: v[:new] for k, v in b.items()} for b in built[name]]
        args.label, args.unlabel, args.batch = label, unlabel, batch
        result["batch_note"] = f"halved to fit: MT {label} + {unlabel}, plain {batch}"

    def fits_and_runs(rs):
        """Compiles `rs` (if not yet), then runs them alternating for every prepared step;
        False on a memory misfit or a run-time out-of-memory."""
        for r in rs:
            if "compiled" not in r and not compile_run(r):
                return False
        try:
            # The steps alternate, so that both see the same load (a shared machine's load
            # drifts); step 0 of each warms up.
            for r in rs:
                r["times"] = []
            for k in range(n):
                for r in rs:
                    r["times"].append(run(r, k))
            return True
        except Exception as e:  # noqa: BLE001 - XLA reports OOM as several error types
            if not is_oom(e):
                raise
            print(f"out of memory at run time ({str(e).splitlines()[0]})", flush=True)
            return False

    # The plain step first, timed alone too: it is our training step at this dtype with the
    # pipeline off, measured before the Mean Teacher step's long compile.
    while not fits_and_runs([plain]):
        plain.pop("compiled", None)
        halve_all("the plain step does not fit")
    t = np.asarray(plain["times"][1:])
    result["plain_alone"] = {"images": plain["images"], "step_s": float(np.median(t)),
                             "images_per_s": plain["images"] / float(np.median(t)),
                             "compile_s": plain["compile_s"], "times": plain["times"]}
    print(f"plain step alone: {result['plain_alone']['images_per_s']:.2f} images/s", flush=True)
    write_json(args.out, result)
    while not fits_and_runs([plain, mt]):
        plain.pop("compiled", None)
        mt.pop("compiled", None)
        halve_all("the Mean Teacher step does not fit")
    runs = [plain, mt]
    rows = []
    plain_t = np.asarray(runs[0]["times"][1:])
    for r in runs:
        t = np.asarray(r["times"][1:])
        m = r["metrics"]
        print(f"{r['step']}: steps {', '.join(f'{x:.3f}' for x in r['times'])} s (first = "
              f"warm-up), loss {float(m['total_loss']):.3f}", flush=True)
        row = dict(step=r["step"], images=r["images"], compile_s=r["compile_s"],
                   memory=r["memory"],
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
    peak, limit = device_memory()
    peak_gib = (peak or 0) / 2**30
    if peak_gib:
        print(f"peak device memory over both steps {peak_gib:.1f} GiB "
              f"(of {limit / 2**30:.1f} GiB the allocator may use)")
    missing = imported_not_on_device()
    if missing:
        print(f"note: imported {missing}, which the GPU machine lacks")
    result.update(args=dict(vars(args)), rows=rows, peak_gib=peak_gib,
                  limit_gib=(limit or 0) / 2**30, imported_not_on_device=missing)
    write_json(args.out, result)
    return rows


if __name__ == "__main__":
    main()
