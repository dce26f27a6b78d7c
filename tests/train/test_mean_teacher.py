"""Mean Teacher's pieces against independent references: the EMA (float64 NumPy), the loss
weights and the LR schedule (the original's numbers), the teacher's targets on crafted
detections (strict threshold, pasted masks, levels = hierarchy_levels(..., 0.75)), and one
jitted step (compiles once; the teacher gets no gradient)."""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hassod_jax import ops
from hassod_jax.discovery.hierarchy import hierarchy_levels
from hassod_jax.models import detector as D
from hassod_jax.modes import mean_teacher as mt_mode
from hassod_jax.train import mean_teacher as MT
from hassod_jax.train import optim, schedules
from tests.xla_env import FAST_JIT


def test_ema_arithmetic_and_copy_at_step_zero():
    r = np.random.default_rng(0)
    teacher = {"params": {"a": r.normal(size=(3, 4)).astype(np.float32)},
               "batch_stats": {"m": r.normal(size=5).astype(np.float32)}}
    student = jax.tree_util.tree_map(lambda x: x + 1.0, teacher)
    out0 = MT.ema_update(teacher, student, 0)
    jax.tree_util.tree_map(lambda o, s: np.testing.assert_array_equal(o, s), out0, student)
    out = MT.ema_update(teacher, student, 7)
    for o, t, s in zip(jax.tree_util.tree_leaves(out), jax.tree_util.tree_leaves(teacher),
                       jax.tree_util.tree_leaves(student)):
        want = 0.9996 * t.astype(np.float64) + 0.0004 * s.astype(np.float64)
        np.testing.assert_allclose(np.asarray(o), want, rtol=1e-6, atol=1e-7)


def test_loss_weights_and_lr_schedule_as_the_original():
    from hassod_jax.train.schedules import adaptive_loss_weights

    for t, ws in ((0, 1.0), (1000, 0.5), (1999, 0.5 * (1 + math.cos(math.pi * 1999 / 2000)))):
        w_sup, w_unsup = adaptive_loss_weights(t, 2000, 1.0, 2.0)
        assert abs(float(w_sup) - ws) < 1e-6 and abs(float(w_unsup) - (3.0 - ws)) < 1e-6
    # detectron2's WarmupCosineLR as 4_mean_teacher.sh runs it: a linear warmup from
    # 0.001 x to the cosine's value AT the end of warmup (0.5), the cosine not rescaled.
    def d2(t):
        cos = 0.5 * (1 + math.cos(math.pi * t / 2000))
        if t < 1000:
            return 0.01 * (0.001 + (0.5 - 0.001) * t / 1000)
        return 0.01 * cos

    sched = schedules.cosine_with_warmup(0.01, 2000, warmup_iters=1000, warmup_factor=0.001)
    # The measured values (1e-5, 0.0025, 0.005, 0.00146, ~0) to their printed precision.
    for t, lr in ((0, 1e-5), (500, 0.0025), (1000, 0.005), (1500, 0.00146), (1999, 0.0)):
        got = float(sched(t))
        assert abs(got - d2(t)) <= 1e-6 * d2(t) + 1e-12, (t, got, d2(t))
        assert abs(got - lr) <= 0.01 * lr + 1e-8, (t, got, lr)


def _det(boxes, scores, masks):
    n = len(scores)
    return {
        "boxes": jnp.asarray(boxes, jnp.float32),
        "scores": jnp.asarray(scores, jnp.float32),
        "valid": jnp.asarray(np.arange(n) < n - 1),  # the last one is padding
        "masks": jnp.asarray(masks, jnp.float32),
    }


def test_constant_loss_weights_for_the_mean_teacher_ablation(tmp_path):
    """loss_weights='constant' (the "+ Mean Teacher" row without adaptive targets) holds the
    configured weights at every step; 'adaptive' is the schedule above; anything else is
    refused by the step builder and, as a one-line config error, by the run."""
    from hassod_jax import defaults, utils

    for t in (0, 700, 1999):
        ws, wu = schedules.mean_teacher_loss_weights("constant", t, 2000, 1.0, 2.0)
        assert (float(ws), float(wu)) == (1.0, 2.0)
        ws, wu = schedules.mean_teacher_loss_weights("constant", t, 2000, 0.5, 4.0)
        assert (float(ws), float(wu)) == (0.5, 4.0)
        a = schedules.mean_teacher_loss_weights("adaptive", t, 2000, 1.0, 2.0)
        b = schedules.adaptive_loss_weights(t, 2000, 1.0, 2.0)
        assert [float(x) for x in a] == [float(x) for x in b]
    with pytest.raises(ValueError, match="loss_weights must be 'adaptive' or 'constant'"):
        MT.make_mt_step(None, None, None, total_steps=10, loss_weights="cosine")
    c = defaults.mean_teacher()
    for name in ("init_checkpoint", "train_json", "images"):
        c[name] = str(tmp_path)
    c.loss_weights = "fixed"
    with pytest.raises(utils.ConfigError) as e:
        mt_mode.train(c, str(tmp_path / "work"))
    assert str(e.value) == "config.loss_weights must be 'adaptive' or 'constant', got 'fixed'"
    assert not (tmp_path / "work").exists()


def test_teacher_targets_on_crafted_detections():
    m = np.zeros((6, 28, 28), np.float32)
    m[:] = 1.0  # full boxes
    m[4, :, :14] = 0.0  # half a box
    boxes = np.array([[0, 0, 60, 60], [10, 10, 40, 40], [12, 12, 30, 30], [70, 0, 90, 20],
                      [0, 40, 20, 60], [1, 1, 5, 5]], np.float32)
    # 0.7 exactly is NOT kept (strict); the padding slot (score 0.99) is not valid.
    scores = np.array([0.95, 0.9, 0.8, 0.7, 0.71, 0.99], np.float32)
    out = jax.jit(lambda d: MT.teacher_targets(d, 64, 96, max_targets=5))(_det(boxes, scores, m))
    valid = np.asarray(out["valid"])
    np.testing.assert_array_equal(valid, [True, True, True, True, False])
    kept = [0, 1, 2, 4]
    np.testing.assert_array_equal(np.asarray(out["boxes"])[:4], boxes[kept])
    assert int(out["num_kept"]) == 4
    pasted = np.asarray(ops.paste_masks_in_image(m[kept], boxes[kept], 64, 96, 0.5))
    np.testing.assert_array_equal(np.asarray(out["masks"])[:4], pasted)
    assert not np.asarray(out["masks"])[4].any()
    levels, _ = hierarchy_levels(pasted, 0.75)
    np.testing.assert_array_equal(np.asarray(out["levels"])[:4], levels)
    np.testing.assert_array_equal(levels, [0, 1, 2, 1])  # nested boxes; box 4 half inside box 0


def test_teacher_targets_keep_the_highest_scores_when_capped():
    m = np.ones((5, 28, 28), np.float32)
    boxes = np.array([[i * 10, 0, i * 10 + 8, 8] for i in range(5)], np.float32)
    out = MT.teacher_targets(_det(boxes, [0.9, 0.85, 0.8, 0.75, 0.1], m), 16, 64, max_targets=2)
    np.testing.assert_array_equal(np.asarray(out["boxes"]), boxes[:2])
    assert int(out["num_kept"]) == 4 and np.asarray(out["valid"]).all()


def _batch(rng, b=2, hw=64, g=3):
    m = np.zeros((b, g, hw, hw), bool)
    m[:, :, 8:40, 12:44] = True
    return dict(
        images=rng.integers(0, 255, (b, hw, hw, 3), dtype=np.uint8),
        images_strong=rng.integers(0, 255, (b, hw, hw, 3), dtype=np.uint8),
        image_sizes=np.full((b, 2), hw, np.int32),
        boxes=np.tile(np.array([12, 8, 44, 40], np.float32), (b, g, 1)),
        masks=m,
        levels=np.zeros((b, g), np.int32),
        valid=np.ones((b, g), bool),
    )


@pytest.fixture(scope="module")
def mt_setup():
    cfg = dataclasses.replace(D.SMALL_CONFIG, use_droploss=False, detections_per_image=16,
                              rpn_post_nms_topk_train=32, rpn_pre_nms_topk_train=64,
                              roi_batch_size_per_image=32, mask_max_fg=8)
    model = D.CascadeMaskRCNN(cfg)
    variables = jax.jit(lambda r: model.init(r, jnp.zeros((1, 64, 64, 3))))(jax.random.PRNGKey(0))
    sched = schedules.cosine_with_warmup(0.01, 10, warmup_iters=5)
    tx = optim.sgd(sched)
    step = jax.jit(
        MT.make_mt_step(model, tx, sched, total_steps=10, score_thresh=0.0, max_targets=8),
        compiler_options=FAST_JIT,
    )
    return model, variables, tx, step


def test_one_step_compiles_once_and_updates_as_specified(mt_setup):
    model, variables, tx, step = mt_setup
    rng = np.random.default_rng(0)
    s0 = MT.init_mt_state(variables, tx)
    s1, m1 = step(s0, _batch(rng), _batch(rng), jax.random.PRNGKey(1))
    s2, m2 = step(s1, _batch(rng), _batch(rng), jax.random.PRNGKey(1))
    assert step._cache_size() == 1
    assert int(s2.step) == 2
    for m in (m1, m2):
        assert all(np.isfinite(float(v)) for v in m.values())
    assert float(m1["w_sup"]) == 1.0 and float(m1["w_unsup"]) == 2.0
    assert float(m1["teacher/targets_per_image"]) > 0  # threshold 0: the teacher gives targets
    # Step 0's EMA is a copy; the teacher then gets only the EMA (no gradient step), while the
    # student moved. At step 1 the teacher is 0.9996 * s0-teacher + 0.0004 * s1-student.
    jax.tree_util.tree_map(np.testing.assert_array_equal, s1.teacher_params, s0.params)
    want = jax.tree_util.tree_map(lambda t, s: 0.9996 * t + 0.0004 * s, s1.teacher_params,
                                  s1.params)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7),
                           s2.teacher_params, want)
    moved = jax.tree_util.tree_map(lambda a, b: float(jnp.abs(a - b).max()), s1.params, s0.params)
    assert max(jax.tree_util.tree_leaves(moved)) > 0
    # The teacher's forward ran with batch statistics: its running statistics moved.
    diff = jax.tree_util.tree_map(lambda a, b: float(jnp.abs(a - b).max()),
                                  s1.teacher_batch_stats, s0.batch_stats)
    assert max(jax.tree_util.tree_leaves(diff)) > 0


def test_unsup_false_leaves_the_branch_out_and_gives_the_weight_zero_update(mt_setup):
    """`unsup=False` (the continued-training ablation) skips the teacher forward and the
    student's unlabel forward; the student's update equals the full step with the unlabeled
    branch weighted 0 (constant weights 1 and 0), and the compiled step does less work."""
    model, variables, tx, _ = mt_setup
    sched = schedules.cosine_with_warmup(0.01, 10, warmup_iters=5)
    kw = dict(total_steps=10, score_thresh=0.0, max_targets=8)
    off = jax.jit(MT.make_mt_step(model, tx, sched, unsup=False, **kw))
    w0 = jax.jit(MT.make_mt_step(model, tx, sched, loss_weights="constant", sup_weight=1.0,
                                 unsup_weight=0.0, **kw))
    rng = np.random.default_rng(0)
    label, unlabel = _batch(rng), _batch(rng)
    s0 = MT.init_mt_state(variables, tx)
    args = (label, unlabel, jax.random.PRNGKey(1))
    flops, out = {}, {}
    for name, fn in (("off", off), ("w0", w0)):
        compiled = fn.lower(s0, *args).compile(FAST_JIT)  # one compile each: it also runs it
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        flops[name] = float(cost["flops"])
        out[name] = compiled(s0, *args)
    (a, ma), (b, mb) = out["off"], out["w0"]
    assert float(ma["w_sup"]) == float(mb["w_sup"]) == 1.0
    assert float(ma["w_unsup"]) == float(mb["w_unsup"]) == 0.0
    assert float(mb["teacher/targets_per_image"]) > 0
    for k, v in ma.items():
        if k.startswith(("unsup/", "teacher/")):
            assert float(v) == 0.0, k
        else:
            assert k in mb, k
    np.testing.assert_allclose(float(ma["total_loss"]), float(mb["total_loss"]), rtol=1e-6)
    jax.tree_util.tree_map(
        lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-8), a.params, b.params)
    jax.tree_util.tree_map(np.testing.assert_array_equal, a.teacher_params, s0.params)
    # No teacher forward: the teacher's statistics are the (step-0 copy of the) student's.
    jax.tree_util.tree_map(np.testing.assert_array_equal, a.teacher_batch_stats, s0.batch_stats)
    assert flops["off"] < 0.75 * flops["w0"], flops
