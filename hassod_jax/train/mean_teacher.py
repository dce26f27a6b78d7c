"""HASSOD's Mean Teacher self-training (docs/recipe.md, Mean Teacher), as
the original HASSOD code runs it (its engine/mt_trainer.py):

- the student and the teacher start as the stage-2.2 detector; the optimizer starts fresh;
- each step begins with the EMA, teacher <- keep * teacher + (1 - keep) * student over the
  parameters AND the batch-norm statistics (keep 0.9996; a plain copy at step 0);
- the teacher runs on the WEAK views of the "unlabel" images with training-mode batch norm
  (batch statistics, which also move its running statistics) and the RPN's training top-k,
  then the test-time ROI path (stage-averaged softmax scores, last-stage boxes, NMS, top 1000);
  its detections with score > 0.7 become targets: boxes, 28 x 28 masks pasted at the weak
  view's padded size at 0.5, and levels recomputed by the coverage tree at 0.75 (the teacher's
  own level head is ignored);
- the student is trained on the strong AND weak views of the "label" images against the
  stage-1 pseudo-labels (every stage-2.2 loss) x w_sup, and on the STRONG views of the unlabel
  images against the teacher's targets (RPN, and each stage's class, box and level losses)
  x w_unsup; the unlabeled mask loss is weighted 0; DropLoss and copy-paste are off;
  w_sup = (1 + cos(pi t / T)) / 2, w_unsup = 3 - w_sup;
- SGD as stage 2.2 with detectron2's WarmupCosineLR as the original sets it (2000 steps, a
  1000-step warmup, so the peak LR is 0.005), float32;
- the model kept at the end is the STUDENT.

Everything from the EMA to the optimizer update is one jitted step over the Mesh;
`modes/mean_teacher.py` runs it.
"""

from __future__ import annotations

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax

from hassod_jax import ops
from hassod_jax.data import loader
from hassod_jax.discovery.hierarchy import hierarchy_levels_padded
from hassod_jax.train import schedules

EMA_KEEP = 0.9996
SCORE_THRESH = 0.7
COVERAGE = 0.75


def ema_update(teacher, student, step, keep: float = EMA_KEEP):
    """teacher <- teacher * keep + student * (1 - keep), leaf by leaf; at step 0 a copy
    (the original's `_update_teacher_model(keep_rate=0.0)` at the burn-up step).

    Bit for bit the original's float32 tensors times Python floats: `keep` and `1 - keep` are
    computed in float64 and each rounded once to float32 (0.99959999 and 3.9999999e-4 for
    0.9996; the float32 difference 1 - float32(0.9996) would be 4.0000677e-4), and each
    product is rounded to float32 before the sum. XLA's CPU and GPU code generators contract
    a multiply feeding an add into one fused multiply-add (a different rounding in about a
    quarter of the elements), so each product passes through an integer OR with a zero known
    only at run time (from `step`), which no compiler can see through; it costs two integer
    operations per element.
    """
    k = np.float32(keep)
    rest = np.float32(1.0 - float(keep))
    step = jnp.asarray(step)
    zero = jnp.minimum(step, 0).astype(jnp.int32)  # 0, but only known at run time

    def rounded(x):
        bits = jax.lax.bitcast_convert_type(x, jnp.int32) | zero
        return jax.lax.bitcast_convert_type(bits, jnp.float32)

    def update(t, s):
        t32, s32 = t.astype(jnp.float32), s.astype(jnp.float32)
        ema = rounded(t32 * k) + rounded(s32 * rest)
        return jnp.where(step == 0, s32, ema).astype(t.dtype)

    return jax.tree_util.tree_map(update, teacher, student)


def teacher_targets(
    det, height: int, width: int, *, score_thresh=SCORE_THRESH, coverage=COVERAGE,
    max_targets=-1,
):
    """Targets for the student from the teacher's detections of ONE image.

    Args:
      det: {"boxes" (D, 4) xyxy, "scores" (D,), "valid" (D,) bool, "masks" (D, M, M) mask
        probabilities in the box}, by descending score (`CascadeMaskRCNN` inference output).
      height, width: static size the masks are pasted at (the weak view's padded size).
      score_thresh: detections with score STRICTLY above it are kept (the original's `>`).
      coverage: θ_cover of the level tree.
      max_targets: static number of target slots, the highest-scoring kept detections; -1 (or
        anything >= D) gives one slot per detection, so every kept detection is a target, as
        in the original. A smaller cap saves memory and drops the lowest-scoring targets.
    Returns:
      {"boxes" (T, 4), "masks" (T, height, width) bool, "levels" (T,) int32, "valid" (T,),
       "num_kept" () int32 (before the cap), "num_dropped" () int32 (by the cap)},
      T = min(max_targets, D), or D.
    """
    keep = det["valid"] & (det["scores"] > score_thresh)
    d = keep.shape[0]
    t = d if max_targets is None or int(max_targets) < 0 else min(int(max_targets), d)
    order = jnp.argsort(jnp.logical_not(keep).astype(jnp.int32), stable=True)[:t]
    valid = keep[order]
    boxes = jnp.where(valid[:, None], det["boxes"][order], 0.0)
    masks = ops.paste_masks_in_image(det["masks"][order], boxes, height, width, 0.5)
    masks = masks & valid[:, None, None]
    levels, _ = hierarchy_levels_padded(masks, valid, coverage)
    num_kept = jnp.sum(keep.astype(jnp.int32))
    return {
        "boxes": boxes,
        "masks": masks,
        "levels": jnp.where(valid, levels, 0).astype(jnp.int32),
        "valid": valid,
        "num_kept": num_kept,
        "num_dropped": num_kept - jnp.sum(valid.astype(jnp.int32)),
    }


# ----------------------------------------------------------------------------------------------
# The step.


@flax.struct.dataclass
class MTState:
    """Student (params, batch_stats, opt_state) and the EMA teacher, one pytree."""

    step: jnp.ndarray
    params: dict
    batch_stats: dict
    opt_state: optax.OptState
    teacher_params: dict
    teacher_batch_stats: dict


def init_mt_state(variables, tx):
    """Student = teacher = `variables` ({"params", "batch_stats"}); a fresh optimizer."""
    params = jax.tree_util.tree_map(jnp.asarray, variables["params"])
    stats = jax.tree_util.tree_map(jnp.asarray, variables["batch_stats"])
    return MTState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        batch_stats=stats,
        opt_state=tx.init(params),
        teacher_params=jax.tree_util.tree_map(jnp.copy, params),
        teacher_batch_stats=jax.tree_util.tree_map(jnp.copy, stats),
    )


def _images(batch, key):
    x = batch[key]
    if x.dtype == jnp.uint8:
        x = loader.normalize_padded(x, batch["image_sizes"])
    return x


def _gt(batch, width):
    masks = batch["masks"]
    if masks.dtype == jnp.uint8:  # bit-packed by the loader
        masks = loader.unpack_masks(masks, width)
    return {"boxes": batch["boxes"], "masks": masks, "levels": batch["levels"],
            "valid": batch["valid"]}


def _pairs(a, b):
    """(B, ...) and (B, ...) -> (2B, ...) ordered a0, b0, a1, b1, ...: image i's two views
    stay on the device that holds image i (a concatenation along the batch axis, which is
    sharded, would move half of the batch between devices every step). Batch statistics and
    the batch-averaged losses do not depend on the order."""
    return jnp.stack([a, b], axis=1).reshape((-1,) + a.shape[1:])


def make_mt_step(model, tx, schedule, *, total_steps, ema_keep=EMA_KEEP,
                 score_thresh=SCORE_THRESH, coverage=COVERAGE, max_targets=-1,
                 sup_weight=1.0, unsup_weight=2.0, unsup=True, loss_weights="adaptive"):
    """(state, label_batch, unlabel_batch, rng) -> (state, metrics).

    Each batch as the loader emits it, with the weak view in "images" and the strong view
    (same geometry) in "images_strong"; the unlabel batch's own instances are not used.
    `unsup=False` leaves the unlabeled branch out (an ablation: plain continued training on
    the same label data, views and schedule; the teacher forward and the student's unlabel
    forward are not computed, so the step costs about half). The student's update is the one
    the branch weighted 0 gives; its running batch statistics see the label views only, and
    the teacher stays the EMA of the student. The unsup/* and teacher/* metrics are logged
    as 0. `loss_weights='constant'` holds w_sup = sup_weight and
    w_unsup = unsup_weight at every step (the paper's "+ Mean Teacher" ablation row, a Mean
    Teacher without adaptive targets); 'adaptive' is the recipe's cosine schedule.
    """
    schedules.mean_teacher_loss_weights(loss_weights, 0, total_steps)  # refuses an unknown kind now
    use_unsup = bool(unsup)

    def teacher_fn(state, unlabel):
        """Steps 1-3: (EMA teacher, its targets or None, its new batch statistics)."""
        t = state.step
        # 1. EMA at the start of the step (a copy at step 0).
        teacher = ema_update(
            {"params": state.teacher_params, "batch_stats": state.teacher_batch_stats},
            {"params": state.params, "batch_stats": state.batch_stats},
            t,
            ema_keep,
        )
        # 2. The teacher on the weak unlabel views: training-mode BN and RPN, test ROI path.
        if use_unsup:
            weak_u = _images(unlabel, "images")
            det, t_vars = model.apply(
                teacher, weak_u, train=True, losses=False, image_sizes=unlabel["image_sizes"],
                mutable=["batch_stats"],
            )
            det = jax.lax.stop_gradient(det)
            hp, wp = weak_u.shape[1:3]
            # 3. Targets.
            tg = jax.vmap(
                lambda d: teacher_targets(d, hp, wp, score_thresh=score_thresh,
                                          coverage=coverage, max_targets=max_targets)
            )(det)
            teacher_stats = t_vars["batch_stats"]
        else:
            tg, teacher_stats = None, teacher["batch_stats"]
        return teacher, tg, teacher_stats

    def student_fn(state, teacher, tg, teacher_stats, label, unlabel, rng):
        """Steps 4-5 given the teacher's part: (new state, metrics)."""
        t = state.step
        key = jax.random.fold_in(rng, t)
        k_sup, k_unsup = jax.random.split(key)
        # 4. Student: supervised on strong + weak label views, unsupervised on strong unlabel.
        sup_x = _pairs(_images(label, "images_strong"), _images(label, "images"))
        gt = _gt(label, label["images"].shape[2])
        sup_t = jax.tree_util.tree_map(lambda a: _pairs(a, a), gt)
        sup_sizes = _pairs(label["image_sizes"], label["image_sizes"])
        w_sup, w_unsup = schedules.mean_teacher_loss_weights(
            loss_weights, t, total_steps, sup_weight, unsup_weight
        )
        if not use_unsup:
            w_unsup = jnp.zeros_like(w_unsup)

        def loss_fn(params):
            sup, v1 = model.apply(
                {"params": params, "batch_stats": state.batch_stats}, sup_x, sup_t, train=True,
                rng=k_sup, image_sizes=sup_sizes, mutable=["batch_stats"],
            )
            if not use_unsup:
                unsup = {k: jnp.zeros_like(v) for k, v in sup.items()}
                return w_sup * sum(sup.values()), (sup, unsup, v1["batch_stats"])
            unsup, v2 = model.apply(
                {"params": params, "batch_stats": v1["batch_stats"]},
                _images(unlabel, "images_strong"),
                {k: tg[k] for k in ("boxes", "masks", "levels", "valid")},
                train=True, rng=k_unsup, image_sizes=unlabel["image_sizes"],
                mutable=["batch_stats"],
            )
            # The original weights the unlabeled mask loss 0 (it is logged, not trained).
            total = w_sup * sum(sup.values()) + w_unsup * sum(
                v for k, v in unsup.items() if k != "mask"
            )
            return total, (sup, unsup, v2["batch_stats"])

        (total, (sup, unsup, stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            state.params
        )
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        zero = jnp.zeros((), jnp.float32)
        metrics = {
            **{f"sup/{k}": v for k, v in sup.items()},
            **{f"unsup/{k}": v for k, v in unsup.items()},
            "total_loss": total,
            "w_sup": w_sup,
            "w_unsup": w_unsup,
            "lr": schedule(t),
            "teacher/targets_per_image": (
                jnp.mean(jnp.sum(tg["valid"], axis=1)) if use_unsup else zero),
            "teacher/kept_per_image": (
                jnp.mean(tg["num_kept"].astype(jnp.float32)) if use_unsup else zero),
            # Kept detections a `max_targets` cap left out (0 without a cap).
            "teacher/dropped_per_image": (
                jnp.mean(tg["num_dropped"].astype(jnp.float32)) if use_unsup else zero),
            "teacher/capped_images": (
                jnp.mean((tg["num_dropped"] > 0).astype(jnp.float32)) if use_unsup else zero),
        }
        new = MTState(
            step=t + 1, params=params, batch_stats=stats, opt_state=opt_state,
            teacher_params=teacher["params"], teacher_batch_stats=teacher_stats,
        )
        return new, metrics

    def step_fn(state, label, unlabel, rng):
        return student_fn(state, *teacher_fn(state, unlabel), label, unlabel, rng)

    # The two parts, for tests that compare layouts given the same teacher targets (the RPN's
    # anchor matching is discontinuous in the target boxes: float32 rounding of a box can flip
    # an anchor's label).
    step_fn.teacher, step_fn.student = teacher_fn, student_fn
    return step_fn


# ----------------------------------------------------------------------------------------------
# For the run (`modes/mean_teacher.py`): the batches on the mesh, the teacher's view.

_KEYS = ("images", "images_strong", "image_sizes", "boxes", "masks", "levels", "valid")


def _shard(batch, sharding):
    return {
        k: jax.make_array_from_process_local_data(sharding, np.asarray(batch[k])) for k in _KEYS
    }


class TeacherView:
    """The teacher's variables where `loop.evaluate_state` reads a state's."""

    def __init__(self, state):
        self.params, self.batch_stats = state.teacher_params, state.teacher_batch_stats
