"""Ahead-of-time compiles the modes' device programs for a TPU pod slice, on this machine.

    python experiments/aot.py --target v5e-16 --program train_step
    python experiments/aot.py --target v5e-256 --program train_step --per-chip 1
    python experiments/aot.py --all                        # every program on v5e-16 and v4-32
    python experiments/aot.py --all --targets v5e-16,v5p-8 --out rows.jsonl
    python experiments/aot.py --check-analytic             # the analytic counts vs published

No TPU is needed: libtpu (the `tpu` extra of jax, `pip install -e ".[test]"`) provides
compile-only devices for a named topology (`jax.experimental.topologies`), and each program is
lowered with the shardings, donation and dtypes its mode uses and compiled by the TPU compiler.
The programs, each built from configs/*.py by the mode's own builder:

  vit         DINO ViT-B/8 keys (`vit._jitted_apply`, as `pipeline.FeatureExtractor`): the batch
              split over ONE host's chips (the mode's `vit.default_mesh`), float32.
  hac         HAC `merge_sequence_batch` (`hac._merge_batch_jit`, the accelerator chunk) on the
              host batch of ViT features: the mode hands the whole batch to one chip.
  crf         the dense CRF as `pipeline.jax_crf_all` calls it (`crf.dense_crf`, traced under one
              jit: its `_crf_batch` plus the label padding) on config.batch_size (image,
              threshold) pairs of one label bucket (--crf-labels), split over one host's chips.
  discovery   the device part of one discovery batch: vit, hac, `cut_labels` and crf, compiled
              one by one; the row sums compile time and FLOPs and takes the largest memory.
  train_step  `supervised.jit_train_step` (stage 2.2), bfloat16 by default.
  mt_step     `modes.mean_teacher.jit_mt_step` (stage 2.3), float32.
  predict     `predictor.make_sharded_predict_fn` (shard_map over ONE host's chips), float32.
  precise_bn  `precise_bn.jit_accumulate_step`: one PreciseBN statistics batch, float32.

"compile s" is the TPU compile (writing the dump included; the tracing and lowering before it
is lower_s in the JSON rows). With several rows each runs in a process of its own (a full-size
detector compile holds 8-16 GB of host memory), --in-process keeps them in one.

Per-chip figures come from the compiled executable (`memory_analysis`, `cost_analysis`) when
the compile succeeds. When it runs out of HBM the compiler stops with RESOURCE_EXHAUSTED; the
row then takes the temporaries from its message and from the dumped memory report, the
arguments from the shardings, and FLOPs and bytes from XLA's (CPU) cost model run on the dumped
optimised TPU HLO ("flops src" says which). Either way the collectives, the largest gathers,
scatters and while loops and the largest temporaries come from the dumped optimised HLO and
buffer assignment (the dump is kept with --dump DIR). XLA counts a while loop's body ONCE, so
FLOPs, bytes and collectives inside loops (ROIAlign's scan, HAC's merge loop, the CRF's mean
field) are counted once: the loops and their trip counts are listed. "analytic" is the FLOP
count of the same model from its shapes (`analytic_*` below; convolutions and matmuls only,
2 FLOPs per multiply-add, training = 3x forward); --check-analytic compares the counter with
published figures.

Roofline: time >= max(FLOPs / peak, bytes accessed / HBM bandwidth), per chip, with the
vendor's figures (CHIPS: cloud.google.com/tpu/docs/v5e, /v4, /v5p). The peak is the bfloat16
one for every dtype (float32 matmuls at HIGHEST precision take several MXU passes, so float32
rows are optimistic). The compiler's own estimate (cost_analysis 'optimal_seconds') goes into
the JSON rows (--out) as xla_seconds when it gives one (for the detector programs it does not).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import math
import os
import re
import shutil
import sys
import tempfile
import time

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)

# Compile-only TPU devices on a CPU-only JAX; libtpu reads these at load (no warnings about an
# unknown accelerator type and worker hostnames; the topology itself is named explicitly). No
# chip is used, so several processes may load libtpu at once (by default the first one holds
# /tmp/libtpu_lockfile and the others fail).
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")


@dataclasses.dataclass(frozen=True)
class Chip:
    name: str
    peak_flops: float  # bfloat16 FLOP/s per chip
    hbm_bw: float  # bytes/s per chip
    hbm: float  # bytes per chip
    source: str


# Vendor figures (retrieved 2026-12-07): v5e 197 TFLOP/s bf16, 16 GB at 819 GB/s; v4 275 TFLOP/s,
# 32 GiB at 1200 GB/s; v5p 459 TFLOP/s, 95 GB at 2765 GB/s. HBM in GiB (the compiler reports
# 15.75 GiB available on a v5e).
CHIPS = {
    "v5e": Chip("v5e", 197e12, 819e9, 16 * 2**30, "https://cloud.google.com/tpu/docs/v5e"),
    "v4": Chip("v4", 275e12, 1200e9, 32 * 2**30, "https://cloud.google.com/tpu/docs/v4"),
    "v5p": Chip("v5p", 459e12, 2765e9, 95 * 2**30, "https://cloud.google.com/tpu/docs/v5p"),
}


@dataclasses.dataclass(frozen=True)
class Target:
    name: str
    chip: str
    topology: str  # libtpu's topology name
    chip_config: str  # 'megacore' for v4/v5p: one JAX device per chip, as on the real slice
    wrap: tuple
    accelerator_type: str  # TPU_ACCELERATOR_TYPE of the slice


# Slice shapes as Cloud TPU names them (a v4-32 is 16 chips of 2 TensorCores, 2x2x4), hosts of
# 2x2 chips.
TARGETS = {
    t.name: t
    for t in (
        Target("v5e-4", "v5e", "v5e:2x2", "default", (False, False, False), "v5litepod-4"),
        Target("v5e-16", "v5e", "v5e:4x4", "default", (False, False, False), "v5litepod-16"),
        Target("v5e-256", "v5e", "v5e:16x16", "default", (True, True, False), "v5litepod-256"),
        Target("v4-8", "v4", "v4:2x2x1", "megacore", (False, False, False), "v4-8"),
        Target("v4-32", "v4", "v4:2x2x4", "megacore", (False, False, False), "v4-32"),
        Target("v5p-8", "v5p", "v5:2x2x1", "megacore", (False, False, False), "v5p-8"),
        Target("v5p-32", "v5p", "v5:2x2x4", "megacore", (False, False, False), "v5p-32"),
    )
}

PROGRAMS = ("vit", "hac", "crf", "discovery", "train_step", "mt_step", "predict", "precise_bn")
DEFAULT_TARGETS = ("v5e-16", "v4-32")


def topology(target: Target):
    """The target's compile-only devices (cached)."""
    if target.name not in _TOPOLOGIES:
        os.environ.setdefault("TPU_ACCELERATOR_TYPE", target.accelerator_type)
        from jax.experimental import topologies

        _TOPOLOGIES[target.name] = topologies.get_topology_desc(
            platform="tpu", topology_name=target.topology, chip_config_name=target.chip_config,
            chips_per_host_bounds=(2, 2, 1), num_slices=1, wrap=target.wrap,
        ).devices
    return _TOPOLOGIES[target.name]


_TOPOLOGIES: dict = {}
# The compiler's lowest effort: about half the compile time of the small detector's train step
# (a check that a program compiles, e.g. tests/test_aot_tpu.py; its memory is not the default's).
FAST_COMPILE = {"exec_time_optimization_effort": -1.0}


def libtpu_available() -> str | None:
    """None when compile-only TPU devices can be made here, else the reason."""
    try:
        import libtpu  # noqa: F401
    except ImportError as e:
        return f"libtpu is not installed ({e}); pip install -e '.[test]'"
    return None


# ------------------------------------------------------------------------------------------------
# The programs, built as the modes build them.


@dataclasses.dataclass
class Part:
    """One jitted program of a mode and the abstract arguments it is lowered with."""

    name: str
    fn: object  # a jax.jit-wrapped function
    args: tuple  # pytrees of ShapeDtypeStruct with shardings
    static: tuple = ()  # positional static arguments after `args`
    analytic: float | None = None  # FLOPs per chip
    chips: int = 1  # devices the program spans


@dataclasses.dataclass
class Options:
    model: str = "r50"  # r50 | small
    per_chip: int | None = None  # images per chip (MT: label images = unlabel images)
    image: tuple | None = None  # (H, W)
    dtype: str | None = None
    max_instances: int | None = None
    detections: int | None = None  # predict: detections per image
    crf_labels: int = 32


def load_config(name):
    """configs/<name>.py's get_config()."""
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "configs", f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.get_config()


def _sds(tree, sharding):
    import jax

    return jax.tree_util.tree_map(
        lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding), tree
    )


def _host_devices(devices):
    """One host's chips (the modes that run per host use jax.local_devices())."""
    first = devices[0].process_index
    return [d for d in devices if d.process_index == first]


def _detector(config, opts, dtype=None, **overrides):
    """The detector `modes.train.build_model` makes of `config`, with --model and overrides."""
    from hassod_jax.modes import train as train_mode

    config = config.copy_and_resolve_references()
    config.model.size = opts.model
    for k, v in overrides.items():
        config.model[k] = v
    return train_mode.build_model(config, dtype=dtype)


def _variables(model, image_hw=(64, 64)):
    import jax
    import jax.numpy as jnp

    images = jax.ShapeDtypeStruct((1, *image_hw, 3), jnp.float32)
    return jax.eval_shape(lambda r, x: model.init(r, x, train=False), jax.random.PRNGKey(0), images)


def _det_batch(n, hw, max_instances, strong=False):
    """A loader batch of `n` images as the train loaders emit it (uint8 images, packed masks)."""
    import jax
    import jax.numpy as jnp

    h, w = hw
    g = max_instances
    s = jax.ShapeDtypeStruct
    out = {
        "images": s((n, h, w, 3), jnp.uint8),
        "image_sizes": s((n, 2), jnp.int32),
        "boxes": s((n, g, 4), jnp.float32),
        "masks": s((n, g, h, w // 8), jnp.uint8),
        "levels": s((n, g), jnp.int32),
        "valid": s((n, g), jnp.bool_),
    }
    if strong:
        out["images_strong"] = s((n, h, w, 3), jnp.uint8)
    return out


def build_train_step(devices, opts):
    import jax
    import numpy as np

    from hassod_jax.modes import train as train_mode
    from hassod_jax.train import supervised

    cfg = load_config("train_coco")
    cfg.dtype = opts.dtype or cfg.dtype
    mesh = jax.sharding.Mesh(np.array(devices), ("data",))
    model = _detector(cfg, opts)
    tx, schedule = train_mode.make_optimizer(cfg)
    fn, data, repl = supervised.jit_train_step(model, tx, schedule, mesh)
    state = jax.eval_shape(lambda r: supervised.init_state(model, tx, r), jax.random.PRNGKey(0))
    per_chip, hw = opts.per_chip or 2, opts.image or (800, 1344)
    g = opts.max_instances or cfg.data.max_instances
    batch = _det_batch(per_chip * len(devices), hw, g)
    rng = jax.eval_shape(lambda: jax.random.PRNGKey(0))
    flops = per_chip * analytic_detector(model.config, hw, "train")
    return [Part("train_step", fn, (_sds(state, repl), _sds(batch, data), _sds(rng, repl)),
                 analytic=flops, chips=len(devices))], dict(
        per_chip=per_chip, image=hw, dtype=cfg.dtype, max_instances=g)


def build_mt_step(devices, opts):
    import jax
    import numpy as np
    from jax.sharding import NamedSharding, PartitionSpec

    from hassod_jax.modes import mean_teacher as mt_mode
    from hassod_jax.train import mean_teacher

    cfg = load_config("mean_teacher_coco")
    cfg.dtype = opts.dtype or cfg.dtype
    mesh = jax.sharding.Mesh(np.array(devices), ("data",))
    # The mode reads the architecture from the stage-2.2 checkpoint (a default R50 here) with
    # config.model's overrides.
    train_cfg = load_config("train_coco")
    overrides = {k: v for k, v in cfg.model.items() if v is not None}
    model = _detector(train_cfg, opts, dtype=cfg.dtype, **overrides)
    tx, schedule = mt_mode.make_optimizer(cfg)
    variables = _variables(model)
    state = jax.eval_shape(lambda v: mean_teacher.init_mt_state(v, tx), variables)
    fn = mt_mode.jit_mt_step(cfg, model, tx, schedule, mesh)
    data = NamedSharding(mesh, PartitionSpec("data"))
    repl = NamedSharding(mesh, PartitionSpec())
    per_chip, hw = opts.per_chip or 1, opts.image or (800, 1344)
    g = opts.max_instances or cfg.data.max_instances
    n = per_chip * len(devices)
    label = _det_batch(n, hw, g, strong=True)
    unlabel = _det_batch(n, hw, g, strong=True)
    rng = jax.eval_shape(lambda: jax.random.PRNGKey(0))
    c = model.config
    flops = per_chip * (analytic_detector(c, hw, "teacher") + 3 * analytic_detector(c, hw, "train"))
    args = (_sds(state, repl), _sds(label, data), _sds(unlabel, data), _sds(rng, repl))
    return [Part("mt_step", fn, args, analytic=flops, chips=len(devices))], dict(
        per_chip=f"{per_chip}+{per_chip}", image=hw, dtype=cfg.dtype, max_instances=g)


def build_predict(devices, opts):
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import NamedSharding, PartitionSpec

    from hassod_jax.inference import predictor

    cfg = load_config("predict")
    dtype = opts.dtype or cfg.dtype
    detections = opts.detections or cfg.detections
    host = _host_devices(devices)
    model = _detector(load_config("train_coco"), opts, dtype=dtype,
                      detections_per_image=detections)
    fn, _ = predictor.make_sharded_predict_fn(model, host)
    mesh = jax.sharding.Mesh(np.array(host), ("data",))
    data, repl = NamedSharding(mesh, PartitionSpec("data")), NamedSharding(mesh, PartitionSpec())
    per_chip, hw = opts.per_chip or 8, opts.image or (800, 1344)
    n = per_chip * len(host)
    s = jax.ShapeDtypeStruct
    args = (_sds(_variables(model), repl), s((n, *hw, 3), jnp.uint8, sharding=data),
            s((n, 2), jnp.int32, sharding=data))
    flops = per_chip * analytic_detector(model.config, hw, "test")
    return [Part("predict", fn, args, analytic=flops, chips=len(host))], dict(
        per_chip=per_chip, image=hw, dtype=dtype, detections=detections)


def build_precise_bn(devices, opts):
    import jax
    import jax.numpy as jnp
    import numpy as np

    from hassod_jax.train import precise_bn

    cfg = load_config("train_coco")
    dtype = opts.dtype or cfg.precise_bn_dtype
    mesh = jax.sharding.Mesh(np.array(devices), ("data",))
    model = _detector(cfg, opts, dtype=dtype)
    fn, data, repl = precise_bn.jit_accumulate_step(model, mesh, cfg.precise_bn_estimator)
    variables = _variables(model)
    per_chip, hw = opts.per_chip or 2, opts.image or (800, 1344)
    n = per_chip * len(devices)
    acc = jax.eval_shape(lambda v: precise_bn.init_accumulator(
        model, v["params"], v["batch_stats"], (n, *hw, 3)), variables)
    s = jax.ShapeDtypeStruct
    args = (_sds(variables["params"], repl), _sds(variables["batch_stats"], repl),
            _sds(acc, repl), s((n, *hw, 3), jnp.uint8, sharding=data),
            s((n, 2), jnp.int32, sharding=data))
    flops = per_chip * analytic_detector(model.config, hw, "features")
    return [Part("precise_bn", fn, args, analytic=flops, chips=len(devices))], dict(
        per_chip=per_chip, image=hw, dtype=dtype)


def _discovery_setup(devices, opts):
    cfg = load_config("discover_coco")
    host = _host_devices(devices)
    per_chip = opts.per_chip or 32
    size = (opts.image or (cfg.image_size, cfg.image_size))[0]
    # config.batch_size is the host batch the ViT splits over the host's chips and HAC takes
    # whole on one chip; the CRF splits its (image, threshold) pairs over the host's chips.
    return cfg, host, per_chip, size, per_chip * len(host)


def _vit_part(cfg, host, per_chip, size, opts):
    import jax
    import jax.numpy as jnp
    import numpy as np

    from hassod_jax.models import vit

    dtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[opts.dtype or cfg.dtype]
    module = vit.make_vit("vit_base_patch8", dtype=dtype)
    mesh = jax.sharding.Mesh(np.array(host), ("batch",))
    fn, repl, data = vit._jitted_apply(module, (cfg.feature_kind,), mesh)
    params = jax.eval_shape(
        lambda r: module.init(r, jnp.zeros((1, size, size, 3), jnp.float32))["params"],
        jax.random.PRNGKey(0),
    )
    images = jax.ShapeDtypeStruct((per_chip * len(host), size, size, 3), jnp.float32,
                                  sharding=data)
    flops = per_chip * analytic_vit(module, size)
    return Part("vit", fn, (_sds(params, repl), images), analytic=flops, chips=len(host)), module


def _hac_parts(cfg, host, batch, grid, dim, with_cut):
    import jax
    import jax.numpy as jnp
    from jax.sharding import SingleDeviceSharding

    from hassod_jax.discovery import hac

    one = SingleDeviceSharding(host[0])
    feats = jax.ShapeDtypeStruct((batch, grid, grid, dim), jnp.float32, sharding=one)
    parts = [Part("hac", hac._merge_batch_jit, (feats,), static=(hac._CHUNK_ACCELERATOR,))]
    if with_cut:
        m = grid * grid - 1
        s = jax.ShapeDtypeStruct
        args = (s((batch, m), jnp.int32, sharding=one), s((batch, m), jnp.int32, sharding=one),
                s((batch, m), jnp.float32, sharding=one),
                s((len(cfg.thresholds),), jnp.float32, sharding=one))
        parts.append(Part("cut_labels", hac._cut_batch_jit, args))
    return parts


def _crf_part(cfg, host, size, labels):
    """The CRF as `pipeline.jax_crf_all` runs it: config.batch_size pairs (rounded up to a
    multiple of the host's chips) split along the pairs over the host's chips."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    from hassod_jax.discovery import crf

    kw = dict(cfg.crf)
    fn = jax.jit(lambda images, probs, valid: crf.dense_crf(images, probs, valid, **kw))
    pairs = NamedSharding(Mesh(np.array(host), ("data",)), PartitionSpec("data"))
    batch = -(-cfg.batch_size // len(host)) * len(host)
    s = jax.ShapeDtypeStruct
    args = (s((batch, size, size, 3), jnp.uint8, sharding=pairs),
            s((batch, labels, size, size), jnp.float32, sharding=pairs),
            s((batch, labels), jnp.bool_, sharding=pairs))
    return Part("crf", fn, args, chips=len(host)), batch


def build_discovery(devices, opts, which=("vit", "hac", "cut_labels", "crf")):
    from hassod_jax.discovery import pipeline

    cfg, host, per_chip, size, batch = _discovery_setup(devices, opts)
    parts = []
    vit_part, module = _vit_part(cfg, host, per_chip, size, opts)
    if "vit" in which:
        parts.append(vit_part)
    grid, dim = size // module.patch_size, module.embed_dim
    if "hac" in which:
        parts += _hac_parts(cfg, host, batch, grid, dim, "cut_labels" in which)
    labels = pipeline.label_bucket(opts.crf_labels)
    info = dict(per_chip=per_chip, image=(size, size), dtype=opts.dtype or cfg.dtype,
                host_batch=batch)
    if "crf" in which:
        part, info["crf_pairs"] = _crf_part(cfg, host, size, labels)
        parts.append(part)
        info["crf_labels"] = labels
        if which == ("crf",):  # the row's batch per chip is the CRF's pairs per chip
            info["per_chip"] = info["crf_pairs"] // len(host)
    return parts, info


BUILDERS = {
    "vit": lambda d, o: build_discovery(d, o, ("vit",)),
    "hac": lambda d, o: build_discovery(d, o, ("hac",)),
    "crf": lambda d, o: build_discovery(d, o, ("crf",)),
    "discovery": build_discovery,
    "train_step": build_train_step,
    "mt_step": build_mt_step,
    "predict": build_predict,
    "precise_bn": build_precise_bn,
}


# ------------------------------------------------------------------------------------------------
# Analytic FLOPs (2 per multiply-add; convolutions and matmuls only).


def _conv(h, w, k, cin, cout):
    return h * w * k * k * cin * cout


def _resnet_macs(cfg, h, w):
    """Multiply-adds of the ResNet (models/resnet.py: stride in the 3x3, torchvision style)
    at input (h, w); returns (macs, stem macs, [(channels, h, w) of res2..res5])."""
    stem = cfg.stem_width or cfg.width
    h, w = -(-h // 2), -(-w // 2)
    stem_macs = _conv(h, w, 7, 3, stem)
    h, w = -(-h // 2), -(-w // 2)  # max pool
    macs, cin, outs = stem_macs, stem, []
    bottleneck = cfg.block == "bottleneck"
    for s, n in enumerate(cfg.stage_sizes):
        inner = cfg.width * 2**s
        out = inner * 4 if bottleneck else inner
        for i in range(n):
            stride = 2 if (i == 0 and s > 0) else 1
            ho, wo = -(-h // stride), -(-w // stride)
            if bottleneck:
                macs += _conv(h, w, 1, cin, inner) + _conv(ho, wo, 3, inner, inner)
                macs += _conv(ho, wo, 1, inner, out)
            else:
                macs += _conv(ho, wo, 3, cin, out) + _conv(ho, wo, 3, out, out)
            if cin != out or stride != 1:
                macs += _conv(ho, wo, 1, cin, out)
            h, w, cin = ho, wo, out
        outs.append((cin, h, w))
    return macs, stem_macs, outs


def _box_head_macs(c, res, fc, num_fc, outputs):
    macs, d = 0, res * res * c
    for _ in range(num_fc):
        macs, d = macs + d * fc, fc
    return macs + d * outputs


def _mask_head_macs(c, res, dim, num_conv, classes=1):
    macs, cin = 0, c
    for _ in range(num_conv):
        macs, cin = macs + _conv(res, res, 3, cin, dim), dim
    macs += res * res * dim * dim * 4  # 2x2 stride-2 deconvolution
    return macs + _conv(2 * res, 2 * res, 1, dim, classes)


def _rpn_post(cfg, h, w, train):
    pre = cfg.rpn_pre_nms_topk_train if train else cfg.rpn_pre_nms_topk_test
    post = cfg.rpn_post_nms_topk_train if train else cfg.rpn_post_nms_topk_test
    a = len(cfg.aspect_ratios)
    total = sum(min(pre, a * -(-h // s) * -(-w // s)) for s in (4, 8, 16, 32, 64))
    return min(post, total)


def detector_macs(cfg, hw, box_rois, mask_rois, stages=None, box_outputs=None, mask_classes=1,
                  heads=True):
    """Multiply-adds of one forward of the Cascade Mask R-CNN `cfg` on one (h, w) image with
    `box_rois` proposals through each of `stages` box heads and `mask_rois` through the mask
    head. Returns (macs, stem macs)."""
    h, w = hw
    macs, stem, outs = _resnet_macs(cfg.resnet, h, w)
    c = cfg.fpn_channels
    for cin, fh, fw in outs:  # laterals and outputs
        macs += _conv(fh, fw, 1, cin, c) + _conv(fh, fw, 3, c, c)
    if not heads:
        return macs, stem
    a = len(cfg.aspect_ratios)
    for s in (4, 8, 16, 32, 64):
        fh, fw = -(-h // s), -(-w // s)
        macs += _conv(fh, fw, 3, c, c) + _conv(fh, fw, 1, c, 5 * a)
    stages = cfg.num_stages if stages is None else stages
    outputs = 2 + 4 + cfg.num_levels if box_outputs is None else box_outputs
    macs += stages * box_rois * _box_head_macs(c, cfg.box_pooler_resolution, cfg.box_fc_dim,
                                               cfg.box_num_fc, outputs)
    macs += mask_rois * _mask_head_macs(c, cfg.mask_pooler_resolution, cfg.mask_head_dim,
                                        cfg.mask_num_conv, mask_classes)
    return macs, stem


def analytic_detector(cfg, hw, kind):
    """FLOPs of one image: 'train' (forward + backward of the training forward: the sampled
    ROIs per stage and the mask head's foreground cap; backward = 2x forward but the stem's input
    gradient), 'teacher' (Mean Teacher's teacher: training RPN top-k, test ROI path), 'test'
    (inference) or 'features' (backbone + FPN forward, PreciseBN)."""
    h, w = hw
    if kind == "features":
        return 2 * detector_macs(cfg, hw, 0, 0, heads=False)[0]
    if kind == "train":
        m = cfg.mask_max_fg
        if m is None:
            m = int(cfg.roi_batch_size_per_image * cfg.roi_positive_fraction)
        macs, stem = detector_macs(cfg, hw, cfg.roi_batch_size_per_image, m)
        return 2 * (3 * macs - stem)
    rois = _rpn_post(cfg, h, w, train=kind == "teacher")
    return 2 * detector_macs(cfg, hw, rois, cfg.detections_per_image)[0]


def analytic_vit(module, size):
    """FLOPs of one image through the ViT as features 'k' runs it: patch embedding, every
    block but the last, and the last block's qkv projection."""
    n = (size // module.patch_size) ** 2 + 1
    d, m = module.embed_dim, module.mlp_dim
    block = n * (4 * d * d + 2 * d * m) + 2 * n * n * d  # qkv, proj, mlp; QK^T and AV
    macs = (n - 1) * 3 * module.patch_size**2 * d + (module.depth - 1) * block + n * 3 * d * d
    return 2 * macs


# Published figures the analytic counts are checked against (--check-analytic).
PUBLISHED = (
    # detectron2's model zoo, Mask R-CNN R101-FPN 3x (id 138205316): 290 G "FLOPs" by fvcore
    # (one multiply-add counted as one), averaged over 100 COCO val2017 images at the test
    # resize (short edge 800, long <= 1333); listed at paperswithcode.com/lib/detectron2/mask-r-cnn.
    ("Mask R-CNN R101-FPN, detectron2, test, 290 GMAC", 290e9),
)


def check_analytic():
    """The analytic counter on detectron2's published Mask R-CNN R101-FPN figure."""
    from hassod_jax.models import detector, resnet

    cfg = dataclasses.replace(
        detector.DetectorConfig(), resnet=resnet.ResNetConfig(stage_sizes=(3, 4, 23, 3)),
        cascade_ious=(0.5,),
    )
    lines = []
    for hw in ((800, 1088), (800, 1216), (800, 1344)):
        # One stage, 1000 proposals, an 80-class box predictor (81 scores + 320 deltas), the
        # mask head on 100 detections with 80 class masks.
        macs, _ = detector_macs(cfg, hw, 1000, 100, stages=1, box_outputs=81 + 320,
                                mask_classes=80)
        lines.append(f"{PUBLISHED[0][0]}: ours at {hw[0]}x{hw[1]} = {macs / 1e9:.0f} GMAC "
                     f"({macs / PUBLISHED[0][1]:.2f}x)")
    return lines


# ------------------------------------------------------------------------------------------------
# Compiling and reading what the compiler wrote.

_BITS = {"pred": 8, "s8": 8, "u8": 8, "s16": 16, "u16": 16, "f16": 16, "bf16": 16, "s32": 32,
         "u32": 32, "f32": 32, "s64": 64, "u64": 64, "f64": 64, "c64": 64, "c128": 128,
         "s4": 4, "u4": 4, "f8e4m3fn": 8, "f8e5m2": 8, "token": 0}
_ARRAY = re.compile(r"\b(" + "|".join(sorted(_BITS, key=len, reverse=True)) + r")\[([\d,]*)\]")
_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+) = (.*?) ([a-z][a-z0-9\-]*)\((.*)$")
_OP_NAME = re.compile(r'op_name="([^"]*)"')
COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute",
               "ragged-all-to-all")


def shape_bytes(text):
    """Bytes of the arrays in an HLO shape (a tuple sums its elements), unpadded."""
    total = 0
    for dtype, dims in _ARRAY.findall(text):
        n = math.prod(int(d) for d in dims.split(",") if d) if dims else 1
        total += n * _BITS[dtype] // 8
    return total


def short_shape(text):
    """'bf16[2,800,1344,3]{...}' -> 'bf16[2,800,1344,3]'; tuples listed, layouts dropped."""
    arrays = [f"{t}[{d}]" for t, d in _ARRAY.findall(text)]
    return arrays[0] if len(arrays) == 1 else "(" + ", ".join(arrays) + ")"


_COMPUTATION = re.compile(r"^(?:ENTRY )?%?([\w.\-]+) .*\{$")
_S32_CONSTANT = re.compile(r"= [su]32\[\]\S* constant\((\d+)\)")


def parse_hlo(text):
    """({name: (opcode, shape text, op_name, rest)} of every instruction of an HLO module,
    {computation name: its instruction lines})."""
    out, comps, current = {}, {}, None
    for line in text.splitlines():
        c = _COMPUTATION.match(line)
        if c and not line.startswith(" "):
            current = comps.setdefault(c.group(1), [])
            continue
        m = _INSTR.match(line)
        if m:
            name, shape, op, rest = m.groups()
            meta = _OP_NAME.search(rest)
            out[name] = (op, shape, meta.group(1) if meta else "", rest)
            if current is not None:
                current.append(line)
    return out, comps


def _trip_count(rest, comps):
    """A while loop's trip count when its condition compares with one integer constant (a
    counted loop from 0: a scan or fori_loop); None otherwise."""
    cond = re.search(r"condition=%?([\w.\-]+)", rest)
    consts = {int(v) for line in comps.get(cond.group(1), []) if cond
              for v in _S32_CONSTANT.findall(line)}
    return consts.pop() if len(consts) == 1 else None


def _where(op_name, width=90):
    """The tail of a JAX op_name (the module path that made the op), shortened."""
    return op_name if len(op_name) <= width else "..." + op_name[-(width - 3):]


def hlo_summary(instrs, comps, top=3):
    """Collectives by kind (count, bytes) and the largest ones, the largest gathers / scatters
    and while loops (with their trip counts)."""
    coll, colls, gathers, scatters, whiles = {}, [], [], [], []
    for name, (op, shape, op_name, rest) in instrs.items():
        base = op.removesuffix("-start")
        if base in COLLECTIVES and not op.endswith("-done"):
            arrays = _ARRAY.findall(shape)
            if op in ("all-gather-start", "collective-permute-start"):
                # (operands, results, scalar contexts): count the results.
                arrays = [a for a in arrays if a[1]]
                arrays = arrays[len(arrays) // 2:]
            size = sum(shape_bytes(f"{t}[{d}]") for t, d in arrays)
            c = coll.setdefault(base, [0, 0])
            c[0] += 1
            c[1] += size
            colls.append((size, f"{base} {short_shape(shape)}", op_name))
        elif op in ("gather", "dynamic-gather"):
            gathers.append((shape_bytes(shape), short_shape(shape), op_name))
        elif op in ("scatter",):
            scatters.append((shape_bytes(shape), short_shape(shape), op_name))
        elif op == "while":
            whiles.append((shape_bytes(shape), short_shape(shape), op_name,
                           _trip_count(rest, comps)))
    key = lambda t: -t[0]  # noqa: E731
    return {
        "collectives": {k: {"count": v[0], "bytes": v[1]} for k, v in sorted(coll.items())},
        "largest_collectives": sorted(colls, key=key)[:top + 2],
        "gathers": sorted(gathers, key=key)[:top],
        "scatters": sorted(scatters, key=key)[:top],
        "whiles": sorted(whiles, key=key)[:top],
    }


_ALLOC = re.compile(r"^allocation (\d+): size (\d+)(.*):$")
_VALUE = re.compile(
    r"^ value: <\d+ ([\w.\-]+)(?:\{[\d,]*\})? @\d+> \(size=(\d+),offset=\d+\): (.*)$"
)


def largest_temporaries(buffer_assignment, instrs, top=8):
    """The largest values of the temporary allocations (not parameters, constants, outputs or
    thread-local), padded sizes as allocated: [(bytes, shape, opcode, op_name, count)], values
    of one shape made by one op folded together."""
    temp, groups = False, {}
    for line in buffer_assignment.splitlines():
        m = _ALLOC.match(line)
        if m:
            attrs = m.group(3)
            temp = not any(k in attrs for k in ("parameter", "constant", "thread-local",
                                                "live-out"))
            continue
        v = _VALUE.match(line)
        if temp and v:
            name, size, shape = v.group(1), int(v.group(2)), v.group(3)
            op, _, op_name, _ = instrs.get(name, ("?", "", "", ""))
            key = (size, short_shape(shape), op, op_name)
            groups[key] = groups.get(key, 0) + 1
    rows = sorted(((s, sh, op, on, n) for (s, sh, op, on), n in groups.items()),
                  key=lambda r: -r[0])
    return rows[:top]


_REPORT_LINE = re.compile(r"^\s*[\d.]+\w+\(\s*\d+%\);\s*([\d.]+)(\w+);\s*\d+;\s*(\d+);\s*(.*)$")
_UNITS = {"B": 1, "KiB": 2**10, "MiB": 2**20, "GiB": 2**30, "TiB": 2**40}


def largest_allocations(report, top=5):
    """The largest slots of the compiler's memory report (the temporaries that share one offset
    range over the program): [(bytes, number of values, their shapes)]."""
    rows = []
    for line in report.splitlines():
        m = _REPORT_LINE.match(line)
        if m and m.group(2) in _UNITS:
            rows.append((float(m.group(1)) * _UNITS[m.group(2)], int(m.group(3)), m.group(4)))
    return sorted(rows, key=lambda r: -r[0])[:top]


def _read_dump(dump):
    """(optimised HLO text, buffer assignment text, memory report text) of the module in `dump`
    (the last one the compiler wrote)."""
    files = sorted(os.listdir(dump))

    def last(suffix):
        hits = [f for f in files if f.endswith(suffix)]
        return open(os.path.join(dump, hits[-1])).read() if hits else ""

    return (last(".after_optimizations.txt"), last("after_optimizations-buffer-assignment.txt"),
            last("after_optimizations-memory-usage-report.txt"))


def _per_chip_bytes(tree):
    import jax

    total = 0
    for a in jax.tree_util.tree_leaves(tree):
        shape = a.sharding.shard_shape(a.shape) if getattr(a, "sharding", None) else a.shape
        total += math.prod(shape) * a.dtype.itemsize
    return total


def _cpu_cost(hlo_text):
    """XLA's cost model (the CPU client's HloCostAnalysis) on an optimised TPU HLO module."""
    import jax
    from jax._src.lib import _jax
    from jaxlib import _hlo

    module = _hlo.hlo_module_from_text(hlo_text)
    return _jax.hlo_module_cost_analysis(jax.devices("cpu")[0].client, module)


def compile_part(part, dump_dir, top=8, compiler_options=None):
    """Lowers and compiles one Part; returns its measurements (see the module docstring)."""
    t0 = time.perf_counter()
    lowered = part.fn.lower(*part.args, *part.static)
    t_lower = time.perf_counter() - t0
    os.makedirs(dump_dir, exist_ok=True)
    opts = {"xla_dump_to": dump_dir, "xla_dump_hlo_as_text": True, **(compiler_options or {})}
    t0 = time.perf_counter()
    row = {"part": part.name, "lower_s": t_lower, "analytic_flops": part.analytic}
    try:
        compiled = lowered.compile(opts)
        row["status"] = "ok"
    except Exception as e:  # the TPU compiler's RESOURCE_EXHAUSTED (out of HBM), or a refusal
        compiled = None
        msg = str(e).strip().splitlines()[0]
        row["status"] = "OOM" if "RESOURCE_EXHAUSTED" in msg else "error"
        row["error"] = msg[:400]
    row["compile_s"] = time.perf_counter() - t0
    hlo, assignment, report = _read_dump(dump_dir)
    instrs, comps = parse_hlo(hlo)
    if compiled is not None:
        mem = compiled.memory_analysis()
        cost = compiled.cost_analysis() or {}
        row.update(
            arg_bytes=mem.argument_size_in_bytes, out_bytes=mem.output_size_in_bytes,
            alias_bytes=mem.alias_size_in_bytes, temp_bytes=mem.temp_size_in_bytes,
            peak_bytes=getattr(mem, "peak_memory_in_bytes", None),
            flops=cost.get("flops"), bytes_accessed=cost.get("bytes accessed"),
            # negative when the compiler has no estimate
            xla_seconds=cost["optimal_seconds"] if cost.get("optimal_seconds", -1) > 0 else None,
            flops_src="tpu",
        )
    else:
        m = re.search(r"temporaries \(([\d.]+)([KMGT])\)", row.get("error", ""))
        total = re.search(r"Total bytes: (\d+)", report)
        temp = int(total.group(1)) if total else (
            float(m.group(1)) * 2 ** (10 * "KMGT".index(m.group(2)) + 10) if m else None)
        row.update(arg_bytes=_per_chip_bytes(part.args),
                   out_bytes=_per_chip_bytes(lowered.out_info), alias_bytes=None,
                   temp_bytes=temp, peak_bytes=None, xla_seconds=None)
        if hlo:
            cost = _cpu_cost(hlo)
            row.update(flops=cost.get("flops"), bytes_accessed=cost.get("bytes accessed"),
                       flops_src="cpu-model")
        else:
            row.update(flops=None, bytes_accessed=None, flops_src=None)
    row.update(hlo_summary(instrs, comps))
    row["largest_temps"] = largest_temporaries(assignment, instrs, top) if assignment else []
    row["allocations"] = largest_allocations(report)
    return row


def _opts_tag(opts):
    """The options that set a program's shapes, for the dump folder's name."""
    return "_".join(f"{k}{'x'.join(map(str, v)) if isinstance(v, tuple) else v}"
                    for k, v in dataclasses.asdict(opts).items() if v is not None)


def run(target_name, program, opts=None, dump=None, top=8, log=print, compiler_options=None):
    """Compiles `program` for `target_name`; returns one table row (a dict). `compiler_options`
    are added to the compile's (e.g. FAST_COMPILE)."""
    import importlib.metadata as md

    import jax

    import hassod_jax

    opts = opts or Options()
    target = TARGETS[target_name]
    chip = CHIPS[target.chip]
    devices = topology(target)
    parts, info = BUILDERS[program](devices, opts)
    keep = dump is not None
    base = dump or tempfile.mkdtemp(prefix="hassod_aot_")
    rows = []
    try:
        for p in parts:
            d = os.path.join(base, f"{target_name}_{program}_{p.name}_{_opts_tag(opts)}")
            shutil.rmtree(d, ignore_errors=True)
            r = compile_part(p, d, top, compiler_options)
            r["chips"] = p.chips
            rows.append(r)
            log(f"  {target_name} {program}/{p.name}: {r['status']} in {r['compile_s']:.1f} s")
    finally:
        if not keep:
            shutil.rmtree(base, ignore_errors=True)
    row = _combine(rows) if len(rows) > 1 else rows[0]
    row.update(target=target_name, program=program, devices=len(devices), **info,
               chip=dataclasses.asdict(chip), jax=jax.__version__,
               libtpu=md.version("libtpu"), model=opts.model,
               code=os.path.dirname(os.path.abspath(hassod_jax.__file__)),
               compiler_options=compiler_options or {})
    if len(rows) > 1:
        row["parts"] = rows
    flops, nbytes = row.get("flops"), row.get("bytes_accessed")
    row["roofline_s"] = {
        "flops": flops / chip.peak_flops if flops else None,
        "bytes": nbytes / chip.hbm_bw if nbytes else None,
    }
    return row


def _combine(rows):
    """Sequential programs of one row: compile time, FLOPs, bytes and collectives add up,
    memory is the largest program's."""
    def total(k):
        vals = [r.get(k) for r in rows]
        return sum(vals) if all(v is not None for v in vals) else None

    def most(k):
        vals = [r.get(k) for r in rows if r.get(k) is not None]
        return max(vals) if vals else None

    out = {k: total(k) for k in ("lower_s", "compile_s", "flops", "bytes_accessed",
                                 "xla_seconds")}
    out.update({k: most(k) for k in ("arg_bytes", "out_bytes", "temp_bytes")})
    # No peak when a program did not compile: its own is unknown.
    out["peak_bytes"] = most("peak_bytes") if all(r["status"] == "ok" for r in rows) else None
    out["chips"] = most("chips")
    out["analytic_flops"] = total("analytic_flops") if all(
        r.get("analytic_flops") for r in rows) else None
    bad = [r for r in rows if r["status"] != "ok"]
    out["status"] = bad[0]["status"] if bad else "ok"
    srcs = {r.get("flops_src") for r in rows}
    out["flops_src"] = srcs.pop() if len(srcs) == 1 else "+".join(sorted(s or "-" for s in srcs))
    coll = {}
    for r in rows:
        for k, v in r["collectives"].items():
            c = coll.setdefault(k, {"count": 0, "bytes": 0})
            c["count"] += v["count"]
            c["bytes"] += v["bytes"]
    out["collectives"] = coll
    for k in ("gathers", "scatters", "whiles", "largest_collectives", "largest_temps",
              "allocations"):
        out[k] = sorted((x for r in rows for x in r[k]), key=lambda t: -t[0])[:8]
    return out


# ------------------------------------------------------------------------------------------------
# The table.

HEADER = ("| target | program | batch/chip | image | dtype | compile s | status | args GiB | "
          "out GiB | temp GiB | peak GiB | GFLOP/chip | flops src | analytic GFLOP | "
          "XLA/analytic | GB accessed | collectives (count, GB) | roofline ms (flops / bytes) |")


def _gib(x):
    return "-" if x is None else f"{x / 2**30:.2f}"


def _gb(x):
    return "-" if x is None else f"{x / 1e9:.2f}"


def format_row(r):
    coll = ", ".join(f"{k} {v['count']} ({v['bytes'] / 1e9:.2f})"
                     for k, v in r["collectives"].items()) or "none"
    ratio = (f"{r['flops'] / r['analytic_flops']:.2f}" if r.get("flops")
             and r.get("analytic_flops") else "-")
    roof = r["roofline_s"]
    ms = lambda s: "-" if s is None else f"{s * 1e3:.1f}"  # noqa: E731
    image = "x".join(str(v) for v in r["image"])
    status = r["status"] if r["status"] != "OOM" else "**OOM**"
    gflop = lambda x: "-" if not x else f"{x / 1e9:.1f}"  # noqa: E731
    return (
        f"| {r['target']} | {r['program']} | {r['per_chip']} | {image} | {r['dtype']} | "
        f"{r['compile_s']:.1f} | {status} | {_gib(r['arg_bytes'])} | {_gib(r['out_bytes'])} | "
        f"{_gib(r['temp_bytes'])} | {_gib(r['peak_bytes'])} | "
        f"{gflop(r.get('flops'))} | {r.get('flops_src') or '-'} | "
        f"{gflop(r.get('analytic_flops'))} | "
        f"{ratio} | {_gb(r.get('bytes_accessed'))} | {coll} | {ms(roof['flops'])} / "
        f"{ms(roof['bytes'])} |"
    )


def format_details(r):
    lines = [f"{r['target']} {r['program']} ({r['devices']} chips, "
             f"{r.get('chips', r['devices'])} in the program; jax {r['jax']}, libtpu "
             f"{r['libtpu']}; {r['code']}){': ' + r['error'] if r.get('error') else ''}"]
    if r.get("host_batch"):
        lines.append(f"  host batch {r['host_batch']} (config.batch_size): the ViT splits it over "
                     "one host's chips, HAC takes it whole on one chip, the CRF splits its "
                     "pairs over the host's chips"
                     + (f"; CRF labels {r['crf_labels']}" if r.get("crf_labels") else ""))
    for p in r.get("parts", []):
        lines.append(f"  part {p['part']}: {p['status']}, compile {p['compile_s']:.1f} s, temp "
                     f"{_gib(p['temp_bytes'])} GiB, peak {_gib(p['peak_bytes'])} GiB"
                     + (f" ({p['error']})" if p.get("error") else ""))
    lines.append("  largest slots of the memory report (bytes, values sharing it, their shapes):")
    for size, n, shapes in r.get("allocations", []):
        lines.append(f"    {size / 2**30:6.2f} GiB {n:4d} values: {shapes[:150]}"
                     + ("..." if len(shapes) > 150 else ""))
    lines.append("  largest temporaries (allocated bytes, shape, op, where):")
    for size, shape, op, where, n in r["largest_temps"]:
        lines.append(f"    {size / 2**20:9.1f} MiB {'%dx ' % n if n > 1 else ''}{shape} {op} "
                     f"{_where(where)}")
    for kind, label in (("largest_collectives", "collective"), ("gathers", "gather"),
                        ("scatters", "scatter")):
        for size, shape, where in r[kind]:
            lines.append(f"  {label} {size / 2**20:.1f} MiB {shape} {_where(where)}")
    for size, shape, where, trip in r["whiles"]:
        lines.append(f"  while (trip count {trip or '?'}) state {size / 2**20:.1f} MiB "
                     f"{_where(where)}")
    return "\n".join(lines)


def _run_child(target, program, args):
    """One row in a child process (this script with the same flags): the TPU compiler keeps
    much of its host memory after a compile, and a full-size detector step takes 8-16 GB."""
    import subprocess

    flags = ["--target", target, "--program", program, "--model", args.model,
             "--crf-labels", str(args.crf_labels), "--top", str(args.top)]
    for name in ("per_chip", "image", "dtype", "max_instances", "detections", "dump"):
        if getattr(args, name) is not None:
            flags += ["--" + name.replace("_", "-"), str(getattr(args, name))]
    if args.fast_compile:
        flags.append("--fast-compile")
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "row.json")
        done = subprocess.run([sys.executable, os.path.abspath(__file__), *flags,
                               "--row-json", out])
        if done.returncode == 0 and os.path.exists(out):
            with open(out) as f:
                return json.load(f)
    return {"target": target, "program": program, "exit": done.returncode}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--target", "--targets", dest="targets", default=None,
                   help=f"comma-separated, of {', '.join(TARGETS)} (default v5e-16; --all: "
                   f"{','.join(DEFAULT_TARGETS)})")
    p.add_argument("--program", "--programs", dest="programs", default=None,
                   help=f"comma-separated, of {', '.join(PROGRAMS)}")
    p.add_argument("--all", action="store_true", help="every program on every target")
    p.add_argument("--per-chip", type=int, default=None,
                   help="images per chip (defaults: train 2, MT 1+1, ViT/discovery 32, predict "
                   "8, PreciseBN 2)")
    p.add_argument("--image", default=None, help="HxW (default 800x1344; discovery 480x480)")
    p.add_argument("--dtype", default=None, choices=("float32", "bfloat16"),
                   help="override the config's compute dtype")
    p.add_argument("--model", default="r50", choices=("r50", "small"))
    p.add_argument("--max-instances", type=int, default=None)
    p.add_argument("--detections", type=int, default=None, help="predict (default 1000)")
    p.add_argument("--crf-labels", type=int, default=32,
                   help="regions per CRF call (padded to the mode's label bucket)")
    p.add_argument("--top", type=int, default=8, help="largest temporaries listed")
    p.add_argument("--fast-compile", action="store_true",
                   help="the compiler's lowest optimisation effort (does it compile at all?)")
    p.add_argument("--dump", default=None, help="keep the XLA dumps under this folder")
    p.add_argument("--out", default=None, help="append each row as a JSON line here")
    p.add_argument("--no-details", action="store_true", help="the table rows only")
    p.add_argument("--check-analytic", action="store_true",
                   help="the analytic FLOP counter against published figures, and exit")
    p.add_argument("--in-process", action="store_true",
                   help="compile every row in this process (default: one process per row "
                   "when there are several, so that each starts with the memory free)")
    p.add_argument("--row-json", default=None, help=argparse.SUPPRESS)  # a child's row
    args = p.parse_args(argv)
    if args.check_analytic:
        print("\n".join(check_analytic()))
        return 0
    reason = libtpu_available()
    if reason:
        p.error(reason)
    targets = (args.targets or (",".join(DEFAULT_TARGETS) if args.all else "v5e-16")).split(",")
    programs = (args.programs or (",".join(PROGRAMS) if args.all else "train_step")).split(",")
    for t in targets:
        if t not in TARGETS:
            p.error(f"unknown target {t!r}; known: {', '.join(TARGETS)}")
    for q in programs:
        if q not in PROGRAMS:
            p.error(f"unknown program {q!r}; known: {', '.join(PROGRAMS)}")
    image = tuple(int(v) for v in args.image.lower().split("x")) if args.image else None
    opts = Options(model=args.model, per_chip=args.per_chip, image=image, dtype=args.dtype,
                   max_instances=args.max_instances, detections=args.detections,
                   crf_labels=args.crf_labels)
    pairs = [(t, q) for t in targets for q in programs]
    rows, failed = [], []
    for t, q in pairs:
        if len(pairs) > 1 and not args.in_process:
            r = _run_child(t, q, args)
        else:
            import jax

            jax.config.update("jax_enable_compilation_cache", False)  # every compile timed
            r = run(t, q, opts, dump=args.dump, top=args.top,
                    log=lambda s: print(s, file=sys.stderr, flush=True),
                    compiler_options=FAST_COMPILE if args.fast_compile else None)
        if args.row_json:
            with open(args.row_json, "w") as f:
                json.dump(r, f, default=str)
            return 0
        if "exit" in r:
            failed.append(f"{t} {q}: the compiling process exited with {r['exit']} (-9: killed, "
                          "e.g. by the kernel's out-of-memory killer)")
            print(failed[-1], file=sys.stderr, flush=True)
            continue
        rows.append(r)
        if args.out:
            with open(args.out, "a") as f:
                f.write(json.dumps(r, default=str) + "\n")
    print(HEADER)
    print("|" + "---|" * (HEADER.count("|") - 1))
    for r in rows:
        print(format_row(r))
    if not args.no_details:
        for r in rows:
            print()
            print(format_details(r))
    for name in sorted({r["chip"]["name"] for r in rows}):
        c = CHIPS[name]
        print(f"\n{name}: {c.peak_flops / 1e12:.0f} TFLOP/s bf16, {c.hbm_bw / 1e9:.0f} GB/s, "
              f"{c.hbm / 2**30:.1f} GiB HBM ({c.source})")
    for line in failed:
        print("\nnot measured: " + line)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
