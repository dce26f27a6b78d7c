"""Whole-detector parity with detectron2 (the d2_hassod_cascade fixture) in float32 and
bfloat16, and the time to load a full R50 HASSOD-layout checkpoint. Prints a table.

    python experiments/parity_d2.py [--fixture DIR]

The tests gate float32 (tests/models/test_d2_parity.py); this script also reports bfloat16,
which has no gate. Detections are matched as sets (greedy, IoU > 0.99), never by index.
"""

import argparse
import os
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

IMAGES = ("astronaut", "coffee", "chelsea")


def _match(boxes_a, scores_a, boxes_b, thr):
    from hassod_jax import ops

    iou = np.asarray(ops.box_iou(boxes_a, boxes_b), np.float64)
    taken = np.zeros(len(boxes_b), bool)
    match = np.full(len(boxes_a), -1)
    for i in np.argsort(-scores_a, kind="stable"):
        cand = np.where(taken, -1.0, iou[i])
        j = int(np.argmax(cand))
        if cand[j] > thr:
            match[i], taken[j] = j, True
    return match


def parity_rows(module, variables, z, dtype_name):
    import jax.numpy as jnp
    import skimage.data

    from hassod_jax.inference import predictor

    mod = module.clone(dtype=jnp.bfloat16) if dtype_name == "bfloat16" else module
    rows = []
    for name in IMAGES:
        image = getattr(skimage.data, name)()
        t0 = time.perf_counter()
        got = predictor.detect(mod, variables, image, short_edge=320, max_size=533)
        seconds = time.perf_counter() - t0
        rb, rs = z[f"{name}/pred_boxes"], z[f"{name}/scores"]
        m = _match(got["boxes"], got["scores"], rb, 0.99)
        ok = m >= 0
        j = m[ok]
        loose = (_match(got["boxes"], got["scores"], rb, 0.5) >= 0).sum() / len(rs)

        def worst(x):
            return f"{x.max():.2e}" if x.size else "-"

        xor = (got["masks"][ok] ^ z[f"{name}/pred_masks"][j]).sum(axis=(1, 2))
        union = np.maximum((got["masks"][ok] | z[f"{name}/pred_masks"][j]).sum(axis=(1, 2)), 1)
        rows.append(
            (
                dtype_name,
                name,
                f"{len(got['scores'])}/{len(rs)}",
                f"{ok.sum() / len(rs):.4f} / {loose:.4f}",
                worst(np.abs(got["scores"][ok] - rs[j])),
                worst(np.abs(got["boxes"][ok] - rb[j])),
                f"{(got['levels'][ok] == z[f'{name}/pred_levels'][j]).mean():.4f}" if ok.any()
                else "-",
                f"{(xor / union).mean():.2e}" if ok.any() else "-",
                f"{seconds:.1f}",
            )
        )
    return rows


def feature_errors(module, variables, z):
    import jax
    import jax.numpy as jnp

    from hassod_jax.models import detector as D

    rgb = z["astronaut/input_rgb"]
    (ph, pw), (h, w) = z["astronaut/padded_hw"], rgb.shape[:2]
    x = np.zeros((1, ph, pw, 3), np.float32)
    x[0, :h, :w] = np.asarray(D.normalize_images(rgb[None]))[0]
    out = []
    for dt in ("float32", "bfloat16"):
        mod = module.clone(dtype=jnp.bfloat16) if dt == "bfloat16" else module
        f = jax.jit(lambda v, x, mod=mod: mod.apply(v, x, method="features"))(variables, x)
        err = {}
        for k in ("p2", "p3", "p4", "p5", "p6"):
            ref = z[f"astronaut/feat_{k}"]
            ours = np.asarray(f[k][0], np.float32).transpose(2, 0, 1)
            err[k] = float(np.abs(ours - ref).max() / np.abs(ref).max())
        out.append((dt, err))
    return out


def r50_load_time():
    import jax
    import jax.numpy as jnp

    from hassod_jax.models import detector as D
    from hassod_jax.weights import detectron2 as W
    from hassod_jax.weights.torch_writer import save_torch_checkpoint

    cfg = D.DetectorConfig()
    shapes = jax.eval_shape(
        lambda: D.CascadeMaskRCNN(cfg).init(jax.random.PRNGKey(0), jnp.zeros((1, 64, 64, 3)))
    )
    rng = np.random.default_rng(0)
    variables = jax.tree_util.tree_map(lambda s: rng.standard_normal(s.shape, np.float32), shapes)
    sd = W.state_dict_from_detector_variables(variables, cfg)
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "model_final.pth")
        save_torch_checkpoint(path, {"model": sd, "iteration": 39999})
        size = os.path.getsize(path)
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            W.load_detector(path)
            times.append(time.perf_counter() - t0)
    return len(sd), size, min(times)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--fixture",
        default=os.environ.get("HASSOD_D2_FIXTURE")
        or os.path.join(os.path.dirname(__file__), "..", "..", "shared", "fixtures",
                        "d2_hassod_cascade"),
    )
    a = p.parse_args()
    import jax

    from hassod_jax.weights.detectron2 import load_detector

    module, variables = load_detector(os.path.join(a.fixture, "model.pth"))
    z = np.load(os.path.join(a.fixture, "outputs.npz"))
    print(f"device: {jax.devices()[0].device_kind}; fixture {os.path.abspath(a.fixture)}")
    head = ("dtype", "image", "dets ours/d2", "matched IoU>0.99 / >0.5", "max abs dscore", "max abs dbox px",
            "level agree", "mask xor/union", "s (incl. compile)")
    rows = parity_rows(module, variables, z, "float32") + parity_rows(
        module, variables, z, "bfloat16"
    )
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(head)]
    print(" | ".join(h.ljust(w) for h, w in zip(head, widths)))
    for r in rows:
        print(" | ".join(c.ljust(w) for c, w in zip(r, widths)))
    for dt, err in feature_errors(module, variables, z):
        print(f"{dt} astronaut backbone/FPN max|diff|/max|ref|: " + ", ".join(
            f"{k} {v:.1e}" for k, v in err.items()))
    n, size, sec = r50_load_time()
    print(f"full R50 HASSOD-layout checkpoint: {n} tensors, {size / 2**20:.0f} MiB, "
          f"load_detector {sec:.2f} s (best of 3)")


if __name__ == "__main__":
    main()
