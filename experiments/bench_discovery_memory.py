"""Peak host memory of stage 1 (mode=discover): the main process, the largest worker, and
the stage that holds the peak.

    python experiments/bench_discovery_memory.py                    # this tree (~4 min, 2 cores)
    python experiments/bench_discovery_memory.py --baseline DIR     # and other code, same run
    python experiments/bench_discovery_memory.py --rows vit:2:0,vit:8:0 --side 3000

`--baseline DIR` runs the same rows on a copy of other code (e.g. `git archive REV | tar -x -C
DIR`, plus the built `_hac_native` extension), each row of each tree in a fresh process, so
that the two columns are measured together on the same machine and load.

A row `backbone:N:workers` runs mode=discover in a fresh process on N photos (scikit-image's,
resized to `--side` pixels on the long side, as a camera's photos are large) with the CRF
pydensecrf and the default batch_size (8):
- `vit`: a RANDOM ViT-S/8 written in our converted format (the ViT's memory does not depend
  on its weights; random keys give few regions, so refinement is cheap here);
- `standin`: the weight-free stand-in backbone, whose regions are as many as real keys give
  (about 100 / 40 / 30 at θ = 0.4 / 0.2 / 0.1), so that the CRF and the refinement at full
  resolution are exercised.
With 0 workers everything runs in the main process and a thread sampling /proc/self/status
every 10 ms attributes the peak to the stage running then (load_vit, decode, features, hac,
refine+levels, assemble); with workers the refinement runs in worker processes and `worker`
is the largest one's peak (getrusage RUSAGE_CHILDREN). `main` is the main process's
high-water mark (VmHWM).
"""

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_ROWS = "vit:2:0,vit:8:0,standin:2:0,standin:4:1"


def _rss_mb(field="VmRSS"):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def write_photos(folder, n, side):
    """n of scikit-image's photos (mirrored and cropped variants past six), long side `side`."""
    from PIL import Image

    sys.path.insert(0, HERE)
    import bench_discovery

    small = folder + "_small"
    bench_discovery.write_images(small, n)
    os.makedirs(folder, exist_ok=True)
    for name in sorted(os.listdir(small)):
        im = Image.open(os.path.join(small, name)).convert("RGB")
        scale = side / max(im.size)
        im = im.resize((round(im.size[0] * scale), round(im.size[1] * scale)), Image.BICUBIC)
        im.save(os.path.join(folder, name))
    shutil.rmtree(small)


def child(args):
    """One row, in this process: prints one JSON line."""
    stage, peaks = ["start"], {}

    def sample():
        while True:
            r, s = _rss_mb(), stage[0]
            peaks[s] = max(peaks.get(s, 0.0), r)
            time.sleep(0.01)

    threading.Thread(target=sample, daemon=True).start()

    def wrap(owner, name, label):
        fn = getattr(owner, name)

        def wrapped(*a, **k):
            prev, stage[0] = stage[0], label
            try:
                return fn(*a, **k)
            finally:
                stage[0] = prev

        setattr(owner, name, wrapped)

    from hassod_jax import defaults
    from hassod_jax.discovery import hac, pipeline

    tmp = args.tmp
    c = defaults.discovery()
    c.images = os.path.join(tmp, "images")
    c.backbone = "dino" if args.backbone == "vit" else "standin"
    c.dino_checkpoint = os.path.join(tmp, "vit")  # written by the parent
    c.crf_backend = "pydensecrf"
    c.num_workers = args.workers
    c.max_images = args.n
    c.max_pictures = 0
    wrap(pipeline.FeatureExtractor, "__call__", "features")  # before the class is wrapped
    wrap(pipeline, "FeatureExtractor", "load_vit")
    wrap(hac, "hac_partitions", "hac")
    wrap(pipeline, "assemble", "assemble")
    if args.workers == 0:  # what worker processes run is sent to them by name: not wrapped
        for name in ("postprocess_image", "refine_job", "levels_job"):  # whichever the code has
            if hasattr(pipeline, name):
                wrap(pipeline, name, "refine+levels")
        wrap(pipeline, "_decode", "decode")
    base = _rss_mb()
    t0 = time.perf_counter()
    stage[0] = "other"
    result = pipeline.discover(c, os.path.join(tmp, f"w_{os.getpid()}"))
    wall = time.perf_counter() - t0
    stage[0] = "end"
    time.sleep(0.05)
    rows = result["rows"]
    import hassod_jax

    out = {
        "package": os.path.dirname(hassod_jax.__file__),
        "wall_s": wall,
        "main_mb": _rss_mb("VmHWM"),
        "start_mb": base,
        "worker_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
        "stages_mb": {k: round(v) for k, v in peaks.items() if k not in ("start", "end")},
        "masks_per_image": float(np.mean([len(r["ensemble"]) for _, r in rows])),
        "pixels": int(np.mean([im["height"] * im["width"] for im, _ in rows])),
    }
    print("RESULT " + json.dumps(out), flush=True)


def run_child(code, script, child_args, timeout):
    """Runs `script --child ARGS` in a fresh process on the code of the tree `code` (cwd and
    PYTHONPATH), which must print one `RESULT {json}` line holding the `package` it imported;
    returns that dict, or {'error': ...}."""
    env = {**os.environ, "PYTHONPATH": code}
    env.setdefault("JAX_PLATFORMS", "cpu")
    cmd = [sys.executable, os.path.abspath(script), "--child", *child_args]
    r = subprocess.run(cmd, cwd=code, env=env, capture_output=True, text=True, timeout=timeout)
    lines = [x for x in r.stdout.splitlines() if x.startswith("RESULT ")]
    if r.returncode or not lines:
        return {"error": (r.stderr or r.stdout)[-600:]}
    res = json.loads(lines[-1][len("RESULT "):])
    if os.path.realpath(res["package"]) != os.path.realpath(os.path.join(code, "hassod_jax")):
        return {"error": f"ran {res['package']}, not the code in {code}"}
    return res


def common_args(p, timeout):
    """The options every tree-comparing bench takes (and the hidden --child, --tmp)."""
    p.add_argument("--baseline", default="", help="a copy of other code to measure alongside")
    p.add_argument("--timeout", type=int, default=timeout, help="seconds per row")
    p.add_argument("--out", default="", help="write the rows as JSON here")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--tmp", default="", help=argparse.SUPPRESS)


def run_row(code, tmp, backbone, n, workers, timeout):
    args = ["--tmp", tmp, "--backbone", backbone, "--n", str(n), "--workers", str(workers)]
    return run_child(code, __file__, args, timeout)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", default=DEFAULT_ROWS, help="backbone:N:workers, comma-separated")
    p.add_argument("--side", type=int, default=3000, help="long side of the photos, pixels")
    common_args(p, timeout=900)
    p.add_argument("--backbone", default="vit", help=argparse.SUPPRESS)
    p.add_argument("--n", type=int, default=2, help=argparse.SUPPRESS)
    p.add_argument("--workers", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child(args)
    rows = [r.split(":") for r in args.rows.split(",") if r]
    trees = [("this tree", os.path.dirname(HERE))]
    if args.baseline:
        trees.insert(0, ("baseline", os.path.abspath(args.baseline)))
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        write_photos(os.path.join(tmp, "images"), max(int(n) for _, n, _ in rows), args.side)
        if any(b == "vit" for b, _, _ in rows):
            sys.path.insert(0, HERE)
            import bench_discovery

            bench_discovery.write_random_vit(os.path.join(tmp, "vit"), name="vit_small_patch8")
        for backbone, n, workers in rows:
            for name, code in trees:
                res = run_row(code, tmp, backbone, int(n), int(workers), args.timeout)
                res.update(tree=name, backbone=backbone, images=int(n), workers=int(workers))
                results.append(res)
                print(json.dumps(res), flush=True)
    print()
    print(f"photos: long side {args.side} px; CRF pydensecrf; batch_size 8; MB = 2**20 bytes")
    head = (f"{'tree':>10} {'backbone':>8} {'img':>4} {'wrk':>4} {'MPix':>5} {'masks':>6} "
            f"{'main MB':>8} {'worker MB':>9} {'wall s':>7}  peak by stage (MB)")  # fmt: skip
    print(head)
    for r in results:
        if "error" in r:
            print(f"{r['tree']:>10} {r['backbone']:>8} {r['images']:4d} {r['workers']:4d}  "
                  f"error: {r['error'][-200:]!r}")  # fmt: skip
            continue
        stages = ", ".join(f"{k} {v}" for k, v in r["stages_mb"].items())
        print(f"{r['tree']:>10} {r['backbone']:>8} {r['images']:4d} {r['workers']:4d} "
              f"{r['pixels'] / 1e6:5.1f} {r['masks_per_image']:6.1f} {r['main_mb']:8.0f} "
              f"{r['worker_mb']:9.0f} {r['wall_s']:7.1f}  {stages}")  # fmt: skip
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
