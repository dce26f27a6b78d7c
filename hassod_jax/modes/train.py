"""mode=train: the Cascade Mask R-CNN on stage-1 pseudo-labels (docs/recipe.md, Stage 2), the
step of `train/supervised.py` run by `train/loop.py`.

Checkpoints (orbax) hold the whole state, the data iterator's position and the model's config;
a rerun resumes from the newest. A non-finite loss stops the run and names the last good
checkpoint.

Periodic evaluation (`config.val_json` and `config.val_images` set, every `config.eval_every`
steps and at the end): process 0 runs `inference.predictor.predict` with a host copy of the
current params and batch statistics on the validation images and `evaluate_coco` on the
results, and logs `val/{bbox,segm}/{AP,AP50,AR@100}` and `val/level_accuracy` (the level head's
accuracy on detections whose box overlaps a ground-truth instance with IoU >= 0.5, against
that instance's `hier_level`). Evaluation reads the state only, so it does not change the
training trajectory.

PreciseBN (`config.precise_bn`, `train/precise_bn.py`): every `config.precise_bn_every` steps
and at the last step, after the step and before the checkpoint and the evaluation (detectron2's
hook order), the batch-norm running statistics are recomputed over `config.precise_bn_iters`
training batches from a separate loader seeded by (seed, step); params and the training
iterator are untouched, so a resumed run recomputes the same statistics.
"""

import dataclasses
import os

import jax
from absl import logging

from hassod_jax import parallel, utils
from hassod_jax.data import loader
from hassod_jax.models import detector
from hassod_jax.train import loop, optim, precise_bn, schedules
from hassod_jax.train.supervised import init_state, jit_train_step, shard_batch


def model_overrides(model_config):
    """The DetectorConfig fields `config.model` sets: every field but `size` that is not None
    (unset), with lists (what a JSON round trip makes of tuples) turned back into tuples."""
    return {
        k: tuple(v) if isinstance(v, list) else v
        for k, v in model_config.items()
        if k != "size" and v is not None
    }


def build_model(config, dtype=None):
    """The detector described by `config.model` (size 'r50' | 'small') and `config.dtype`
    (or `dtype`, e.g. PreciseBN's float32: the parameters are the same)."""
    base = {"r50": detector.DetectorConfig(), "small": detector.SMALL_CONFIG}.get(config.model.size)
    if base is None:
        raise utils.ConfigError(
            f"config.model.size must be 'r50' or 'small', got {config.model.size!r}"
        )
    cfg = dataclasses.replace(base, **model_overrides(config.model))
    # Only PreciseBN's model is built with a dtype of its own (config.precise_bn_dtype).
    dtype = utils.compute_dtype(dtype or config.dtype, "precise_bn_dtype" if dtype else "dtype")
    return detector.CascadeMaskRCNN(cfg, dtype=dtype)


def make_optimizer(config):
    sched = schedules.multistep_with_warmup(
        config.base_lr,
        steps=tuple(config.lr_steps),
        gamma=config.lr_gamma,
        warmup_iters=config.warmup_iters,
        warmup_factor=config.warmup_factor,
        max_iter=config.max_iter,
    )
    tx = optim.sgd(
        sched,
        momentum=config.momentum,
        weight_decay=config.weight_decay,
        clip_norm=config.clip_norm,
    )
    return tx, sched


def loader_config(config, **overrides):
    """LoaderConfig from config.data (+ batch size and seed); `overrides` replace fields."""
    d = config.data
    fields = dict(
        global_batch_size=config.get("batch_size", 1),
        seed=config.seed,
        short_edges=tuple(d.short_edges),
        max_size=d.max_size,
        flip_prob=d.flip_prob,
        copy_paste=d.copy_paste,
        copy_paste_rate=d.copy_paste_rate,
        copy_paste_min_ratio=d.copy_paste_min_ratio,
        copy_paste_max_ratio=d.copy_paste_max_ratio,
        buckets=tuple(tuple(b) for b in d.buckets) or loader.DEFAULT_BUCKETS,
        max_instances=d.max_instances,
        image_dtype="uint8",
        pack_masks=d.pack_masks,
    )
    return loader.LoaderConfig(**{**fields, **overrides})


def validation(config):
    """The run's `loop.Validation` when periodic evaluation is on (config.val_json and
    config.val_images both set, eval_every >= 1), else None; a ConfigError or
    FileNotFoundError for a half or missing setting."""
    val_json, val_images = config.get("val_json", ""), config.get("val_images", "")
    if bool(val_json) != bool(val_images):
        raise utils.ConfigError(
            "periodic evaluation needs both config.val_json and config.val_images "
            f"(got val_json={val_json!r}, val_images={val_images!r})"
        )
    for name in ("val_json", "val_images"):
        path = config.get(name, "")
        if path and not os.path.exists(path):
            raise FileNotFoundError(f"config.{name} does not exist: {path}")
    if not val_json:
        return None
    if config.get("eval_every", 0) < 1:
        raise utils.ConfigError(f"config.eval_every must be >= 1, got {config.eval_every}")
    return loop.Validation(
        json=val_json,
        images=val_images,
        max_images=config.val_max_images,
        short_edge=config.val_short_edge,
        max_size=config.val_max_size,
        batch_size=config.val_batch_size,
        buckets=tuple(tuple(b) for b in config.data.buckets) or loader.DEFAULT_BUCKETS,
    )


def check_precise_bn_config(config):
    """Validates the PreciseBN settings of a training config (no-op when it is off)."""
    if not config.get("precise_bn", False):
        return
    if int(config.get("precise_bn_iters", 200)) < 1:
        raise utils.ConfigError(
            f"config.precise_bn_iters must be >= 1, got {config.precise_bn_iters}"
        )
    if int(config.get("precise_bn_every", 5000)) < 0:
        raise utils.ConfigError(
            f"config.precise_bn_every must be >= 0 (0: only at the last step), got "
            f"{config.precise_bn_every}"
        )
    est = config.get("precise_bn_estimator", "population")
    if est not in precise_bn.ESTIMATORS:
        raise utils.ConfigError(
            f"config.precise_bn_estimator must be one of {precise_bn.ESTIMATORS}, got {est!r}"
        )


def train(config, workdir):
    """Runs (or resumes) training; returns the final state and the last logged metrics."""
    parallel.maybe_initialize_distributed()
    utils.require(config, "train_json", "images", mode=config.mode)
    val = validation(config)
    eval_on = val is not None
    check_precise_bn_config(config)
    for name in ("train_json", "images", "resnet_checkpoint"):
        path = config.get(name)
        if path and not os.path.exists(path):
            raise FileNotFoundError(f"config.{name} does not exist: {path}")
    if not config.resnet_checkpoint:
        logging.warning(
            "config.resnet_checkpoint is not set: the backbone starts from random weights"
        )
    mesh = parallel.global_mesh()
    n_dev = mesh.devices.size
    if config.batch_size % n_dev:
        raise utils.ConfigError(
            f"config.batch_size={config.batch_size} must be a multiple of the {n_dev} devices"
        )
    model = build_model(config)
    tx, schedule = make_optimizer(config)
    step_fn, data_sharding, replicated = jit_train_step(model, tx, schedule, mesh)
    rng = jax.random.PRNGKey(config.seed)
    init_rng, step_rng = jax.random.split(rng)
    state = init_state(model, tx, init_rng, config.resnet_checkpoint or None)
    state = jax.device_put(state, replicated)
    checkpointer, state, _, start = loop.restore(
        workdir, state, replicated, config.keep_checkpoints, model.config
    )

    records = loader.open_records(train_json=config.train_json, images=config.images)
    train_loader_config = loader_config(config)
    it = loader.make_train_iterator(
        records,
        train_loader_config,
        num_steps=config.max_iter,
        start_step=start,
        worker_count=config.data.workers,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
    )
    pbn = None
    if config.get("precise_bn", False):
        pbn = precise_bn.PreciseBN(
            build_model(config, dtype=config.get("precise_bn_dtype", "float32")),
            mesh,
            num_iters=config.precise_bn_iters,
            estimator=config.get("precise_bn_estimator", "population"),
        )
    writer = loop.make_writer(workdir)
    loop.log_parameters(state.params)
    predict_fn = loop.eval_predict_fn(model, eval_on)

    def step(state, i):
        return step_fn(state, shard_batch(next(it), data_sharding), step_rng)

    def after_step(state, done):
        if pbn is None or not precise_bn.runs_at(done, config.precise_bn_every, config.max_iter):
            return state, False
        state = precise_bn.run_for_step(
            pbn,
            state,
            records,
            train_loader_config,
            done,
            worker_count=config.data.workers,
            process_index=jax.process_index(),
            process_count=jax.process_count(),
        )
        return state, True

    return loop.run(
        state,
        step,
        start=start,
        max_iter=config.max_iter,
        checkpointer=checkpointer,
        writer=writer,
        images_per_step=config.batch_size,
        log_every=config.log_every,
        checkpoint_every=config.checkpoint_every,
        describe=lambda h: f"loss {h['total_loss']:.4f}, lr {h['lr']:.5f}",
        data_state=it.get_state,
        after_step=after_step,
        eval_every=config.get("eval_every", 0),
        evaluate=(lambda state: loop.evaluate_state(val, model, state, predict_fn))
        if eval_on
        else None,
        close=(it,),
    )


def run(config, workdir):
    """mode=train."""
    train(config, workdir)
