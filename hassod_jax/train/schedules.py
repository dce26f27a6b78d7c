"""Learning-rate schedules as detectron2 builds them (WarmupParamScheduler over a base schedule).

detectron2 (solver/build.py, solver/lr_scheduler.py): the base multiplier is a function of
t / max_iter; during the first `warmup_iters` iterations it is multiplied by a linear ramp
factor * (1 - a) + a with a = t / warmup_iters.
"""

import jax.numpy as jnp


def _warmup(step, warmup_iters, warmup_factor):
    alpha = jnp.clip(step / max(warmup_iters, 1), 0.0, 1.0)
    ramp = warmup_factor * (1.0 - alpha) + alpha
    return jnp.where(step < warmup_iters, ramp, 1.0)


def multistep_with_warmup(
    base_lr, steps=(30000,), gamma=0.1, warmup_iters=1000, warmup_factor=0.001
):
    """detectron2's default WarmupMultiStepLR: lr * gamma^(number of milestones passed)."""
    milestones = jnp.asarray(sorted(steps) or [2**31 - 1], jnp.int32)

    def schedule(step):
        step = jnp.asarray(step)
        passed = jnp.sum(step >= milestones) if steps else 0
        return base_lr * (gamma**passed) * _warmup(step, warmup_iters, warmup_factor)

    return schedule


def cosine_with_warmup(base_lr, max_iter, end_lr=0.0, warmup_iters=1000, warmup_factor=0.001):
    """detectron2's WarmupCosineLR: a half cosine from base_lr to end_lr over max_iter."""

    def schedule(step):
        step = jnp.asarray(step)
        frac = jnp.clip(step / max(max_iter, 1), 0.0, 1.0)
        value = end_lr + 0.5 * (base_lr - end_lr) * (1.0 + jnp.cos(jnp.pi * frac))
        return value * _warmup(step, warmup_iters, warmup_factor)

    return schedule


def adaptive_loss_weights(step, total_steps, sup_start=1.0, unsup_base=2.0):
    """HASSOD_SPEC 2.3 loss weights at step t of T.

    w_sup = sup_start * (1 + cos(pi t / T)) / 2 and w_unsup = unsup_base + 1 - w_sup.

    So the supervised (initial pseudo-label) branch decays 1 -> 0 while the teacher branch grows
    2 -> 3 over the Mean Teacher run.
    """
    frac = jnp.clip(jnp.asarray(step) / max(total_steps, 1), 0.0, 1.0)
    w_sup = sup_start * 0.5 * (1.0 + jnp.cos(jnp.pi * frac))
    return w_sup, unsup_base + 1.0 - w_sup
