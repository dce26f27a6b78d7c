"""Where the detector's training step spends its time: a breakdown for the #6/#7 speed work.

    python experiments/profile_detector.py                 # full R50 at 800x1333 (GPU)
    python experiments/profile_detector.py --quick         # small variant, 128x128 (CPU)
    python experiments/profile_detector.py --quick --r50 --size 320 512 --dtype float32
    python experiments/profile_detector.py --out profile.json

On the current backend, forward+backward (one jitted `value_and_grad`, as
bench_detector.py) of:
  * the whole Cascade Mask R-CNN step with the configured ROIAlign (adaptive sampling, cap
    --max-sampling), and the same step with fixed sampling_ratio 2 (torchvision's
    MultiScaleRoIAlign default; far fewer samples per bin) - the difference bounds what a
    faster ROIAlign can buy;
  * the backbone + FPN alone (ResNet and FPN of the same config, sum of the P2-P6 outputs);
  * the multi-level ROIAlign alone at the box heads' shape (B x 512 boxes, 7x7, once per
    cascade stage in the real step) and the mask head's (B x 128 boxes, 14x14), with the
    FPN's channel count and the images' level sizes, boxes drawn like proposals.
Prints one table; needs only jax, flax and numpy.

`trace_steps` / `trace_summary` (used by bench_train.py --profile-steps) trace a few real
training steps with `jax.profiler` and attribute the device time of each XLA op to the source
function it came from (the optimized HLO's stack frames) and to forward or backward.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import glob
import gzip
import json
import os
import re
import shutil
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_detector import bench_ours  # noqa: E402

_TABLE_ROW = re.compile(r"^(\d+) (.*)$")
_FIELD = re.compile(r"(\w+)=(-?\d+)")
_INSTR = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = .*?metadata=\{([^}]*)\}")
_NAME = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = ")
_COMPUTATION = re.compile(r"^(?:ENTRY )?%?([\w.\-]+) \(.*\{\s*$")
_CALLS = re.compile(r"calls=%?([\w.\-]+)")
_OPERAND = re.compile(r"%([\w.\-]+)")
_OP_NAME = re.compile(r'op_name="([^"]*)"')
_FRAME_ID = re.compile(r"stack_frame_id=(\d+)")
_SOURCE = re.compile(r'source_file="([^"]*)" source_line=(\d+)')


def hlo_op_sources(hlo_text):
    """Instruction name -> (op_name, 'file.py:function') from an optimized HLO module's text
    (its FileNames / FunctionNames / FileLocations / StackFrames tables, or the older
    source_file metadata). The frame is the innermost one JAX recorded: user code, here."""
    tables, section = collections.defaultdict(dict), None
    for line in hlo_text.splitlines():
        if line in ("FileNames", "FunctionNames", "FileLocations", "StackFrames"):
            section = line
            continue
        if section:
            m = _TABLE_ROW.match(line)
            if m:
                tables[section][int(m.group(1))] = m.group(2)
                continue
            section = None

    def frame(fid):
        loc = tables["StackFrames"].get(fid)
        if loc is None:
            return None
        fields = dict((k, int(v)) for k, v in _FIELD.findall(loc))
        where = dict(
            (k, int(v))
            for k, v in _FIELD.findall(
                tables["FileLocations"].get(fields.get("file_location_id"), "")
            )
        )
        file = tables["FileNames"].get(where.get("file_name_id"), '"?"').strip('"')
        fn = tables["FunctionNames"].get(where.get("function_name_id"), '"?"').strip('"')
        return f"{os.path.basename(file)}:{fn}"

    def parse(meta):
        op = _OP_NAME.search(meta)
        src = None
        fid = _FRAME_ID.search(meta)
        if fid:
            src = frame(int(fid.group(1)))
        else:
            sf = _SOURCE.search(meta)
            if sf:
                src = f"{os.path.basename(sf.group(1))}:{sf.group(2)}"
        return (op.group(1) if op else "", src or "?")

    # A fusion XLA made of ops with different metadata may carry none itself: it then takes
    # its fused computation's (the ROOT's, else the first instruction's that has any); an op
    # XLA created (a copy, a broadcast) takes its nearest operand's, marked "~" (inferred).
    out, calls, operands, comp_meta, comp = {}, {}, {}, {}, None
    for line in hlo_text.splitlines():
        head = _COMPUTATION.match(line)
        if head:
            comp = head.group(1)
            continue
        name = _NAME.match(line)
        if not name:
            continue
        m = _INSTR.match(line)
        if m:
            out[name.group(1)] = parse(m.group(2))
            if comp and (comp not in comp_meta or line.lstrip().startswith("ROOT ")):
                comp_meta[comp] = out[name.group(1)]
            continue
        c = _CALLS.search(line)
        if c:
            calls[name.group(1)] = c.group(1)
        rhs = line.split(" = ", 1)[1].split("calls=")[0]
        operands[name.group(1)] = _OPERAND.findall(rhs)
    for name, callee in calls.items():
        if callee in comp_meta:
            out.setdefault(name, comp_meta[callee])
    for name, ops in operands.items():
        if name in out:
            continue
        seen, frontier = {name}, list(ops)
        for _ in range(4):  # breadth-first over operands, a few levels up
            hit = next((out[o] for o in frontier if out.get(o, ("", "?"))[1] != "?"), None)
            if hit:
                out[name] = (hit[0], hit[1] if hit[1].endswith(" ~") else hit[1] + " ~")
                break
            seen.update(frontier)
            frontier = [q for o in frontier for q in operands.get(o, ()) if q not in seen]
        out.setdefault(name, ("", "?"))
    return out


def _trace_events(trace_dir):
    """The complete events of the perfetto (or TensorBoard) trace a jax.profiler.trace wrote,
    and that file's path."""
    paths = sorted(glob.glob(os.path.join(trace_dir, "**", "perfetto_trace.json.gz"),
                             recursive=True))  # fmt: skip
    paths = paths or sorted(glob.glob(os.path.join(trace_dir, "**", "*.trace.json.gz"),
                                      recursive=True))  # fmt: skip
    if not paths:
        return [], {}, None
    with gzip.open(paths[-1]) as f:
        data = json.load(f)
    events = data["traceEvents"] if isinstance(data, dict) else data
    names = {e["pid"]: e.get("args", {}).get("name", "") for e in events
             if e.get("ph") == "M" and e.get("name") == "process_name"}  # fmt: skip
    return events, names, paths[-1]


def _module_path(op_name):
    """'jit(step_fn)/transpose(jvp(CascadeMaskRCNN))/backbone/layer1_0/conv1/conv' ->
    ('bwd', 'backbone/layer1_0'): the pass and the first two Flax scopes."""
    if not op_name:
        return "?", "(no metadata)"
    parts = op_name.split("/")
    bwd = any(p.startswith("transpose(") for p in parts)
    scopes = [p for p in parts[1:-1] if "(" not in p]
    return ("bwd" if bwd else "fwd"), "/".join(scopes[:2]) or "(top)"


def trace_summary(trace_dir, hlo_text, steps, top=25):
    """Device time per traced step, split by source function and forward/backward, by Flax
    module, and the top XLA ops. On a GPU only the device's kernel events count (its
    '/device:' processes); on a CPU the host's XLA op events, each counted for its self time
    (its duration less the ops nested in it)."""
    events, pnames, path = _trace_events(trace_dir)
    sources = hlo_op_sources(hlo_text) if hlo_text else {}
    module_name = None
    if hlo_text:
        m = re.match(r"HloModule (\S+?),", hlo_text)
        module_name = m.group(1) if m else None
    xs = [e for e in events if e.get("ph") == "X" and "hlo_op" in e.get("args", {})
          and not e.get("name", "").startswith("end: ")]  # fmt: skip
    on_device = [e for e in xs if pnames.get(e["pid"], "").startswith("/device:")]
    xs = on_device or xs
    if module_name:
        mine = [e for e in xs if e["args"].get("hlo_module") == module_name]
        xs = mine or xs
    # Self time: a CPU trace nests an op's events inside its caller's (a while loop holds its
    # body's ops); GPU kernels do not nest, and keep their whole duration.
    self_us = {}
    for key in {(e["pid"], e.get("tid")) for e in xs}:
        stack = []
        for e in sorted((e for e in xs if (e["pid"], e.get("tid")) == key),
                        key=lambda e: (e["ts"], -e.get("dur", 0.0))):  # fmt: skip
            while stack and e["ts"] >= stack[-1]["ts"] + stack[-1].get("dur", 0.0):
                stack.pop()
            self_us[id(e)] = float(e.get("dur", 0.0))
            if stack:
                self_us[id(stack[-1])] -= float(e.get("dur", 0.0))
            stack.append(e)
    by_fn, by_module, by_op = (collections.Counter() for _ in range(3))
    for e in xs:
        op = e["args"]["hlo_op"]
        op_name, src = sources.get(op, ("", "?"))
        pas, mod = _module_path(op_name)
        if src == "?" and op_name:
            src = f"(scope) {mod}"
        if src.endswith(" ~"):  # inferred from an operand: forward or backward is unknown
            pas = "?"
        us = max(self_us[id(e)], 0.0)
        by_fn[(src, pas)] += us
        by_module[(mod, pas)] += us
        by_op[(op, src, pas, e.get("name", "")[:80], op_name[-120:])] += us
    total = sum(by_fn.values()) or 1.0
    steps = max(int(steps), 1)

    def rows(counter, keys, n=None):
        return [dict(zip(keys, k), ms_per_step=v / 1e3 / steps, share=v / total)
                for k, v in counter.most_common(n)]  # fmt: skip

    return {
        "trace_file": path,
        "events": len(xs),
        "device_events": bool(on_device),
        "device_ms_per_step": total / 1e3 / steps,
        "by_function": rows(by_fn, ("function", "pass")),
        "by_module": rows(by_module, ("module", "pass"), top),
        "top_ops": rows(by_op, ("hlo_op", "function", "pass", "kernel", "op_name"), top),
    }


def print_trace_summary(s, n=15):
    """The summary's two main tables ("~": attributed from an operand; "?": no metadata)."""
    print(f"device time {s['device_ms_per_step']:.1f} ms per step over {s['events']} op events"
          f" ({'device kernels' if s['device_events'] else 'host XLA ops'})")  # fmt: skip
    print(f"{'source function':56s} {'pass':4s} {'ms/step':>9s} {'share':>6s}")
    for r in s["by_function"][:n]:
        print(f"{r['function'][:56]:56s} {r['pass']:4s} {r['ms_per_step']:9.2f} "
              f"{100 * r['share']:5.1f}%")  # fmt: skip
    print(f"{'Flax module':56s} {'pass':4s} {'ms/step':>9s} {'share':>6s}")
    for r in s["by_module"][:n]:
        print(f"{r['module'][:56]:56s} {r['pass']:4s} {r['ms_per_step']:9.2f} "
              f"{100 * r['share']:5.1f}%")  # fmt: skip


def trace_steps(run, hlo_text, steps, trace_out=None, keep_bytes=15 * 2**20):
    """Runs `run()` (which runs `steps` steps and waits for them) under jax.profiler.trace;
    returns `trace_summary` and prints it. The perfetto trace is copied to `trace_out` when
    given and under `keep_bytes`."""
    import jax

    tmp = tempfile.mkdtemp(prefix="hassod_trace_")
    try:
        t = time.perf_counter()
        with jax.profiler.trace(tmp, create_perfetto_trace=True):
            run()
        wall = time.perf_counter() - t
        s = trace_summary(tmp, hlo_text, steps)
        s["traced_wall_s_per_step"] = wall / max(steps, 1)
        path = s.get("trace_file")
        if trace_out and path and os.path.getsize(path) <= keep_bytes:
            shutil.copyfile(path, trace_out)
            s["trace_copied_to"] = trace_out
        if path:
            s["trace_bytes"] = os.path.getsize(path)
            s["trace_file"] = os.path.basename(path)
        print_trace_summary(s)
        return s
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _timed(fn, args, steps, warmup):
    """Compile seconds and median seconds per call of a jitted fn(*args)."""
    import jax

    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    compile_s = time.perf_counter() - t0
    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return compile_s, float(np.median(times))


def _proposal_like_boxes(rng, k, h, w):
    """k boxes with log-uniform sizes 16..max(h, w)/2 and aspect ratios 1/3..3, clipped."""
    side = np.exp(rng.uniform(np.log(16), np.log(max(h, w) / 2), k))
    aspect = np.exp(rng.uniform(np.log(1 / 3), np.log(3), k))
    bw, bh = side * np.sqrt(aspect), side / np.sqrt(aspect)
    x0, y0 = rng.uniform(0, w - 8, k), rng.uniform(0, h - 8, k)
    boxes = np.stack([x0, y0, np.minimum(x0 + bw, w - 1), np.minimum(y0 + bh, h - 1)], -1)
    return boxes.astype(np.float32)


def backbone_fpn(cfg, dtype, b, hp, wp, steps, warmup):
    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    from hassod_jax.models.fpn import FPN
    from hassod_jax.models.resnet import ResNet

    class BackboneFPN(nn.Module):
        @nn.compact
        def __call__(self, x, train):
            return FPN(cfg.fpn_channels, cfg.fpn_norm, dtype=dtype)(
                ResNet(cfg.resnet, dtype=dtype)(x, train), train
            )

    model = BackboneFPN()
    images = jnp.asarray(np.random.default_rng(0).normal(size=(b, hp, wp, 3)), jnp.float32)
    variables = jax.jit(lambda x: model.init(jax.random.PRNGKey(0), x, False))(images[:1])

    def loss(params, bstats, x):
        out, upd = model.apply(
            {"params": params, "batch_stats": bstats}, x, True, mutable=["batch_stats"]
        )
        return sum(jnp.sum(v.astype(jnp.float32)) for v in out.values()), upd

    step = jax.jit(jax.value_and_grad(loss, has_aux=True))
    args = (variables["params"], variables.get("batch_stats", {}), images)
    return _timed(step, args, steps, warmup)


def roi_align_alone(cfg, dtype, b, hp, wp, k_per_image, size, steps, warmup):
    import jax
    import jax.numpy as jnp

    from hassod_jax import ops

    rng = np.random.default_rng(1)
    strides = (4, 8, 16, 32)
    c = cfg.fpn_channels
    feats = [jnp.asarray(rng.normal(size=(b, hp // s, wp // s, c)), dtype) for s in strides]
    boxes = jnp.asarray(
        np.stack([_proposal_like_boxes(rng, k_per_image, hp, wp) for _ in range(b)])
    )

    def loss(fs, bx):
        out = ops.multilevel_roi_align(
            fs,
            bx,
            output_size=size,
            strides=strides,
            sampling_ratio=cfg.pooler_sampling_ratio,
            max_sampling=cfg.pooler_max_sampling,
        )
        return jnp.sum(out.astype(jnp.float32) ** 2)

    step = jax.jit(jax.value_and_grad(loss))
    return _timed(step, (feats, boxes), steps, warmup)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small variant, 128x128 (CPU)")
    p.add_argument("--r50", action="store_true", help="with --quick: the full R50 config")
    p.add_argument("--size", type=int, nargs=2, default=None, metavar=("H", "W"))
    p.add_argument("--dtype", default="bfloat16", choices=("float32", "bfloat16"))
    p.add_argument("--batch-per-device", type=int, default=2)
    p.add_argument(
        "--max-sampling",
        type=int,
        default=None,
        help="adaptive ROIAlign cap, samples per bin (default: the config's, 64)",
    )
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--out", default=None, help="write the results as JSON here")
    a = p.parse_args(argv)

    import jax
    import jax.numpy as jnp

    from hassod_jax.models.detector import SMALL_CONFIG, DetectorConfig

    base = SMALL_CONFIG if a.quick and not a.r50 else DetectorConfig()
    cfg = dataclasses.replace(base, pooler_max_sampling=a.max_sampling or base.pooler_max_sampling)
    h, w = a.size or ((128, 128) if a.quick else (800, 1333))
    hp, wp = -(-h // 32) * 32, -(-w // 32) * 32
    g = 5 if a.quick else 20
    steps = a.steps or (3 if a.quick else 10)
    warmup = 1
    dtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[a.dtype]
    b = a.batch_per_device * jax.local_device_count()
    rows = []

    def add(name, compile_s, step_s, images):
        rows.append(
            {
                "part": name,
                "step_ms": 1e3 * step_s,
                "compile_s": compile_s,
                "images_per_s": images / step_s if images else None,
            }
        )
        print(rows[-1], flush=True)

    r = bench_ours(cfg, a.dtype, a.batch_per_device, h, w, g, steps, warmup)
    add(
        f"whole step, adaptive ROIAlign cap {cfg.pooler_max_sampling}",
        r["compile_s"],
        r["step_s"],
        b,
    )
    fixed = dataclasses.replace(cfg, pooler_sampling_ratio=2)
    r = bench_ours(fixed, a.dtype, a.batch_per_device, h, w, g, steps, warmup)
    add("whole step, ROIAlign sampling_ratio 2", r["compile_s"], r["step_s"], b)
    add("backbone + FPN", *backbone_fpn(cfg, dtype, b, hp, wp, steps, warmup), b)
    k_box = cfg.roi_batch_size_per_image
    k_mask = cfg.mask_max_fg or int(cfg.roi_batch_size_per_image * cfg.roi_positive_fraction)
    # The float32 row: the gradient of the gather is a scatter-add into the feature table,
    # which GPUs may emulate for bfloat16 (compare-and-swap loops) but do natively in float32.
    for name, k, size, sub, table_dtype in (
        ("box", k_box, cfg.box_pooler_resolution, cfg, dtype),
        ("mask", k_mask, cfg.mask_pooler_resolution, cfg, dtype),
        ("box", k_box, cfg.box_pooler_resolution, fixed, dtype),
        ("box", k_box, cfg.box_pooler_resolution, cfg, jnp.float32),
    ):
        mode = (
            f"cap {sub.pooler_max_sampling}"
            if sub.pooler_sampling_ratio == 0
            else f"sampling_ratio {sub.pooler_sampling_ratio}"
        )
        times = roi_align_alone(sub, table_dtype, b, hp, wp, k, size, steps, warmup)
        label = f"{name} head ({b}x{k} boxes, {size}x{size}, {mode}, {jnp.dtype(table_dtype)})"
        add(f"ROIAlign alone, {label}", *times, 0)

    device = jax.devices()[0].device_kind
    print()
    print(f"{device}, {a.dtype}, images {h}x{w}, batch {b}, forward+backward, median of {steps}")
    print(f"{'part':80s} {'ms':>9s} {'img/s':>8s} {'compile s':>10s}")
    for r in rows:
        ips = f"{r['images_per_s']:8.2f}" if r["images_per_s"] else f"{'':8s}"
        print(f"{r['part']:80s} {r['step_ms']:9.1f} {ips} {r['compile_s']:10.1f}")
    print("(the box-head ROIAlign runs once per cascade stage: 3x in the step)")
    if a.out:
        with open(a.out, "w") as f:
            json.dump({"device": device, "dtype": a.dtype, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
