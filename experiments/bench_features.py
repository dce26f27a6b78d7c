"""Throughput of DINO ViT key extraction: hassod_jax (float32, bfloat16) vs PyTorch.

    python experiments/bench_features.py [--quick] [--out results.json]

For ViT-S/8 and ViT-B/8 at 480x480 (HASSOD's feature stage) it times ``make_feature_fn``
(kind 'k': patch embedding, all blocks but the last, the last block's LN1 + qkv) at
batch 1 and a few larger batches, and the PyTorch DINO ViT of the tests
(tests/models/torch_dino_reference.py) doing the same work, in float32 (and bfloat16
autocast on CUDA). Weights are random (speed does not depend on their values); inputs
are already on the device. It also reports the bfloat16 features' max abs error relative
to float32 (random weights). Needs only jax, flax, numpy and torch.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "experiments"))

MODELS = {"vit_small_patch8": (8, 384, 6), "vit_base_patch8": (8, 768, 12)}


def _time(fn, warmup, iters):
    for _ in range(warmup):
        fn()
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    return (time.perf_counter() - t0) / iters


def _torch_model(name, device):
    from tests.models.torch_dino_reference import VisionTransformer

    p, d, heads = MODELS[name]
    model = VisionTransformer(p, d, 12, heads).randomize(0).eval().to(device)
    return model


def _torch_keys(model, x):
    """The same work as our kind='k': blocks[:-1], then LN1 + qkv of the last block."""
    tokens = model.prepare_tokens(x)
    for blk in model.blocks[:-1]:
        tokens, _ = blk(tokens)
    last = model.blocks[-1]
    d = tokens.shape[-1]
    return last.attn.qkv(last.norm1(tokens))[:, 1:, d : 2 * d]


def bench_torch(name, size, batches, dtype, warmup, iters, budget_s):
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if dtype == "bfloat16" and device == "cpu":
        return []
    model = _torch_model(name, device)
    rows = []
    for b in batches:
        x = torch.randn(b, 3, size, size, device=device)

        def run(model=model, x=x):
            with (
                torch.no_grad(),
                torch.autocast(
                    device_type=device, dtype=torch.bfloat16, enabled=dtype == "bfloat16"
                ),
            ):
                out = _torch_keys(model, x)
            if device == "cuda":
                torch.cuda.synchronize()
            return out

        try:
            sec = _time(run, warmup, iters)
        except RuntimeError as e:  # CUDA out of memory at a large batch
            print(f"  torch {name} {dtype} batch {b}: skipped ({str(e).splitlines()[0]})")
            break
        rows.append(_row(name, "pytorch", dtype, b, sec, device))
        print(_fmt(rows[-1]))
        if sec > budget_s:
            break
    if device == "cuda":
        torch.cuda.empty_cache()
    return rows


def bench_ours(name, size, batches, dtype, warmup, iters, budget_s, attention="auto"):
    import jax
    import jax.numpy as jnp

    from hassod_jax.models.vit import _jitted_apply, default_mesh, make_vit

    module = make_vit(
        name, dtype=jnp.bfloat16 if dtype == "bfloat16" else jnp.float32, attention=attention
    )
    side = module.pos_grid * module.patch_size
    params = jax.jit(module.init)(jax.random.key(0), jnp.zeros((1, side, side, 3)))["params"]
    # The jitted, batch-sharded function behind make_feature_fn, compiled ahead of time so
    # that compilation is not timed and needs no warm-up execution.
    fn, repl, data = _jitted_apply(module, ("k",), default_mesh())
    params = jax.device_put(params, repl)
    device = jax.devices()[0].device_kind
    rows = []
    for b in batches:
        if b % jax.local_device_count():
            continue
        x = jax.device_put(
            np.random.default_rng(b).normal(size=(b, size, size, 3)).astype(np.float32), data
        )
        try:
            compiled = fn.lower(params, x).compile()
            sec = _time(
                lambda c=compiled, x=x: c(params, x)["k"].block_until_ready(), warmup, iters
            )
        except Exception as e:  # noqa: BLE001 - XLA reports OOM as several error types
            print(f"  ours {name} {dtype} batch {b}: skipped ({str(e).splitlines()[0]})")
            break
        rows.append(_row(name, "hassod_jax", dtype, b, sec, device))
        print(_fmt(rows[-1]))
        if sec > budget_s:
            break
    return rows


def bf16_error(name, size):
    """max |k_bf16 - k_f32| / max |k_f32| for one random image, random weights."""
    import jax
    import jax.numpy as jnp

    from hassod_jax.models.vit import make_feature_fn, make_vit

    f32 = make_vit(name)
    side = f32.pos_grid * f32.patch_size
    params = jax.jit(f32.init)(jax.random.key(0), jnp.zeros((1, side, side, 3)))["params"]
    x = np.random.default_rng(0).normal(size=(1, size, size, 3)).astype(np.float32)
    a = np.asarray(make_feature_fn(f32, params, "k")(x))
    b = np.asarray(make_feature_fn(make_vit(name, dtype=jnp.bfloat16), params, "k")(x))
    return float(np.abs(a - b).max() / np.abs(a).max())


def _row(name, impl, dtype, batch, sec, device):
    return {
        "model": name,
        "impl": impl,
        "dtype": dtype,
        "batch": batch,
        "sec_per_call": sec,
        "images_per_s": batch / sec,
        "ms_per_image": 1000 * sec / batch,
        "device": device,
    }


def _fmt(r):
    return (
        f"  {r['model']:18s} {r['impl']:10s} {r['dtype']:8s} batch {r['batch']:3d}: "
        f"{r['images_per_s']:8.2f} img/s  {r['ms_per_image']:9.1f} ms/img"
    )


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="batches 1,2; 1 timed call")
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated")
    parser.add_argument("--size", type=int, default=480)
    parser.add_argument("--batches", default=None, help="e.g. 1,4,8,16,32")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--iters", type=int, default=None)
    parser.add_argument("--no_torch", action="store_true")
    parser.add_argument("--no_error", action="store_true", help="skip the bf16-vs-f32 error")
    parser.add_argument("--attention", default="auto", choices=("auto", "xla", "cudnn"))
    parser.add_argument(
        "--budget_s", type=float, default=30.0, help="stop growing the batch past this s/call"
    )
    args = parser.parse_args(argv)

    import jax

    batches = [
        int(b) for b in (args.batches or ("1,2" if args.quick else "1,4,8,16,32")).split(",")
    ]
    iters = args.iters or (1 if args.quick else 5)
    # CPUs need no warm-up run (our function is compiled ahead of time, torch has no JIT);
    # GPUs do (cuDNN / cuBLAS autotuning, allocator growth).
    warmup = (0 if jax.default_backend() == "cpu" else 1) if args.quick else 2
    models = [m for m in args.models.split(",") if m]
    dtypes = [d for d in args.dtypes.split(",") if d]
    print(f"jax {jax.__version__} on {jax.devices()[0].device_kind} x{jax.device_count()}; "
          f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs; "
          f"{args.size}x{args.size}, batches {batches}, {iters} timed call(s)")  # fmt: skip
    rows, errors = [], {}

    def save():
        if args.out:
            from bench_train import write_json

            write_json(args.out, {"rows": rows, "bf16_rel_error": errors, "size": args.size,
                                  "quick": args.quick, "partial": True})  # fmt: skip

    for name in models:
        for dtype in dtypes:
            # PyTorch first: it frees its cache when done, while JAX's allocator keeps what it
            # grew to (with preallocation off), which left PyTorch short at batch 32 before.
            if not args.no_torch:
                rows += bench_torch(name, args.size, batches, dtype, warmup, iters, args.budget_s)
                save()
            rows += bench_ours(
                name, args.size, batches, dtype, warmup, iters, args.budget_s, args.attention
            )
            save()
        if "bfloat16" in dtypes and not args.no_error:
            # --quick measures the error at 224 px: two more forwards at 480 take minutes on CPUs
            err_size = 224 if args.quick else args.size
            errors[name] = {"size": err_size, "rel_error": bf16_error(name, err_size)}
            print(f"  {name}: bfloat16 k max abs error / scale vs float32 at {err_size} px: "
                  f"{errors[name]['rel_error']:.2e}")  # fmt: skip

    print("\n| model | impl | dtype | batch 1 img/s | best img/s (batch) | best ms/img | device |")
    print("|---|---|---|---|---|---|---|")
    summary = []
    for name in models:
        for impl in ("hassod_jax", "pytorch"):
            for dtype in dtypes:
                sel = [
                    r for r in rows if (r["model"], r["impl"], r["dtype"]) == (name, impl, dtype)
                ]
                if not sel:
                    continue
                one = [r for r in sel if r["batch"] == 1]
                best = max(sel, key=lambda r: r["images_per_s"])
                summary.append({"model": name, "impl": impl, "dtype": dtype,
                                "batch1_images_per_s": one[0]["images_per_s"] if one else None,
                                "best_images_per_s": best["images_per_s"],
                                "best_batch": best["batch"], "best_ms_per_image":
                                best["ms_per_image"], "device": best["device"]})  # fmt: skip
                b1 = f"{one[0]['images_per_s']:.2f}" if one else "-"
                ips, ms = best["images_per_s"], best["ms_per_image"]
                print(f"| {name} | {impl} | {dtype} | {b1} | {ips:.2f} ({best['batch']}) | "
                      f"{ms:.1f} | {best['device']} |")  # fmt: skip
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"rows": rows, "summary": summary, "bf16_rel_error": errors,
                       "size": args.size, "quick": args.quick,
                       "device": jax.devices()[0].device_kind, "jax": jax.__version__},
                      f, indent=2)  # fmt: skip
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
