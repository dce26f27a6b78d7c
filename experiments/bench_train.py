"""Training throughput (images/s) of the full train step with the input pipeline off and on.

    python experiments/bench_train.py --quick            # CPU: small model, small images
    python experiments/bench_train.py --gpu              # R50, 800x1333 in the 800x1344 bucket
    python experiments/bench_train.py --gpu --dtype float32 --batch 16 --out train.json
    python experiments/bench_train.py                    # R50, the paper's multi-scale sizes

The step is `supervised.make_train_step` (forward, losses, backward, SGD with clipping,
state donated), jitted with the batch sharded over all local devices as `modes.train.train`
jits it, with stage 2.2's optimizer settings (`defaults.training()`). It is compiled ahead
of time (`lower().compile()`, timed apart from the steps); before it runs, its memory
analysis is checked against the device's allocator limit and the batch halved while it
does not fit (a run-time out-of-memory halves it too), and the largest batch that would fit
is estimated from the same analysis. Data are generated scenes (`data.synthetic.make_scene`)
held in memory and fed through the real pipeline (`loader.DetectionBatchSource`: resize, flip,
copy-paste, bucketing, padding, uint8 images and bit-packed masks). Modes:

  premade   pipeline off: the batches are built before timing (in a process pool, before
            JAX starts), so the step alone is timed (+ the host-to-device copy of each batch);
  inline    pipeline on, in this process between steps (`NumpyBatchIterator`);
  grainN    pipeline on, as training runs it: grain with N worker processes
            (`GrainBatchIterator`); skipped (inline instead) where grain does not import.

Every mode replays the same batch plan. `--gpu` uses one bucket, 800 x 1344, and scenes of
480 x 800 resized to 800 x 1333 (torchvision's Mask R-CNN at min_size 800, max_size 1333 sees
the same size: experiments/bench_torchvision.py). `--profile-steps K` then traces K steps with
`jax.profiler` and prints where the device time goes, by source function and forward/backward
(`profile_detector.trace_summary`). The JSON (`--out`) is rewritten after every figure, so a
run stopped by a timeout keeps what it measured.

Needs jax, flax, optax, numpy, scipy, pillow (grain optional); no ml_collections, pycocotools
or clu. On a CPU bfloat16 is emulated (the R50 at 128 x 160 in bfloat16 ran 0.02 images/s).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))
sys.path.insert(0, HERE)

# Modules the GPU machine lacks (experiments/gpu_bench.sh carries wheels for some).
NOT_ON_DEVICE = ("ml_collections", "clu", "pycocotools", "grain", "pydensecrf")


class Cfg(dict):
    """Attribute access over a dict: stands in for the ml_collections config."""

    __getattr__ = dict.__getitem__

    def get(self, k, default=None):
        return dict.get(self, k, default)


def _scene(args):
    from hassod_jax.data import augment
    from hassod_jax.data.synthetic import make_scene

    seed, i, size, n_objects = args
    img, anns = make_scene(np.random.default_rng([seed, i]), size, n_objects=n_objects)
    masks = np.stack([a["mask"] for a in anns]) if anns else np.zeros((0,) + size, bool)
    return {
        "image": img,
        "masks": masks,
        "boxes": augment.masks_to_boxes(masks).astype(np.float32),
        "levels": np.array([a["hier_level"] for a in anns], np.int32),
    }


_FORKED = {}  # what the forked workers of `pool_map` read


def _batch(k):
    return _FORKED["source"][k]


def pool_map(fn, items, workers, shared=None):
    """[fn(x) for x in items] in `workers` forked processes (serially for one worker), which see
    `shared` as `_FORKED`. Only for host work done BEFORE JAX starts its runtime (fork is then
    safe)."""
    items = list(items)
    if workers <= 1 or len(items) <= 1:
        _FORKED.update(shared or {})
        try:
            return [fn(x) for x in items]
        finally:
            _FORKED.clear()
    _FORKED.update(shared or {})
    try:
        with multiprocessing.get_context("fork").Pool(min(workers, len(items))) as pool:
            return pool.map(fn, items, chunksize=1)
    finally:
        _FORKED.clear()


class SceneRecords:
    """In-memory generated scenes with the `CocoRecords` interface (no files, no pycocotools).
    Scene i is a pure function of (seed, i), so forked processes may generate them."""

    def __init__(self, n, size, seed=0, n_objects=(2, 4), workers=1):
        jobs = [(seed, i, tuple(size), tuple(n_objects)) for i in range(n)]
        self.examples = pool_map(_scene, jobs, workers)
        self.sizes = np.array([e["image"].shape[:2] for e in self.examples], np.int64)
        self.image_ids = np.arange(1, n + 1, dtype=np.int64)

    def __len__(self):
        return len(self.examples)

    def load(self, i):
        return {k: v.copy() for k, v in self.examples[i].items()}


def build_batches(records, lcfg, steps, workers=1):
    """source[0..steps-1] of a DetectionBatchSource over `records`, built in forked processes."""
    from hassod_jax.data import loader

    source = loader.DetectionBatchSource(
        records, lcfg, num_steps=steps, process_index=0, process_count=1
    )
    return pool_map(_batch, range(steps), workers, {"source": source})


def make_config(args):
    """Stage 2.2's settings (defaults.training()) without ml_collections."""
    model = Cfg(size=args.model, use_droploss=True)
    if args.model == "small":
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
        max_iter=40000,
        base_lr=0.01,
        lr_steps=(80000,),
        lr_gamma=0.02,
        warmup_iters=1000,
        warmup_factor=0.001,
        momentum=0.9,
        weight_decay=5e-5,
        clip_norm=1.0,
        data=data,
    )


def loader_cfg(config, **overrides):
    """`modes.train.loader_config(config, **overrides)` without importing JAX (the batches are
    built in forked processes before JAX starts); `check_loader_cfg` compares the two."""
    from hassod_jax.data import loader

    d = config.data
    fields = dict(
        global_batch_size=config.get("batch_size", 1),
        seed=config.seed,
        short_edges=tuple(d.short_edges),
        max_size=d.max_size,
        flip_prob=d.flip_prob,
        copy_paste=d.copy_paste,
        copy_paste_rate=d.copy_paste_rate,
        copy_paste_min_ratio=d.copy_paste_min_ratio,
        copy_paste_max_ratio=d.copy_paste_max_ratio,
        buckets=tuple(tuple(b) for b in d.buckets) or loader.DEFAULT_BUCKETS,
        max_instances=d.max_instances,
        image_dtype="uint8",
        pack_masks=d.pack_masks,
    )
    return loader.LoaderConfig(**{**fields, **overrides})


def check_loader_cfg(lcfg, config, **overrides):
    from hassod_jax.modes import train as train_mode

    ref = train_mode.loader_config(config, **overrides)
    if ref != lcfg:
        raise SystemExit(f"bench loader config differs from modes.train.loader_config:\n"
                         f"{lcfg}\n{ref}")  # fmt: skip


def write_json(path, obj):
    """Atomic rewrite: a reader (or a timeout) never sees half a file."""
    if not path:
        return
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1, default=str)
    os.replace(tmp, path)


def device_memory():
    """(peak bytes in use, allocator limit) of device 0, or (None, None) where the backend
    reports no statistics (CPU)."""
    import jax

    stats = jax.local_devices()[0].memory_stats() or {}
    return stats.get("peak_bytes_in_use"), stats.get("bytes_limit")


def memory_fit(compiled, batch, limit, margin=0.97):
    """The compiled program's memory analysis: bytes it needs, whether that fits `limit`, and
    the largest batch that would (temp memory taken as proportional to the batch: an estimate).
    """
    try:
        ma = compiled.memory_analysis()
    except Exception:  # noqa: BLE001 - not every backend implements it
        ma = None
    if ma is None:
        return {"need_bytes": None, "fits": True}
    fixed = ma.argument_size_in_bytes + ma.output_size_in_bytes - ma.alias_size_in_bytes
    temp = ma.temp_size_in_bytes
    need = fixed + temp + ma.generated_code_size_in_bytes
    out = {
        "need_bytes": int(need),
        "temp_bytes": int(temp),
        "argument_bytes": int(ma.argument_size_in_bytes),
        "limit_bytes": int(limit) if limit else None,
        "fits": limit is None or need <= margin * limit,
    }
    if limit and temp:
        out["estimated_max_batch"] = int((margin * limit - fixed) // (temp / batch))
    return out


def halve_batch(batch, n_dev):
    b = batch // 2
    b -= b % n_dev
    if b < n_dev:
        raise SystemExit(f"batch {batch}: does not fit even at {n_dev} image(s) per device")
    return b


def is_oom(e):
    return "RESOURCE_EXHAUSTED" in str(e) or "out of memory" in str(e).lower()


def imported_not_on_device():
    return sorted(m for m in NOT_ON_DEVICE if m in sys.modules)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small model, small images, few steps")
    p.add_argument("--gpu", action="store_true", help="R50, one 800x1344 bucket, 800x1333 images")
    p.add_argument("--model", default=None, choices=("small", "r50"))
    p.add_argument("--dtype", default=None, choices=("float32", "bfloat16"))
    p.add_argument("--batch", type=int, default=None, help="global batch (default 16; quick 4)")
    p.add_argument("--steps", type=int, default=None, help="timed steps per mode")
    p.add_argument("--scenes", type=int, default=None, help="generated scenes in memory")
    p.add_argument("--modes", default=None,
                   help="comma-separated: premade, inline, grainN (default premade,inline,grain"
                        "W per --workers; --gpu premade,grain12)")  # fmt: skip
    p.add_argument("--workers", default=None, help="grain worker counts, e.g. 2,4 ('' = none)")
    p.add_argument(
        "--pool",
        type=int,
        default=None,
        help="processes that build scenes and premade batches (default: CPUs)",
    )
    p.add_argument(
        "--scene",
        type=int,
        nargs=2,
        default=None,
        metavar=("H", "W"),
        help="generated scenes' size (overrides --quick/--gpu's)",
    )
    p.add_argument("--short-edge", type=int, default=None, help="one resize short side")
    p.add_argument(
        "--bucket", type=int, nargs=2, default=None, metavar=("H", "W"), help="one padding bucket"
    )
    p.add_argument(
        "--limit-bytes",
        type=float,
        default=None,
        help="take this as the device's memory limit (to check the halving on CPU)",
    )
    p.add_argument("--profile-steps", type=int, default=0, help="trace this many steps")
    p.add_argument("--trace-out", default=None, help="copy the perfetto trace here (if small)")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    args = p.parse_args(argv)

    quick, gpu = args.quick, args.gpu
    args.model = args.model or ("small" if quick else "r50")
    args.dtype = args.dtype or ("float32" if quick else "bfloat16")
    args.batch = args.batch or (4 if quick else 16)
    args.steps = args.steps or (6 if quick else 10 if gpu else 30)
    args.scenes = args.scenes or (8 if quick else 32 if gpu else 64)
    if args.workers is None:
        args.workers = "2" if quick else "12" if gpu else "4,8"
    workers = [int(w) for w in args.workers.split(",") if w.strip()]
    if args.modes is None:
        modes = ["premade"] + ([] if gpu else ["inline"]) + [f"grain{w}" for w in workers]
    else:
        modes = [m for m in args.modes.split(",") if m]
    n_objects = (2, 4)
    if quick:
        # Scenes of 96 x 128, short side 96..128, max 160: CPU-sized.
        scene_size, args.short_edges, args.max_size = (96, 128), (96, 128), 160
        args.buckets = ((96, 160), (128, 160), (160, 96), (160, 128))
        args.max_instances = 16
    elif gpu:
        # 480 x 800 scenes at short side 800: 800 x 1333, in the 800 x 1344 bucket.
        scene_size, args.short_edges, args.max_size = (480, 800), (800,), 1333
        args.buckets, args.max_instances = ((800, 1344),), 100
    else:
        # COCO-like 480 x 640 scenes through the paper's multi-scale resize.
        from hassod_jax.data import augment

        scene_size, args.short_edges, args.max_size = (480, 640), augment.SHORT_EDGES, 1333
        args.buckets, args.max_instances = None, 100
    scene_size = tuple(args.scene or scene_size)
    if args.short_edge:
        args.short_edges = (args.short_edge,)
    if args.bucket:
        args.buckets = (tuple(args.bucket),)
    config = make_config(args)
    lcfg = loader_cfg(config)
    result = {"args": vars(args), "modes": modes, "rows": []}

    # Host work first, in forked processes, before JAX starts any thread.
    procs = args.pool if args.pool is not None else (os.cpu_count() or 1)
    t = time.perf_counter()
    records = SceneRecords(args.scenes, scene_size, n_objects=n_objects, workers=procs)
    scenes_s = time.perf_counter() - t
    t = time.perf_counter()
    premade = build_batches(records, lcfg, args.steps, procs)
    build_s = time.perf_counter() - t
    instances = float(np.mean([b["valid"].sum(1).mean() for b in premade]))
    shapes = sorted({b["images"].shape[1:3] for b in premade})
    print(f"{args.scenes} scenes {scene_size} in {scenes_s:.1f} s; {args.steps} batches of "
          f"{args.batch} built in {build_s:.1f} s; buckets {shapes}; {instances:.1f} instances "
          f"per image", flush=True)  # fmt: skip

    import jax
    from jax.sharding import NamedSharding, PartitionSpec

    from hassod_jax import parallel
    from hassod_jax.data import loader
    from hassod_jax.modes import train as train_mode
    from hassod_jax.train import supervised

    check_loader_cfg(lcfg, config)
    mesh = parallel.local_mesh()
    n_dev = int(mesh.devices.size)
    if args.batch % n_dev:
        raise SystemExit(f"--batch {args.batch} must be a multiple of {n_dev} devices")
    data_sharding = NamedSharding(mesh, PartitionSpec("data"))
    replicated = NamedSharding(mesh, PartitionSpec())
    model = train_mode.build_model(config)
    tx, schedule = train_mode.make_optimizer(config)
    host_state = jax.device_get(supervised.init_state(model, tx, jax.random.PRNGKey(0)))
    step_fn = jax.jit(
        supervised.make_train_step(model, tx, schedule),
        in_shardings=(replicated, data_sharding, replicated),
        out_shardings=(replicated, replicated),
        donate_argnums=(0,),
    )
    rng = jax.random.PRNGKey(1)
    device = str(jax.devices()[0].device_kind)
    result.update(
        device=device, platform=jax.default_backend(), jax=jax.__version__, devices=n_dev,
        model=args.model, dtype=args.dtype, scene_size=list(scene_size),
        short_edges=list(args.short_edges), max_size=args.max_size,
        buckets_used=[list(s) for s in shapes], instances_per_image=instances,
        scenes_s=scenes_s, premade_build_s=build_s,
        build_processes=procs,
    )  # fmt: skip

    def dev_batch(b):
        return supervised.shard_batch(b, data_sharding)

    write_json(args.out, result)  # so that a timeout during the compile keeps the above
    # Compile the one bucket's step (AOT), check its memory, halve the batch until it fits.
    # Multi-bucket plans (no --gpu/--quick single bucket) compile the others at first use.
    batch = args.batch
    _, limit = device_memory()
    limit = args.limit_bytes or limit
    while True:
        t = time.perf_counter()
        state = jax.device_put(host_state, replicated)
        lowered = step_fn.lower(state, dev_batch(premade[0]), rng)
        compiled = lowered.compile()
        compile_s = time.perf_counter() - t
        fit = memory_fit(compiled, batch, limit)
        print(f"batch {batch}: compiled in {compile_s:.1f} s; memory analysis {fit}", flush=True)
        if fit["fits"]:
            try:
                t = time.perf_counter()
                state, m = compiled(state, dev_batch(premade[0]), rng)
                jax.block_until_ready(m)
                first_s = time.perf_counter() - t
                break
            except Exception as e:  # noqa: BLE001 - XLA reports OOM as several error types
                if not is_oom(e):
                    raise
                print(f"batch {batch}: out of memory at run time ({str(e).splitlines()[0]})")
        new = halve_batch(batch, n_dev)
        premade = [{k: v[:new] for k, v in b.items()} for b in premade]
        batch = new
        config = Cfg(config, batch_size=batch)
        lcfg = loader_cfg(config)
    result.update(batch=batch, batch_per_device=batch // n_dev, compile_s=compile_s,
                  first_step_s=first_s, memory_analysis=fit)  # fmt: skip
    if batch != args.batch:
        result["batch_note"] = f"asked {args.batch}, halved to {batch} to fit"
    step_by_shape = {premade[0]["images"].shape[1:3]: compiled}

    def run_step(state, b):
        fn = step_by_shape.get(b["images"].shape[1:3], step_fn)
        return fn(state, dev_batch(b), rng)

    # Other buckets (multi-scale plans only) compile now, outside the timings.
    for b in premade[1:]:
        if b["images"].shape[1:3] not in step_by_shape:
            state, m = step_fn(state, dev_batch(b), rng)
            jax.block_until_ready(m)
            step_by_shape[b["images"].shape[1:3]] = step_fn
    write_json(args.out, result)

    def timed(batches):
        nonlocal state
        n, m = 0, None
        t0 = time.perf_counter()
        for b in batches:
            state, m = run_step(state, b)
            n += int(b["images"].shape[0])
        jax.block_until_ready(m)
        dt = time.perf_counter() - t0
        return n / dt, dt, n, float(m["total_loss"])

    source = loader.DetectionBatchSource(
        records, lcfg, num_steps=args.steps, process_index=0, process_count=1
    )
    for name in modes:
        t = time.perf_counter()
        if name == "premade":
            it = iter(premade)
        elif name == "inline":
            it = loader.NumpyBatchIterator(source)
        elif name.startswith("grain"):
            try:
                import grain.python  # noqa: F401

                it = loader.GrainBatchIterator(source, worker_count=int(name[5:]))
                # Worker start-up is not throughput: the first batch is taken before timing.
                state, m = run_step(state, next(it))
                jax.block_until_ready(m)
            except Exception as e:  # noqa: BLE001 - a missing or broken grain
                print(f"{name}: grain unavailable ({type(e).__name__}: {e}); inline instead",
                      flush=True)  # fmt: skip
                name, it = "inline", loader.NumpyBatchIterator(source)
                if any(r["mode"] == "inline" for r in result["rows"]):
                    continue
        else:
            raise SystemExit(f"unknown mode {name}")
        start_s = time.perf_counter() - t
        ips, dt, n, loss = timed(it)
        if hasattr(it, "close"):
            it.close()
        peak, limit = device_memory()
        row = {"mode": name, "images_per_s": ips, "images": n, "seconds": dt,
               "startup_s": start_s, "final_loss": loss, "peak_bytes": peak,
               "limit_bytes": limit}  # fmt: skip
        result["rows"].append(row)
        print(f"{name:>10s}: {ips:8.2f} images/s ({n} images in {dt:.2f} s; loss {loss:.3f})"
              + (f"; peak device memory {peak / 2**30:.1f} of {limit / 2**30:.1f} GiB"
                 if peak else ""), flush=True)  # fmt: skip
        write_json(args.out, result)

    if args.profile_steps:
        from profile_detector import trace_steps

        k = min(args.profile_steps, len(premade))

        def traced():
            nonlocal state
            for b in premade[:k]:
                state, m = run_step(state, b)
            jax.block_until_ready(m)

        t = time.perf_counter()
        summary = trace_steps(traced, compiled.as_text(), k, trace_out=args.trace_out)
        summary["seconds"] = time.perf_counter() - t
        result["profile"] = summary
        write_json(args.out, result)

    result["imported_not_on_device"] = imported_not_on_device()
    write_json(args.out, result)
    print()
    print(f"{'mode':>10s} {'images/s':>10s}   ({device} x {n_dev}, {args.model}, {args.dtype}, "
          f"batch {batch}, {shapes[0][0]}x{shapes[0][1]}, compile {compile_s:.1f} s)")  # fmt: skip
    for r in result["rows"]:
        print(f"{r['mode']:>10s} {r['images_per_s']:10.2f}")
    if result["imported_not_on_device"]:
        print(f"note: imported {result['imported_not_on_device']}, which the GPU machine lacks")
    return result


if __name__ == "__main__":
    main()
