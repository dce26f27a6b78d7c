"""The loop both stage-2 trainers run (`run`: steps, logging with throughput and ETA, the NaN
guard, the between-steps job, checkpoints, periodic evaluation) and what it is made of: resuming
(`restore`), the metric writer, the evaluation of a state on the validation set."""

import dataclasses
import os
import time

import jax
import numpy as np
from absl import logging

from hassod_jax import utils
from hassod_jax.data import loader
from hassod_jax.data.coco import load_coco_json
from hassod_jax.evaluate import coco_eval, level_accuracy
from hassod_jax.inference import predictor
from hassod_jax.train import checkpoint as ckpt_lib


@dataclasses.dataclass(frozen=True)
class Validation:
    """The validation set periodic evaluation reads and its test-time settings: a COCO JSON,
    its image folder, how many of its images (-1: all), detectron2's ResizeShortestEdge
    (short_edge, max_size), images per device call and the padded shapes (buckets)."""

    json: str
    images: str
    max_images: int = -1
    short_edge: int = 800
    max_size: int = 1333
    batch_size: int = 1
    buckets: tuple = loader.DEFAULT_BUCKETS


def evaluate_state(validation, model, state, predict_fn=None):
    """Class-agnostic COCO metrics of `state` on the `Validation` set.

    Returns a flat {name: float} dict: val/{bbox,segm}/{AP, AP50, AR@100} by the original
    HASSOD's protocol (`evaluate_coco`'s default: maxDets 10/100/1000, AP and AP50 at 1000
    detections per image), val/level_accuracy (-1 when no detection is foreground),
    val/num_predictions, val/seconds.
    """
    t0 = time.perf_counter()
    # A host copy: the replicated global arrays may span other processes' devices, while
    # inference runs on this process's default device only.
    variables = jax.device_get({"params": state.params, "batch_stats": state.batch_stats})
    val = load_coco_json(validation.json)  # read once: image list and ground truth
    images = predictor.images_from_coco(val, validation.images, validation.max_images)
    preds = predictor.predict(
        model,
        variables,
        images,
        short_edge=validation.short_edge,
        max_size=validation.max_size,
        buckets=validation.buckets,
        batch_size=validation.batch_size,
        predict_fn=predict_fn,
    )
    ids = {image_id for _, image_id in images}
    gt = _subset_gt(val, ids)
    metrics = coco_eval.evaluate_coco(gt, preds, iou_types=("bbox", "segm"))
    out = {}
    for t in ("bbox", "segm"):
        for k in ("AP", "AP50", "AR@100"):
            if k in metrics[t]:
                out[f"val/{t}/{k}"] = float(metrics[t][k])
    out["val/level_accuracy"], _ = level_accuracy.level_accuracy(gt, preds)
    out["val/num_predictions"] = float(len(preds))
    out["val/seconds"] = time.perf_counter() - t0
    return out


def _subset_gt(data, image_ids):
    """The ground truth (a loaded COCO dict) restricted to the evaluated images."""
    if len(image_ids) == len(data["images"]):
        return data
    return {
        **data,
        "images": [im for im in data["images"] if im["id"] in image_ids],
        "annotations": [a for a in data["annotations"] if a["image_id"] in image_ids],
    }


def host_metrics(metrics, done, checkpointer, last_good):
    """The step's metrics as Python floats; a non-finite total loss stops the run with an
    error naming the last good checkpoint (none is written after it)."""
    host = {k: float(v) for k, v in jax.device_get(metrics).items()}
    if not np.isfinite(host["total_loss"]):
        bad = {k: v for k, v in host.items() if not np.isfinite(v)}
        where = f"step {last_good} in {checkpointer.directory}" if last_good else "none yet"
        raise FloatingPointError(
            f"Non-finite loss at step {done}: {bad}. Stopping; last good checkpoint: {where}"
        )
    return host


def log_parameters(params):
    """clu's parameter overview (names, shapes, sizes, statistics) in the log, process 0."""
    if jax.process_index() == 0:
        from clu import parameter_overview

        logging.info("Parameters:\n%s", parameter_overview.get_parameter_overview(params))


def eta_text(done, start, total, seconds):
    """'ETA 1h02m' from the steps done since `start` in `seconds`."""
    if done <= start or seconds <= 0:
        return "ETA ?"
    left = (total - done) * seconds / (done - start)
    h, rem = divmod(int(left), 3600)
    return f"ETA {h}h{rem // 60:02d}m" if h else f"ETA {rem // 60}m{rem % 60:02d}s"


# ----------------------------------------------------------------------------------------------
# The loop both trainers run.


def restore(workdir, state, sharding, keep, model_config=None):
    """The run's checkpointer (W/checkpoints, the newest `keep` kept; each step stores
    `model_config`, the detector's DetectorConfig) and the state resumed from its newest
    checkpoint (or `state` as given), placed with `sharding`.

    Returns (checkpointer, state, data_state, start): data_state is what the checkpoint holds
    beside the state (None without one), start the step to run next."""
    checkpointer = ckpt_lib.Checkpointer(
        os.path.join(workdir, "checkpoints"), max_to_keep=keep, model_config=model_config
    )
    state, data_state = checkpointer.restore(state)
    start = int(state.step)
    if start:
        logging.info("Resuming at step %d", start)
    return checkpointer, jax.device_put(state, sharding), data_state, start


def make_writer(workdir):
    """W/logs' metric writer on process 0, None elsewhere."""
    return utils.MetricWriter(os.path.join(workdir, "logs")) if jax.process_index() == 0 else None


def eval_predict_fn(model, eval_on):
    """The compiled forward the periodic evaluation reuses (process 0, evaluation on), else None."""
    if not (eval_on and jax.process_index() == 0):
        return None
    return predictor.make_predict_fn(model)


def run(
    state,
    step,
    *,
    start,
    max_iter,
    checkpointer,
    writer,
    images_per_step,
    log_every,
    checkpoint_every,
    describe,
    data_state,
    after_step=None,
    eval_every=0,
    evaluate=None,
    close=(),
):
    """Runs steps start .. max_iter - 1 and returns (state, the last metrics).

    step(state, i) -> (state, metrics): step i, reading its own batches; metrics stay on the
        device except at the steps that log or save.
    describe(host metrics) -> the middle of the log line ("loss 0.1234, lr 0.00100", ...).
    after_step(state, done) -> (state, ran): a job between the step and the checkpoint
        (PreciseBN, detectron2's hook order); the throughput restarts when it ran.
    data_state() -> what the checkpoint stores beside the state (the iterators' positions).
    evaluate(state) -> {name: float}, on process 0 every eval_every steps and at the last
        (eval_every 0: never); logged and written, and the throughput restarts after it.

    At the log and save steps the metrics come to the host, where a non-finite total loss stops
    the run naming the last good checkpoint; every log_every steps (and at the end) they are
    written with images_per_s and logged with the ETA. A checkpoint every checkpoint_every steps
    and at the end. The checkpointer, the writer and the iterators in `close` are closed however
    the loop ends.
    """
    last_good = checkpointer.latest_step()
    metrics, t0, n_images = {}, time.perf_counter(), 0
    t_start = t0
    try:
        for i in range(start, max_iter):
            state, metrics = step(state, i)
            n_images += images_per_step
            done = i + 1
            log_now = done % log_every == 0 or done == max_iter
            save_now = done % checkpoint_every == 0 or done == max_iter
            if log_now or save_now:
                host = host_metrics(metrics, done, checkpointer, last_good)
                host["images_per_s"] = n_images / max(time.perf_counter() - t0, 1e-9)
                t0, n_images = time.perf_counter(), 0
                metrics = host
                if writer is not None and log_now:
                    writer.write_scalars(done, host)
                    logging.info(
                        "step %d/%d: %s, %.1f images/s, %s",
                        done,
                        max_iter,
                        describe(host),
                        host["images_per_s"],
                        eta_text(done, start, max_iter, time.perf_counter() - t_start),
                    )
            if after_step is not None:
                state, ran = after_step(state, done)
                if ran:
                    t0, n_images = time.perf_counter(), 0  # throughput excludes it
            if save_now:
                checkpointer.save(done, state, data_state())
                last_good = done
            if evaluate is not None and eval_every and (done % eval_every == 0 or done == max_iter):
                if jax.process_index() == 0:
                    val = evaluate(state)
                    metrics = {**metrics, **val}
                    writer.write_scalars(done, val)
                    logging.info(
                        "step %d: %s", done, ", ".join(f"{k} {v:.4f}" for k, v in val.items())
                    )
                # Training throughput excludes evaluation.
                t0, n_images = time.perf_counter(), 0
    finally:
        checkpointer.close()
        if writer is not None:
            writer.close()
        for it in close:
            if hasattr(it, "close"):
                it.close()
    return state, metrics
