"""Learning-rate schedules as detectron2 builds them (WarmupParamScheduler over a base schedule).

detectron2 (`solver/build.py: build_lr_scheduler`, `solver/lr_scheduler.py`, fvcore's
`param_scheduler`) evaluates a multiplier of `where = t / max_iter` at iteration t (the LR
that update t uses; t counts from 0, as optax's step count). `WarmupParamScheduler` puts a
linear warmup of length `min(warmup_iters / max_iter, 1)` in front of the base schedule: it
goes from `warmup_factor * base(0)` to `base(end of warmup)`, i.e. with a = t / warmup_iters
the value is `base(warmup_end) * a + warmup_factor * base(0) * (1 - a)`. The base schedule is
NOT rescaled afterwards (`rescale_interval=False`): step t uses `base(t)`. For a multistep base
with no milestone inside the warmup this is the familiar `lr * (factor * (1 - a) + a)`; for the
cosine base the warmup ends at the cosine's value at `warmup_iters`, not at its peak
(Mean Teacher: 1000 warmup steps of 2000 reach 0.005, not 0.01; reference note A.9).

fvcore compares `where + 1e-6` with the boundaries; for integer t and max_iter < 10**6 that is
exactly `t < warmup_iters` (warmup) and `t >= milestone` (a step taken), which is what is used
here.
"""

import jax.numpy as jnp


def _with_warmup(base, warmup_iters, warmup_factor, max_iter=None):
    """detectron2's linear WarmupParamScheduler around `base(step)` (jnp, float32)."""
    length = int(warmup_iters) if max_iter is None else min(int(warmup_iters), int(max_iter))
    start = warmup_factor * base(jnp.asarray(0, jnp.float32))
    end = base(jnp.asarray(length, jnp.float32))

    def schedule(step):
        step = jnp.asarray(step, jnp.float32)
        a = step / max(length, 1)
        ramp = end * a + start * (1.0 - a)
        return jnp.where(step < length, ramp, base(step))

    return schedule


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
    milestones = jnp.asarray(steps or [0], jnp.float32)

    def base(step):
        if not steps:
            return jnp.full(jnp.shape(step), base_lr, jnp.float32)
        passed = jnp.sum(step[..., None] >= milestones, axis=-1)
        return base_lr * jnp.power(jnp.float32(gamma), passed.astype(jnp.float32))

    return _with_warmup(base, warmup_iters, warmup_factor, max_iter)


def cosine_with_warmup(base_lr, max_iter, end_lr=0.0, warmup_iters=1000, warmup_factor=0.001):
    """detectron2's WarmupCosineLR: a half cosine from base_lr to end_lr over max_iter, the
    warmup ramping from warmup_factor * base_lr to the cosine's value at warmup_iters."""

    def base(step):
        frac = jnp.clip(step / max(max_iter, 1), 0.0, 1.0)
        return end_lr + 0.5 * (base_lr - end_lr) * (1.0 + jnp.cos(jnp.pi * frac))

    return _with_warmup(base, warmup_iters, warmup_factor, max_iter)


def adaptive_loss_weights(step, total_steps, sup_start=1.0, unsup_base=2.0):
    """HASSOD_SPEC 2.3 loss weights at step t of T.

    w_sup = sup_start * (1 + cos(pi t / T)) / 2 and w_unsup = unsup_base + 1 - w_sup.

    So the supervised (initial pseudo-label) branch decays 1 -> 0 while the teacher branch grows
    2 -> 3 over the Mean Teacher run.
    """
    frac = jnp.clip(jnp.asarray(step) / max(total_steps, 1), 0.0, 1.0)
    w_sup = sup_start * 0.5 * (1.0 + jnp.cos(jnp.pi * frac))
    return w_sup, unsup_base + 1.0 - w_sup


def mean_teacher_loss_weights(kind, step, total_steps, sup_weight=1.0, unsup_weight=2.0):
    """(w_sup, w_unsup) of the Mean Teacher step at `step`: 'adaptive' is the recipe's schedule
    (`adaptive_loss_weights`); 'constant' holds (sup_weight, unsup_weight) at every step (a Mean
    Teacher without adaptive targets, the paper's "+ Mean Teacher" ablation row)."""
    if kind == "adaptive":
        return adaptive_loss_weights(step, total_steps, sup_weight, unsup_weight)
    if kind == "constant":
        return jnp.asarray(sup_weight, jnp.float32), jnp.asarray(unsup_weight, jnp.float32)
    raise ValueError(f"loss_weights must be 'adaptive' or 'constant', got {kind!r}")
