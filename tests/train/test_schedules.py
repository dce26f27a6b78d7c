"""The LR schedules against a float64 transcription of detectron2's scheduler stack.

The reference below re-implements, independently of `hassod_jax.train.schedules`, what
detectron2 runs: `build_lr_scheduler` (SOLVER.STEPS beyond MAX_ITER dropped), fvcore's
`MultiStepParamScheduler`, `CosineParamScheduler`, `LinearParamScheduler` and
`CompositeParamScheduler` (with their `WHERE_EPSILON`), detectron2's `WarmupParamScheduler`
(rescale_interval False) and `LRMultiplier` (iteration t uses the multiplier at
where = t / max_iter). The same reference prints the stage-2.2 table in
`experiments/print_schedule.py`.
"""

import bisect
import importlib.util
import math
import os

import jax
import numpy as np
import pytest

from hassod_jax.modes import mean_teacher as mt_mode
from hassod_jax.modes import train as train_mode
from hassod_jax.train import schedules

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
WHERE_EPSILON = 1e-6
TABLE_STEPS = (0, 1, 500, 998, 999, 1000, 1001, 5000, 29999, 30000, 30001, 39999)


def _composite(schedulers, lengths, scaling):
    def call(where):
        i, running_total = 0, lengths[0]
        while where + WHERE_EPSILON > running_total and i < len(schedulers) - 1:
            i += 1
            running_total += lengths[i]
        w = where
        if scaling[i] == "rescaled":
            w = (where - (running_total - lengths[i])) / lengths[i]
        return schedulers[i](w)

    return call


def _warmup_param_scheduler(base, warmup_factor, warmup_length):
    end_value = base(warmup_length)
    start_value = warmup_factor * base(0.0)

    def linear(w):
        return end_value * w + start_value * (1 - w)

    return _composite([linear, base], [warmup_length, 1 - warmup_length], ["rescaled", "fixed"])


def d2_lr(
    t,
    base_lr,
    max_iter,
    name="WarmupMultiStepLR",
    steps=(),
    gamma=0.1,
    warmup_iters=1000,
    warmup_factor=0.001,
    base_lr_end=0.0,
):
    """The LR of iteration t (float64) as detectron2's build_lr_scheduler makes it."""
    if name == "WarmupMultiStepLR":
        kept = [s for s in steps if s <= max_iter]
        values = [gamma**k for k in range(len(kept) + 1)]

        def base(where):
            epoch_num = int((where + WHERE_EPSILON) * max_iter)
            return values[bisect.bisect_right(kept, epoch_num)]

    elif name == "WarmupCosineLR":
        end = base_lr_end / base_lr

        def base(where):
            return end + 0.5 * (1.0 - end) * (1 + math.cos(math.pi * where))

    else:
        raise ValueError(name)
    sched = _warmup_param_scheduler(base, warmup_factor, min(warmup_iters / max_iter, 1.0))
    return base_lr * sched(t / max_iter)


def load_config(path):
    spec = importlib.util.spec_from_file_location("cfg", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.get_config()


def original_train_lr(t):
    """HASSOD stage 2.2: cascade yaml SOLVER (BASE_LR 0.01, STEPS (80000,), GAMMA 0.02) with
    the launch script's MAX_ITER 40000, detectron2's WARMUP_ITERS 1000 / WARMUP_FACTOR 0.001."""
    return d2_lr(t, 0.01, 40000, steps=(80000,), gamma=0.02)


def schedule_table(config, steps=TABLE_STEPS):
    """Rows (step, ours, original) for `config`'s schedule against the original's."""
    _, sched = train_mode.make_optimizer(config)
    return [(t, float(sched(t)), original_train_lr(t)) for t in steps]


def format_table(rows):
    lines = [f"{'step':>6}  {'ours':>14}  {'original':>14}  {'rel. diff':>9}"]
    for t, ours, ref in rows:
        lines.append(f"{t:>6}  {ours:>14.9g}  {ref:>14.9g}  {abs(ours - ref) / ref:>9.1e}")
    return "\n".join(lines)


def test_reference_reproduces_the_measured_detectron2_values():
    # detectron2's WarmupParamScheduler, run for the original Mean Teacher's WarmupCosineLR
    # (BASE_LR 0.01, MAX_ITER 2000, WARMUP_ITERS 1000), gave lr(0) = 1e-5, lr(500) = 0.0025,
    # lr(1000) = 0.005, lr(1500) = 0.00146 and lr(1999) ~ 0.
    def mt(t):
        return d2_lr(t, 0.01, 2000, name="WarmupCosineLR")

    assert mt(0) == pytest.approx(1e-5, rel=1e-12)
    # 0.0025 and 0.00146 are rounded (to half a unit of the last digit).
    assert mt(500) == pytest.approx(0.0025, abs=5e-6)
    assert mt(1000) == pytest.approx(0.005, rel=1e-12)
    assert mt(1500) == pytest.approx(0.00146, abs=5e-6)
    assert mt(1999) == pytest.approx(0.0, abs=1e-7)
    # detectron2's WarmupMultiStepLR with a step inside the run: gamma applies from the step on.
    assert d2_lr(2999, 0.02, 4000, steps=(3000,)) == pytest.approx(0.02, rel=1e-12)
    assert d2_lr(3000, 0.02, 4000, steps=(3000,)) == pytest.approx(0.002, rel=1e-12)


def test_stage22_default_schedule_is_the_originals(capsys):
    config = load_config(os.path.join(ROOT, "configs", "train_coco.py"))
    rows = schedule_table(config)
    with capsys.disabled():
        print("\nstage-2.2 LR, configs/train_coco.py vs the original (detectron2):")
        print(format_table(rows))
    for t, ours, ref in rows:
        assert ours == pytest.approx(ref, rel=1e-6), t
    by_step = {t: ref for t, _, ref in rows}
    assert by_step[0] == pytest.approx(1e-5)
    assert by_step[1000] == by_step[30000] == by_step[39999] == pytest.approx(0.01)
    # Every step of the run, not only the table's.
    _, sched = train_mode.make_optimizer(config)
    t = np.arange(0, config.max_iter)
    ours = np.asarray(sched(t))
    ref = np.array([original_train_lr(int(s)) for s in t])
    np.testing.assert_allclose(ours, ref, rtol=1e-6)


@pytest.mark.parametrize(
    "kw",
    [
        dict(steps=(30000,), gamma=0.1, max_iter=40000),
        dict(steps=(60000, 80000), gamma=0.1, max_iter=90000),
        dict(steps=(500, 3000), gamma=0.5, max_iter=4000),  # a step inside the warmup
        dict(steps=(), gamma=0.1, max_iter=1500),
        dict(steps=(80000,), gamma=0.02, max_iter=40000, warmup_iters=0),
        dict(steps=(10,), gamma=0.1, max_iter=200, warmup_iters=300),  # warmup > run
    ],
)
def test_multistep_matches_detectron2(kw):
    kw = dict(kw)
    max_iter = kw.pop("max_iter")
    warmup = kw.pop("warmup_iters", 1000)
    sched = schedules.multistep_with_warmup(
        0.02, warmup_iters=warmup, warmup_factor=0.001, max_iter=max_iter, **kw
    )
    t = np.unique(
        np.concatenate(
            [np.arange(0, min(max_iter, 1100)), np.linspace(0, max_iter - 1, 400).astype(int)]
            + [np.array([s - 1, s, s + 1]) for s in kw["steps"] if s + 1 < max_iter]
        )
    )
    ours = np.asarray(sched(t))
    ref = np.array(
        [d2_lr(int(s), 0.02, max_iter, warmup_iters=warmup, warmup_factor=0.001, **kw) for s in t]
    )
    np.testing.assert_allclose(ours, ref, rtol=1e-6, atol=1e-12)


def _rel_close(ours, ref, rtol=1e-6, floor=1e-12):
    """|ours - ref| <= rtol * |ref| wherever |ref| >= floor (below it: |ours| < floor too)."""
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    big = np.abs(ref) >= floor
    rel = np.abs(ours - ref)[big] / np.abs(ref)[big]
    assert rel.max(initial=0.0) <= rtol, (rel.max(), np.argmax(rel))
    assert np.all(np.abs(ours[~big]) < floor)


def test_cosine_matches_detectron2_warmup_to_the_cosine_value():
    sched = schedules.cosine_with_warmup(0.01, 2000, warmup_iters=1000, warmup_factor=0.001)
    t = np.arange(0, 2000)
    ours = np.asarray(sched(t))
    ref = np.array([d2_lr(int(s), 0.01, 2000, name="WarmupCosineLR") for s in t])
    # Every step, the last ones included (1 + cos cancels there: t = 1999 is 6.17e-9).
    _rel_close(ours, ref)
    # The peak is the cosine's value at the end of the warmup, 0.005 (not base_lr).
    assert float(sched(1000)) == pytest.approx(0.005, rel=1e-6)
    assert float(np.max(ours)) == pytest.approx(0.005, rel=1e-6)


def original_mt_weights(t, max_iter=2000, sup=1.0, unsup=2.0):
    """The original's Mean Teacher loss weights at iteration t (float64, Python): the cosine
    schedule with BURN_UP_STEP 0, SUP_LOSS_WEIGHT 1.0, UNSUP_LOSS_WEIGHT 2.0."""
    w_sup = sup * 0.5 * (1 + math.cos(math.pi * (t - 0) / (max_iter - 0)))
    return w_sup, unsup + 1.0 - w_sup


def test_mean_teacher_lr_and_loss_weights_at_every_step_as_the_original():
    """configs/mean_teacher_coco.py's LR (the run's own optimizer) and both loss weights at
    every step 0 .. 1999, within 1e-6 of the original's float64 values (float32 rounding)."""
    config = load_config(os.path.join(ROOT, "configs", "mean_teacher_coco.py"))
    _, sched = mt_mode.make_optimizer(config)
    t = np.arange(config.max_iter)
    lr = np.asarray(jax.jit(jax.vmap(sched))(t))
    ref = np.array([d2_lr(int(s), 0.01, 2000, name="WarmupCosineLR") for s in t])
    _rel_close(lr, ref)
    ws, wu = jax.jit(jax.vmap(lambda s: schedules.mean_teacher_loss_weights(
        config.loss_weights, s, config.max_iter, config.sup_weight, config.unsup_weight)))(t)
    want = np.array([original_mt_weights(int(s)) for s in t])
    _rel_close(ws, want[:, 0])
    _rel_close(wu, want[:, 1])
    assert float(ws[0]) == 1.0 and float(wu[0]) == 2.0
