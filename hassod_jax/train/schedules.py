"""Learning-rate schedules as detectron2 builds them (WarmupParamScheduler over a base schedule),
and Mean Teacher's loss weights, evaluated in float64 on the host as the original does.

detectron2 (`solver/build.py: build_lr_scheduler`, `solver/lr_scheduler.py`, fvcore's
`param_scheduler`) evaluates a multiplier of `where = t / max_iter` at iteration t (the LR
that update t uses; t counts from 0, as optax's step count). `WarmupParamScheduler` puts a
linear warmup of length `min(warmup_iters / max_iter, 1)` in front of the base schedule: it
goes from `warmup_factor * base(0)` to `base(end of warmup)`, i.e. with a = t / warmup_iters
the value is `base(warmup_end) * a + warmup_factor * base(0) * (1 - a)`. The base schedule is
NOT rescaled afterwards (`rescale_interval=False`): step t uses `base(t)`. For a multistep base
with no milestone inside the warmup this is the familiar `lr * (factor * (1 - a) + a)`; for the
cosine base the warmup ends at the cosine's value at `warmup_iters`, not at its peak
(Mean Teacher: 1000 warmup steps of 2000 reach 0.005, not 0.01; docs/recipe.md).

fvcore compares `where + 1e-6` with the boundaries; for integer t and max_iter < 10**6 that is
exactly `t < warmup_iters` (warmup) and `t >= milestone` (a step taken), which is what is used
here.

Precision. The original computes every value in Python floats (float64) and hands it to
float32 arithmetic, i.e. rounded once to float32. Here too: each schedule is a float64 NumPy
table over the steps where it changes, rounded once to float32 and indexed by the step inside
the jitted program (clipped at both ends: past its last entry a schedule is constant). A
float32 evaluation of `0.5 * (1 + cos(pi t / T))` would cancel near t = T (1.5 % off at
t = 1999 of 2000). The tables hold at most max_iter + 1 float32 values (160 kB for 40k steps).
"""

import functools
import math

import jax.numpy as jnp
import numpy as np


def _lookup(values):
    """A jit-able schedule `step -> float32` reading `values` (float64, one per step from 0),
    rounded once to float32; steps outside the table take its first or last value."""
    table = np.asarray(values, np.float64).astype(np.float32)

    def schedule(step):
        i = jnp.clip(jnp.asarray(step), 0, table.shape[0] - 1).astype(jnp.int32)
        return jnp.asarray(table)[i]

    schedule.table = table  # the float32 values, step 0 onwards (tests, printing)
    return schedule


def _with_warmup(base, length, warmup_factor, n):
    """detectron2's linear WarmupParamScheduler around the float64 `base(t)` (vectorised over
    an int array t), tabulated for t = 0 .. n - 1."""
    t = np.arange(n, dtype=np.float64)
    start = warmup_factor * base(np.zeros(1))[0]
    end = base(np.full(1, float(length)))[0]
    a = t / max(length, 1)
    return np.where(t < length, end * a + start * (1.0 - a), base(t))


def multistep_with_warmup(
    base_lr, steps=(), gamma=0.1, warmup_iters=1000, warmup_factor=0.001, max_iter=None
):
    """detectron2's WarmupMultiStepLR: base_lr * gamma^(milestones passed), after the warmup.

    A milestone at or beyond `max_iter` is never reached (detectron2 drops those from
    SOLVER.STEPS with a warning); HASSOD's stage 2.2 has STEPS (80000,) and MAX_ITER 40000,
    so its LR is constant after the warmup.
    """
    steps = sorted(int(s) for s in steps)
    if max_iter is not None:
        steps = [s for s in steps if s <= max_iter]
    length = int(warmup_iters) if max_iter is None else min(int(warmup_iters), int(max_iter))
    milestones = np.asarray(steps, np.float64)

    def base(t):
        passed = np.sum(t[:, None] >= milestones[None, :], axis=1)
        return base_lr * np.power(float(gamma), passed)

    # Constant after the warmup and the last milestone: the table ends there.
    n = max([length] + steps) + 1
    return _lookup(_with_warmup(base, length, warmup_factor, n))


def cosine_with_warmup(base_lr, max_iter, end_lr=0.0, warmup_iters=1000, warmup_factor=0.001):
    """detectron2's WarmupCosineLR: a half cosine from base_lr to end_lr over max_iter, the
    warmup ramping from warmup_factor * base_lr to the cosine's value at warmup_iters."""
    max_iter = int(max_iter)

    def base(t):
        frac = np.clip(t / max(max_iter, 1), 0.0, 1.0)
        return end_lr + 0.5 * (base_lr - end_lr) * (1.0 + np.cos(math.pi * frac))

    length = min(int(warmup_iters), max_iter)
    return _lookup(_with_warmup(base, length, warmup_factor, max_iter + 1))


@functools.lru_cache(maxsize=16)
def _adaptive_tables(total_steps, sup_start, unsup_base):
    t = np.arange(int(total_steps) + 1, dtype=np.float64)
    w_sup = sup_start * 0.5 * (1.0 + np.cos(math.pi * t / max(int(total_steps), 1)))
    return _lookup(w_sup), _lookup(unsup_base + 1.0 - w_sup)


def adaptive_loss_weights(step, total_steps, sup_start=1.0, unsup_base=2.0):
    """The Mean Teacher's loss weights at step t of T (float32, from float64 as the original).

    w_sup = sup_start * (1 + cos(pi t / T)) / 2 and w_unsup = unsup_base + 1 - w_sup.

    So the supervised (initial pseudo-label) branch decays 1 -> 0 while the teacher branch grows
    2 -> 3 over the Mean Teacher run.
    """
    w_sup, w_unsup = _adaptive_tables(int(total_steps), float(sup_start), float(unsup_base))
    return w_sup(step), w_unsup(step)


def mean_teacher_loss_weights(kind, step, total_steps, sup_weight=1.0, unsup_weight=2.0):
    """(w_sup, w_unsup) of the Mean Teacher step at `step`: 'adaptive' is the recipe's schedule
    (`adaptive_loss_weights`); 'constant' holds (sup_weight, unsup_weight) at every step (a Mean
    Teacher without adaptive targets, the paper's "+ Mean Teacher" ablation row)."""
    if kind == "adaptive":
        return adaptive_loss_weights(step, total_steps, sup_weight, unsup_weight)
    if kind == "constant":
        return jnp.asarray(sup_weight, jnp.float32), jnp.asarray(unsup_weight, jnp.float32)
    raise ValueError(f"loss_weights must be 'adaptive' or 'constant', got {kind!r}")
