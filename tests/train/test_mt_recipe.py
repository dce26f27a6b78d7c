"""Mean Teacher held against independent statements of the original, piece by piece.

- The configuration: every value of configs/mean_teacher_coco.py against the original's
  Mean Teacher YAML and launch script (transcribed below with the detectron2 defaults they
  rely on), not against our defaults.
- The EMA: one update on crafted float32 tensors equals the original's float32 arithmetic
  (`t * float32(0.9996) + s * float32(1 - 0.9996)`, NumPy) bit for bit, inside a jitted
  program as the step runs it.
- The targets: every detection above the threshold becomes a target by default (150
  crafted ones), and levels are recomputed at coverage 0.75 (a part covered 80 % is a part,
  where stage 1's 0.9 would make it a root), by hand.
- What the teacher sees and makes (the step's teacher half, jitted): the weak views only;
  training-mode batch norm and the RPN's TRAINING top-k with the test-time ROI path,
  against the same pieces composed by hand with train/test top-k that differ; the EMA over
  the parameters AND the batch statistics.
- What the student learns from (the step's student half): the total is w_sup * sum(sup) +
  w_unsup * sum(unsup without the mask loss) at a step where both weights are neither 1
  nor 0; its batch statistics are those of its two training forwards (strong + weak label
  views, then the strong unlabel views), composed by hand; the two data streams differ and
  each resumes exactly.
- Randomness the original draws afresh every iteration (the samplers, the strong views)
  changes from step to step, in stage 2 and in Mean Teacher; test-time resizing caps the
  long side as detectron2's ResizeShortestEdge (transcribed here, PIL for the pixels).
"""

import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from hassod_jax import ops
from hassod_jax.data import loader
from hassod_jax.models import detector as D
from hassod_jax.modes import mean_teacher as mt_mode
from hassod_jax.modes import train as train_mode
from hassod_jax.train import mean_teacher as MT
from hassod_jax.train import optim, schedules, supervised
from tests.train.test_schedules import load_config
from tests.xla_env import FAST_JIT

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# The original's Mean Teacher run: cascade_mask_rcnn_R_50_FPN_MT.yaml, 4_mean_teacher.sh and
# the detectron2 defaults they leave in place; our config field for each.
ORIGINAL_MT = {
    "ema_keep": 0.9996,  # SEMISUPNET.EMA_KEEP_RATE
    "score_thresh": 0.7,  # SEMISUPNET.BBOX_THRESHOLD ("> 0.7")
    "coverage": 0.75,  # build_tree_and_assign_levels(coverage_threshold=0.75)
    "batch_size_label": 8,  # SOLVER.IMS_PER_BATCH_LABEL
    "batch_size_unlabel": 8,  # SOLVER.IMS_PER_BATCH_UNLABEL
    "max_iter": 2000,  # SOLVER.MAX_ITER (launch script)
    "base_lr": 0.01,  # SOLVER.BASE_LR
    "warmup_iters": 1000,  # SOLVER.WARMUP_ITERS (detectron2 default, not reduced)
    "warmup_factor": 0.001,  # SOLVER.WARMUP_FACTOR
    "momentum": 0.9,  # SOLVER.MOMENTUM
    "weight_decay": 5e-5,  # SOLVER.WEIGHT_DECAY
    "clip_norm": 1.0,  # SOLVER.CLIP_GRADIENTS (per parameter tensor)
    "loss_weights": "adaptive",  # SEMISUPNET.LOSS_WEIGHT_SCHEDULE "cosine"
    "sup_weight": 1.0,  # SEMISUPNET.SUP_LOSS_WEIGHT
    "unsup_weight": 2.0,  # SEMISUPNET.UNSUP_LOSS_WEIGHT
    "dtype": "float32",  # no autocast in the Mean Teacher step
    "eval_every": 500,  # TEST.EVAL_PERIOD (launch script)
    "unsup": True,
    "max_targets": -1,  # every detection above the threshold is a target
}
ORIGINAL_MT_DATA = {
    "copy_paste": False,  # COPY_PASTE False
    "short_edges": (240, 320, 480, 640, 672, 704, 736, 768, 800, 1024),  # INPUT.MIN_SIZE_TRAIN
    "max_size": 1333,  # INPUT.MAX_SIZE_TRAIN
    "flip_prob": 0.5,  # RandomFlip
}
ORIGINAL_MT_MODEL = {
    "use_droploss": False,  # MODEL.ROI_HEADS.USE_DROPLOSS False
    "detections_per_image": 1000,  # TEST.DETECTIONS_PER_IMAGE (launch script)
    "rpn_pre_nms_topk_train": 2000,  # the teacher runs the RPN in training mode
    "rpn_post_nms_topk_train": 4000,
    "test_nms_thresh": 0.5,
    "test_score_thresh": 0.0,
}


def test_mean_teacher_config_is_the_originals():
    config = load_config(os.path.join(ROOT, "configs", "mean_teacher_coco.py"))
    assert config.mode == "mean_teacher"
    got = {k: config[k] for k in ORIGINAL_MT}
    assert got == ORIGINAL_MT
    got = {k: tuple(config.data[k]) if k == "short_edges" else config.data[k]
           for k in ORIGINAL_MT_DATA}
    assert got == ORIGINAL_MT_DATA
    # The model: the init checkpoint's architecture with config.model's overrides, on top of
    # DetectorConfig's defaults (the detectron2 test settings load_detector keeps).
    overrides = train_mode.model_overrides(config.model)
    model = dataclasses.replace(D.DetectorConfig(), **{
        k: v for k, v in overrides.items() if k in {f.name for f in
                                                    dataclasses.fields(D.DetectorConfig)}})
    assert {k: getattr(model, k) for k in ORIGINAL_MT_MODEL} == ORIGINAL_MT_MODEL
    assert "precise_bn" not in config  # PreciseBN is off in the original's MT run
    # The schedule the run builds: 1e-5 at step 0, the peak 0.005 at the end of the warmup.
    _, sched = mt_mode.make_optimizer(config)
    assert float(sched(0)) == pytest.approx(1e-5, rel=1e-6)
    assert float(sched(1000)) == pytest.approx(0.005, rel=1e-6)
    assert float(jnp.max(sched(jnp.arange(2000)))) == pytest.approx(0.005, rel=1e-6)


def test_one_ema_step_is_the_originals_float32_arithmetic_bit_for_bit():
    r = np.random.default_rng(0)
    shape = (64, 33)
    t = (r.normal(size=shape) * np.exp(r.uniform(-30, 30, shape))).astype(np.float32)
    s = (t + r.normal(size=shape) * np.abs(t) * 10.0 ** r.uniform(-6, 0, shape)).astype(
        np.float32)
    # The original: `student * (1 - keep_rate) + teacher * keep_rate` with the Python float
    # keep_rate on float32 tensors: each constant rounded to float32, each product rounded.
    want = t * np.float32(0.9996) + s * np.float32(1 - 0.9996)
    assert np.float32(1 - 0.9996) != np.float32(1) - np.float32(0.9996)
    tree_t = {"params": {"w": t}, "batch_stats": {"mean": t[0]}}
    tree_s = {"params": {"w": s}, "batch_stats": {"mean": s[0]}}
    fn = jax.jit(MT.ema_update)  # the step passes its traced step count
    out = fn(tree_t, tree_s, jnp.int32(5))
    np.testing.assert_array_equal(np.asarray(out["params"]["w"]).view(np.int32),
                                  want.view(np.int32))
    np.testing.assert_array_equal(np.asarray(out["batch_stats"]["mean"]).view(np.int32),
                                  want[0].view(np.int32))
    out0 = fn(tree_t, tree_s, jnp.int32(0))  # step 0: a copy of the student
    np.testing.assert_array_equal(np.asarray(out0["params"]["w"]).view(np.int32),
                                  s.view(np.int32))


def _det(boxes, scores, masks):
    return {
        "boxes": jnp.asarray(boxes, jnp.float32),
        "scores": jnp.asarray(scores, jnp.float32),
        "valid": jnp.ones(len(scores), bool),
        "masks": jnp.asarray(masks, jnp.float32),
    }


def test_every_detection_above_the_threshold_is_a_target_by_default():
    n, d = 150, 200
    r = np.random.default_rng(1)
    xy = r.uniform(0, 80, (d, 2))
    boxes = np.concatenate([xy, xy + r.uniform(4, 40, (d, 2))], axis=1).astype(np.float32)
    scores = np.concatenate([np.linspace(0.99, 0.701, n), np.linspace(0.7, 0.1, d - n)])
    out = jax.jit(lambda x: MT.teacher_targets(x, 128, 128))(
        _det(boxes, scores, np.ones((d, 28, 28))))
    assert out["valid"].shape == (d,)
    assert int(out["valid"].sum()) == n and bool(out["valid"][:n].all())
    assert int(out["num_kept"]) == n and int(out["num_dropped"]) == 0
    np.testing.assert_array_equal(np.asarray(out["boxes"])[:n], boxes[:n])
    capped = MT.teacher_targets(_det(boxes, scores, np.ones((d, 28, 28))), 128, 128,
                                max_targets=100)
    assert int(capped["valid"].sum()) == 100 and int(capped["num_dropped"]) == 50


def test_levels_are_recomputed_at_coverage_075():
    """A box covered 80 % by a larger one: a part at 0.75 (stage 1's 0.9 would make it a
    second root). Full masks, integer boxes: the pasted masks are the boxes."""
    # Box 1 (10 x 10 pixels) has 8 of its 10 columns inside box 0: covered 80 %.
    boxes = np.array([[0, 0, 40, 40], [32, 0, 42, 10], [60, 60, 70, 70]], np.float32)
    out = MT.teacher_targets(_det(boxes, [0.9, 0.8, 0.75], np.ones((3, 28, 28))), 80, 80)
    pasted = np.asarray(out["masks"])[:3]
    inter = (pasted[1] & pasted[0]).sum() / pasted[1].sum()
    assert inter == pytest.approx(0.8)
    np.testing.assert_array_equal(np.asarray(out["levels"])[:3], [0, 1, 0])


def test_the_model_is_its_own_configs_not_the_stage_2_runs(tmp_path):
    """Mean Teacher builds its detector as the original's config file describes it whole: the
    widths from the init checkpoint, config.model's overrides, DetectorConfig's defaults for the
    rest; the stage-2.2 run's stored config (here with other thresholds and counts) is not read."""
    from hassod_jax import defaults
    from hassod_jax.train import checkpoint as ckpt_lib

    trained = dataclasses.replace(D.SMALL_CONFIG, test_score_thresh=0.25,
                                  rpn_post_nms_topk_test=77, cascade_ious=(0.4, 0.5, 0.65))
    model = D.CascadeMaskRCNN(trained)
    state = supervised.init_state(model, optim.sgd(0.01), jax.random.PRNGKey(1))
    ck = ckpt_lib.Checkpointer(tmp_path / "W" / "checkpoints", model_config=trained)
    ck.save(2, state, {})
    ck.close()
    config = defaults.toy_mean_teacher()
    config.init_checkpoint = str(tmp_path / "W")
    got, variables = mt_mode.build_model(config)
    want = dataclasses.replace(
        D.DetectorConfig(resnet=D.SMALL_CONFIG.resnet), **{
            k: getattr(D.SMALL_CONFIG, k) for k in ("fpn_channels", "box_fc_dim", "mask_head_dim",
                                                   "mask_num_conv", "num_levels")},
        **train_mode.model_overrides(config.model),
    )
    assert got.config == want
    assert got.config.test_score_thresh == 0.0 and got.config.cascade_ious == (0.5, 0.6, 0.7)
    np.testing.assert_array_equal(variables["params"]["fpn"]["fpn_lateral2"]["conv"]["kernel"],
                                  state.params["fpn"]["fpn_lateral2"]["conv"]["kernel"])


# ----------------------------------------------------------------------------------------
# The step's halves on the small detector.

CFG = dataclasses.replace(
    D.SMALL_CONFIG, use_droploss=False, detections_per_image=16,
    rpn_pre_nms_topk_train=64, rpn_pre_nms_topk_test=24,  # train and test top-k differ
    rpn_post_nms_topk_train=48, rpn_post_nms_topk_test=12,
    roi_batch_size_per_image=32, mask_max_fg=8,
)
T_TOTAL = 10


def _batch(seed, b=2, hw=64, g=3):
    rng = np.random.default_rng(seed)
    m = np.zeros((b, g, hw, hw), bool)
    m[:, 0, 8:40, 12:44] = True
    m[:, 1, 20:60, 4:30] = True
    m[:, 2, 30:50, 30:62] = True
    boxes = np.array([[12, 8, 44, 40], [4, 20, 30, 60], [30, 30, 62, 50]], np.float32)
    return dict(
        images=rng.integers(0, 255, (b, hw, hw, 3), dtype=np.uint8),
        images_strong=rng.integers(0, 255, (b, hw, hw, 3), dtype=np.uint8),
        image_sizes=np.full((b, 2), hw, np.int32),
        boxes=np.tile(boxes, (b, 1, 1)),
        masks=m,
        levels=np.tile(np.array([0, 1, 0], np.int32), (b, 1)),
        valid=np.ones((b, g), bool),
    )


@pytest.fixture(scope="module")
def halves():
    model = D.CascadeMaskRCNN(CFG)
    variables = jax.jit(lambda r: model.init(r, jnp.zeros((1, 64, 64, 3))))(jax.random.PRNGKey(0))
    sched = schedules.cosine_with_warmup(0.01, T_TOTAL, warmup_iters=2)
    tx = optim.sgd(sched)
    step = MT.make_mt_step(model, tx, sched, total_steps=T_TOTAL, score_thresh=0.0)
    teacher = jax.jit(step.teacher, compiler_options=FAST_JIT)
    student = jax.jit(step.student, compiler_options=FAST_JIT)
    # A state whose student and teacher differ (parameters and statistics) at step 4.
    s0 = MT.init_mt_state(variables, tx)
    bump = jax.tree_util.tree_map(lambda x: x * 1.01 + 0.003, s0.params)
    sbump = jax.tree_util.tree_map(lambda x: x * 0.97 + 0.01, s0.batch_stats)
    state = s0.replace(step=jnp.int32(4), params=bump, batch_stats=sbump)
    return model, state, teacher, student


def _bits(x):
    return np.asarray(x).view(np.uint8)


def _same_tree(a, b):
    la, lb = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
    return len(la) == len(lb) and all(
        x.shape == y.shape and np.array_equal(_bits(x), _bits(y)) for x, y in zip(la, lb))


def test_teacher_reads_the_weak_views_only(halves):
    _, state, teacher, _ = halves
    unlabel = _batch(1)
    _, tg, stats = teacher(state, unlabel)
    strong = dict(unlabel, images_strong=_batch(2)["images_strong"])
    _, tg2, stats2 = teacher(state, strong)
    assert _same_tree((tg, stats), (tg2, stats2))
    weak = dict(unlabel, images=_batch(3)["images"])
    _, tg3, stats3 = teacher(state, weak)
    assert not _same_tree(tg["boxes"], tg3["boxes"])
    assert not _same_tree(stats, stats3)


def test_teacher_is_training_bn_and_rpn_with_the_test_roi_path(halves):
    """The teacher's targets and statistics against the pieces composed by hand: EMA, the
    backbone with batch statistics, the RPN with its TRAINING top-k (48 proposals here,
    the test top-k would give 12), the test-time cascade and NMS, masks, then pasting and
    the level tree (host NumPy at 0.75)."""
    from hassod_jax.discovery.hierarchy import hierarchy_levels

    model, state, teacher, _ = halves
    unlabel = _batch(1)
    ema_vars, tg, stats = teacher(state, unlabel)
    x = loader.normalize_padded(jnp.asarray(unlabel["images"]), unlabel["image_sizes"])
    sizes = jnp.asarray(unlabel["image_sizes"], jnp.float32)

    def by_hand(v, x):
        feats, upd = model.apply(v, x, True, method=D.CascadeMaskRCNN.features,
                                 mutable=["batch_stats"])
        _, (props, _, pvalid) = model.apply(v, feats, sizes, True,
                                            method=D.CascadeMaskRCNN.proposals)
        boxes, scores, lp = model.apply(v, feats, props, pvalid, sizes,
                                        method=D.CascadeMaskRCNN.cascade_inference)
        det = D.fast_rcnn_inference(boxes, scores, lp, pvalid, sizes, CFG)
        safe = jnp.where(det["valid"][..., None], det["boxes"], jnp.asarray([0., 0., 1., 1.]))
        det["masks"] = jax.nn.sigmoid(model.apply(v, feats, safe,
                                                  method=D.CascadeMaskRCNN.mask_logits))
        return det, upd["batch_stats"], props.shape[1]

    det, want_stats, n_props = jax.jit(by_hand)(ema_vars, x)
    assert n_props == 48
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
                           stats, want_stats)
    for i in range(2):
        keep = np.asarray(det["valid"][i]) & (np.asarray(det["scores"][i]) > 0.0)
        k = int(keep.sum())
        assert k > 0
        np.testing.assert_array_equal(np.asarray(tg["valid"][i])[:k], True)
        np.testing.assert_array_equal(np.asarray(tg["valid"][i])[k:], False)
        boxes = np.asarray(det["boxes"][i])[keep]
        np.testing.assert_allclose(np.asarray(tg["boxes"][i])[:k], boxes, rtol=1e-5, atol=1e-3)
        pasted = np.asarray(ops.paste_masks_in_image(det["masks"][i][keep], boxes, 64, 64))
        got = np.asarray(tg["masks"][i])[:k]
        assert (got != pasted).mean() < 1e-3
        levels, _ = hierarchy_levels(got, 0.75)
        np.testing.assert_array_equal(np.asarray(tg["levels"][i])[:k], levels)


def test_teacher_ema_moves_parameters_and_batch_statistics(halves):
    _, state, teacher, _ = halves
    ema_vars, _, _ = teacher(state, _batch(1))
    k, rest = np.float32(0.9996), np.float32(1 - 0.9996)
    for name, t, s in (("params", state.teacher_params, state.params),
                       ("batch_stats", state.teacher_batch_stats, state.batch_stats)):
        want = jax.tree_util.tree_map(lambda a, b: np.asarray(a) * k + np.asarray(b) * rest, t, s)
        assert _same_tree(ema_vars[name], want), name
        assert not _same_tree(ema_vars[name], t), name


def test_student_total_loss_and_batch_statistics(halves):
    model, state, teacher, student = halves
    label, unlabel = _batch(4), _batch(1)
    state = state.replace(step=jnp.int32(7))  # w_sup = (1 + cos(0.7 pi)) / 2 ~ 0.206
    ema_vars, tg, tstats = teacher(state, unlabel)
    new, m = student(state, ema_vars, tg, tstats, label, unlabel, jax.random.PRNGKey(3))
    w_sup = 0.5 * (1 + np.cos(np.pi * 7 / T_TOTAL))
    assert float(m["w_sup"]) == pytest.approx(w_sup, rel=1e-6)
    assert float(m["w_unsup"]) == pytest.approx(3.0 - w_sup, rel=1e-6)
    sup = sum(float(v) for k, v in m.items() if k.startswith("sup/"))
    unsup = sum(float(v) for k, v in m.items() if k.startswith("unsup/") and k != "unsup/mask")
    assert float(m["unsup/mask"]) > 0.01  # the mask loss exists and is left out
    assert float(m["total_loss"]) == pytest.approx(w_sup * sup + (3.0 - w_sup) * unsup,
                                                   rel=1e-5)
    # The student's running statistics: its supervised forward (strong + weak label views,
    # one batch of 4) and then its forward on the strong unlabel views.
    def by_hand(v):
        norm = loader.normalize_padded
        x = jnp.concatenate([norm(jnp.asarray(label["images_strong"]), label["image_sizes"]),
                             norm(jnp.asarray(label["images"]), label["image_sizes"])])
        _, v1 = model.apply(v, x, True, method=D.CascadeMaskRCNN.features,
                            mutable=["batch_stats"])
        xu = norm(jnp.asarray(unlabel["images_strong"]), unlabel["image_sizes"])
        _, v2 = model.apply({"params": v["params"], **v1}, xu, True,
                            method=D.CascadeMaskRCNN.features, mutable=["batch_stats"])
        return v2["batch_stats"]

    want = jax.jit(by_hand)({"params": state.params, "batch_stats": state.batch_stats})
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
                           new.batch_stats, want)


def test_sampler_randomness_changes_from_step_to_step(halves):
    """The RPN and ROI samplers draw afresh every step in Mean Teacher and in stage 2: the
    same state, batch and run key at two step counts give different losses."""
    model, state, teacher, student = halves
    label, unlabel = _batch(4), _batch(1)
    ema_vars, tg, tstats = teacher(state, unlabel)
    key = jax.random.PRNGKey(3)
    _, m4 = student(state, ema_vars, tg, tstats, label, unlabel, key)
    _, m5 = student(state.replace(step=jnp.int32(5)), ema_vars, tg, tstats, label, unlabel, key)
    assert float(m4["sup/rpn/cls"]) != float(m5["sup/rpn/cls"])
    assert float(m4["unsup/rpn/cls"]) != float(m5["unsup/rpn/cls"])
    sched = schedules.multistep_with_warmup(0.01, warmup_iters=2, max_iter=T_TOTAL)
    tx = optim.sgd(sched)
    step = jax.jit(supervised.make_train_step(model, tx, sched), compiler_options=FAST_JIT)
    ts = supervised.TrainState(step=jnp.int32(0), params=state.params,
                               batch_stats=state.batch_stats, opt_state=tx.init(state.params))
    _, a = step(ts, label, key)
    _, b = step(ts.replace(step=jnp.int32(1)), label, key)
    assert float(a["rpn/cls"]) != float(b["rpn/cls"])


# ----------------------------------------------------------------------------------------
# The data streams.


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    from hassod_jax.data.synthetic import write_synthetic_dataset

    images, gt = write_synthetic_dataset(str(tmp_path_factory.mktemp("mt_scenes")), 6, 0,
                                         (64, 80), n_objects=(1, 2))
    return images, gt


def _mt_config(images, gt):
    from hassod_jax import defaults

    c = defaults.mean_teacher()
    c.train_json, c.images = gt, images
    c.batch_size_label = c.batch_size_unlabel = 2
    c.max_iter = 8
    c.data.workers = 0
    c.data.short_edges = (64, 96)
    c.data.max_size = 128
    c.data.buckets = ((128, 128),)
    return c


def _fingerprint(batch):
    return {k: np.asarray(batch[k]).tobytes() for k in ("images", "images_strong", "boxes")}


def test_streams_are_independent_and_each_resumes_exactly(scenes):
    c = _mt_config(*scenes)
    records = loader.open_records(train_json=c.train_json, images=c.images)
    fresh = mt_mode.make_streams(c, records)
    assert set(fresh) == {"label", "unlabel"}
    seq = {k: [_fingerprint(next(it)) for _ in range(6)] for k, it in fresh.items()}
    assert seq["label"][0]["images"] != seq["unlabel"][0]["images"]
    assert sum(a != b for a, b in zip(seq["label"], seq["unlabel"])) >= 5
    resumed = mt_mode.make_streams(c, records, start=3)
    for k, it in resumed.items():
        for i in range(3, 6):
            assert _fingerprint(next(it)) == seq[k][i], (k, i)
    c.unsup = False
    assert set(mt_mode.make_streams(c, records)) == {"label"}


def test_strong_views_are_drawn_afresh_every_step(scenes):
    """One image, one scale, no flips: the weak view is the same at every step, the strong
    view (jitter, grey, blur, erasing) is drawn again."""
    images, gt = scenes
    c = _mt_config(images, gt)
    c.batch_size_label = 1
    c.data.short_edges = (64,)
    c.data.flip_prob = 0.0
    records = loader.open_records(train_json=gt, images=images)
    it = mt_mode.make_streams(c, records)["label"]
    by_image = {}
    for _ in range(8):
        b = next(it)
        by_image.setdefault(np.asarray(b["images"]).tobytes(), []).append(
            np.asarray(b["images_strong"]).tobytes())
    repeats = [v for v in by_image.values() if len(v) > 1]
    assert repeats, "no image drawn twice in 8 steps of 6 images"
    for strong in repeats:
        assert len(set(strong)) == len(strong)


# ----------------------------------------------------------------------------------------
# Test-time resizing.


def _d2_resize_shortest_edge(h, w, short, max_size):
    """detectron2's ResizeShortestEdge.get_output_shape, transcribed."""
    scale = short * 1.0 / min(h, w)
    newh, neww = (short, scale * w) if h < w else (scale * h, short)
    if max(newh, neww) > max_size:
        scale = max_size * 1.0 / max(newh, neww)
        newh, neww = newh * scale, neww * scale
    return int(newh + 0.5), int(neww + 0.5)


def test_test_time_resize_caps_the_long_side():
    """An elongated 40 x 300 image at short edge 96, max 160: detectron2 gives 21 x 160
    (96 x 720 capped). What predict feeds the detector: the content size and pixels (PIL
    bilinear, as detectron2's ResizeTransform), inside the padding."""
    from hassod_jax.inference import predictor

    img = np.random.default_rng(0).integers(0, 255, (40, 300, 3), dtype=np.uint8)
    want_hw = _d2_resize_shortest_edge(40, 300, 96, 160)
    assert want_hw == (21, 160)
    seen = []

    def recording(variables, images, image_sizes):
        seen.append((np.asarray(images), np.asarray(image_sizes)))
        b, d = images.shape[0], 4
        return {"boxes": np.zeros((b, d, 4), np.float32), "scores": np.zeros((b, d), np.float32),
                "level_probs": np.zeros((b, d, 3), np.float32),
                "levels": np.zeros((b, d), np.int32), "masks": np.zeros((b, d, 28, 28)),
                "valid": np.zeros((b, d), bool), "index": np.zeros((b, d), np.int32)}

    model = D.CascadeMaskRCNN(dataclasses.replace(D.SMALL_CONFIG, detections_per_image=4))
    predictor.predict(model, {}, [(img, 1)], short_edge=96, max_size=160, predict_fn=recording)
    (images, sizes), = seen
    assert tuple(sizes[0]) == want_hw
    want = np.asarray(Image.fromarray(img).resize(want_hw[::-1], Image.BILINEAR))
    np.testing.assert_array_equal(images[0, :21, :160], want)
    assert images.shape[1] % 32 == 0 and images.shape[2] % 32 == 0
