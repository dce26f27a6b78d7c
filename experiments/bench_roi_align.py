"""ROIAlign forward + backward as the detector's poolers run it, against an earlier revision of
`hassod_jax/ops/roi_align.py` in the same run.

    python experiments/bench_roi_align.py [--baseline REV] [--image 400 672] [--batch 2] \
        [--boxes 512] [--size 7] [--channels 256] [--iters 5] [--tpu v5e-16]

Both implementations pool the same FPN levels (random features for an image of --image,
stride 4 to 32) with the same boxes (sizes spread over the levels, detectron2's level
assignment), sampling ratio 0 (adaptive, the detector's setting), and take the gradient of a
sum of squares with respect to the features. Printed per implementation: the compiled
program's temporaries and its bytes accessed (XLA's CPU cost model, loops counted once), the
forward + backward time (median of --iters after a warm-up), and the largest difference of
values and gradients between the two. With --tpu TARGET the same programs are also compiled
for a TPU slice (libtpu's compile-only devices, the batch sharded over its chips) and their
per-chip temporaries printed.
"""

import argparse
import importlib.util
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def load_revision(rev):
    """`hassod_jax/ops/roi_align.py` at git revision `rev`, as a module."""
    text = subprocess.run(["git", "show", f"{rev}:hassod_jax/ops/roi_align.py"], cwd=ROOT,
                          check=True, capture_output=True, text=True).stdout
    path = os.path.join(tempfile.mkdtemp(), f"roi_align_{rev.replace('/', '_')}.py")
    with open(path, "w") as f:
        f.write(text)
    spec = importlib.util.spec_from_file_location(f"roi_align_{abs(hash(rev))}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def inputs(batch, image, boxes, channels, seed=0):
    import numpy as np

    rng = np.random.default_rng(seed)
    h, w = image
    feats = [rng.normal(size=(batch, h // s, w // s, channels)).astype(np.float32)
             for s in (4, 8, 16, 32)]
    # Box sides log-uniform from 16 px to the image: every level gets boxes.
    side = np.exp(rng.uniform(np.log(16), np.log(min(h, w)), (batch, boxes, 2)))
    aspect = np.exp(rng.uniform(-1.0, 1.0, (batch, boxes, 1)))
    wh = np.concatenate([side[..., :1] * aspect, side[..., 1:] / aspect], -1)
    xy = rng.uniform(0, 1, (batch, boxes, 2)) * np.maximum(np.array([w, h]) - wh, 1)
    return feats, np.concatenate([xy, xy + wh], -1).astype(np.float32)


def program(mod, size):
    import jax
    import jax.numpy as jnp

    def loss(feats, boxes):
        out = mod.multilevel_roi_align(feats, boxes, output_size=size, sampling_ratio=0)
        return jnp.sum(out.astype(jnp.float32) ** 2)

    return jax.jit(jax.value_and_grad(loss))


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--baseline", default="b40404e~1", help="git revision to compare with")
    p.add_argument("--image", type=int, nargs=2, default=(400, 672))
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--boxes", type=int, default=512)
    p.add_argument("--size", type=int, default=7)
    p.add_argument("--channels", type=int, default=256)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--tpu", default="", help="also compile for this TPU slice, e.g. v5e-16")
    a = p.parse_args()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import jax
    import numpy as np

    current = importlib.import_module("hassod_jax.ops.roi_align")

    feats, boxes = inputs(a.batch, tuple(a.image), a.boxes, a.channels)
    impls = {f"baseline {a.baseline}": load_revision(a.baseline), "current": current}
    results = {}
    print(f"ROIAlign {a.size}x{a.size}, {a.batch} images {a.image[0]}x{a.image[1]}, "
          f"{a.boxes} boxes each, {a.channels} channels, sampling ratio 0; forward + backward")
    print("| implementation | CPU temp MiB | CPU bytes accessed GB | forward+backward s |"
          + (f" {a.tpu} temp MiB/chip |" if a.tpu else ""))
    print("|---|---|---|---|" + ("---|" if a.tpu else ""))
    for name, mod in impls.items():
        fn = program(mod, a.size)
        compiled = fn.lower(feats, boxes).compile()
        mem = compiled.memory_analysis()
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        out = jax.block_until_ready(compiled(feats, boxes))
        times = []
        for _ in range(a.iters):
            t0 = time.perf_counter()
            jax.block_until_ready(compiled(feats, boxes))
            times.append(time.perf_counter() - t0)
        results[name] = out
        row = (f"| {name} | {mem.temp_size_in_bytes / 2**20:.1f} | "
               f"{cost.get('bytes accessed', 0) / 1e9:.2f} | {np.median(times):.3f} |")
        if a.tpu:
            row += f" {tpu_temp(mod, a, feats, boxes) / 2**20:.1f} |"
        print(row, flush=True)
    (va, ga), (vb, gb) = results.values()
    diff = max(float(np.max(np.abs(np.asarray(x) - np.asarray(y)))) for x, y in zip(ga, gb))
    print(f"value difference {abs(float(va) - float(vb)):.3g} (of {float(va):.6g}); largest "
          f"gradient difference {diff:.3g}")


def tpu_temp(mod, a, feats, boxes):
    """Per-chip temporaries of the same program compiled for a TPU slice, the batch sharded
    over its chips (a.batch images per chip)."""
    import jax
    import numpy as np
    from jax.experimental import topologies
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    gen, chips = a.tpu.split("-")
    names = {"v5e": ("v5e", {"4": "2x2", "16": "4x4", "256": "16x16"}),
             "v4": ("v4", {"8": "2x2x1", "32": "2x2x4"})}
    kind, shapes = names[gen]
    topo = topologies.get_topology_desc(platform="tpu",
                                        topology_name=f"{kind}:{shapes[chips]}")
    mesh = Mesh(np.array(topo.devices), ("data",))
    n = len(topo.devices)
    data = NamedSharding(mesh, PartitionSpec("data"))
    s = jax.ShapeDtypeStruct
    args = ([s((a.batch * n, *f.shape[1:]), f.dtype, sharding=data) for f in feats],
            s((a.batch * n, *boxes.shape[1:]), boxes.dtype, sharding=data))
    return program(mod, a.size).lower(*args).compile().memory_analysis().temp_size_in_bytes


if __name__ == "__main__":
    main()
