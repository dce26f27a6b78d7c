"""mode=mean_teacher: HASSOD's Mean Teacher self-training (docs/recipe.md, Mean Teacher), the
step of `train/mean_teacher.py` run by `train/loop.py` from a stage-2.2 checkpoint; the model it
produces is the student (`W/checkpoints`, read by `load_detector(W)`, and `W/model_final`).
"""

import os

import jax
from absl import logging
from jax.sharding import NamedSharding, PartitionSpec

from hassod_jax import parallel, utils
from hassod_jax.data import loader
from hassod_jax.modes import train as train_mode
from hassod_jax.train import loop, optim, schedules
from hassod_jax.train.mean_teacher import TeacherView, _shard, init_mt_state, make_mt_step
from hassod_jax.weights.detectron2 import export_detector, load_detector


def build_model(config):
    """The student/teacher architecture from `config.init_checkpoint` (widths from its shapes),
    with config.model's overrides (DropLoss off, as the original's MT config), and the variables
    both start from. The rest is the recipe's, not the stage-2.2 run's stored config: the
    original's Mean Teacher config file describes its model whole."""
    dtype = utils.compute_dtype(config.dtype)
    module, variables = load_detector(
        config.init_checkpoint, which=config.init_which, saved_config=False,
        **train_mode.model_overrides(config.model),
    )
    return module.clone(dtype=dtype), variables


def make_optimizer(config):
    sched = schedules.cosine_with_warmup(
        config.base_lr,
        config.max_iter,
        warmup_iters=config.warmup_iters,
        warmup_factor=config.warmup_factor,
    )
    tx = optim.sgd(
        sched, momentum=config.momentum, weight_decay=config.weight_decay,
        clip_norm=config.clip_norm,
    )
    return tx, sched


def _loader_config(config, batch_size, seed):
    return train_mode.loader_config(
        config, global_batch_size=batch_size, seed=seed, copy_paste=False, strong_views=True
    )


def jit_mt_step(config, model, tx, schedule, mesh):
    """The Mean Teacher step as `train` runs it: config's recipe values, jitted over `mesh`
    with both batches sharded along its `data` axis, the state and the rng replicated, the
    state donated (experiments/aot.py compiles the same function for TPU topologies)."""
    data = NamedSharding(mesh, PartitionSpec("data"))
    replicated = NamedSharding(mesh, PartitionSpec())
    return jax.jit(
        make_mt_step(
            model, tx, schedule, total_steps=config.max_iter, ema_keep=config.ema_keep,
            score_thresh=config.score_thresh, coverage=config.coverage,
            max_targets=config.max_targets, sup_weight=config.sup_weight,
            unsup_weight=config.unsup_weight, unsup=bool(config.get("unsup", True)),
            loss_weights=config.get("loss_weights", "adaptive"),
        ),
        in_shardings=(replicated, data, data, replicated),
        out_shardings=(replicated, replicated),
        donate_argnums=(0,),
    )


def make_streams(config, records, start=0):
    """{"label": iterator[, "unlabel": iterator]} from step `start`.

    "label" and "unlabel" read the same pseudo-label records (images without any dropped)
    through two independent samplers (seeds `config.seed` and `config.seed + 1`), as the
    original's two TrainingSamplers; the iterators are step-indexed, so resuming at `start`
    continues both exactly. With the unlabeled branch left out (`unsup=False`) there is no
    "unlabel" stream.
    """
    streams = [("label", config.batch_size_label, config.seed)]
    if config.get("unsup", True):
        streams.append(("unlabel", config.batch_size_unlabel, config.seed + 1))
    return {
        name: loader.make_train_iterator(
            records, _loader_config(config, bs, seed), num_steps=config.max_iter,
            start_step=start, worker_count=config.data.workers,
            process_index=jax.process_index(), process_count=jax.process_count(),
        )
        for name, bs, seed in streams
    }


def train(config, workdir):
    """Runs (or resumes) Mean Teacher; returns the final state and the last logged metrics.
    The student is the model the run produces (`W/checkpoints`, read by `load_detector(W)`,
    and the exported `W/model_final`)."""
    parallel.maybe_initialize_distributed()
    utils.require(config, "init_checkpoint", "train_json", "images", mode=config.mode)
    val = train_mode.validation(config)
    eval_on = val is not None
    for name in ("init_checkpoint", "train_json", "images"):
        if not os.path.exists(config.get(name)):
            raise FileNotFoundError(f"config.{name} does not exist: {config.get(name)}")
    try:  # the schedule's own check of the kind, as a config error
        schedules.mean_teacher_loss_weights(config.get("loss_weights", "adaptive"), 0, 1)
    except ValueError as e:
        raise utils.ConfigError(f"config.{e}") from None
    mesh = parallel.global_mesh()
    n_dev = mesh.devices.size
    for name in ("batch_size_label", "batch_size_unlabel"):
        if config.get(name) < 1 or config.get(name) % n_dev:
            raise utils.ConfigError(
                f"config.{name}={config.get(name)} must be a positive multiple of the {n_dev} "
                "devices"
            )
    if config.max_targets == 0 or config.max_targets < -1:
        raise utils.ConfigError(
            f"config.max_targets={config.max_targets} must be -1 (a slot per teacher detection) "
            "or a positive number of target slots"
        )
    data = NamedSharding(mesh, PartitionSpec("data"))
    replicated = NamedSharding(mesh, PartitionSpec())

    model, variables = build_model(config)
    tx, schedule = make_optimizer(config)
    state = jax.device_put(init_mt_state(variables, tx), replicated)
    checkpointer, state, _, start = loop.restore(
        workdir, state, replicated, config.keep_checkpoints, model.config
    )

    records = loader.open_records(train_json=config.train_json, images=config.images)
    use_unsup = bool(config.get("unsup", True))
    iters = make_streams(config, records, start)
    step_fn = jit_mt_step(config, model, tx, schedule, mesh)
    rng = jax.random.PRNGKey(config.seed)
    writer = loop.make_writer(workdir)
    loop.log_parameters(state.params)
    predict_fn = loop.eval_predict_fn(model, eval_on)

    def step(state, i):
        label = _shard(next(iters["label"]), data)
        unlabel = _shard(next(iters["unlabel"]), data) if use_unsup else label  # unread
        return step_fn(state, label, unlabel, rng)

    def describe(h):
        return (
            f"loss {h['total_loss']:.4f} (w_sup {h['w_sup']:.3f}, w_unsup {h['w_unsup']:.3f}), "
            f"lr {h['lr']:.5f}, {h['teacher/targets_per_image']:.1f} teacher targets/image"
        )

    def evaluate(state):
        out = loop.evaluate_state(val, model, state, predict_fn)
        tval = loop.evaluate_state(val, model, TeacherView(state), predict_fn)
        out.update({k.replace("val/", "val_teacher/", 1): v for k, v in tval.items()})
        return out

    state, metrics = loop.run(
        state,
        step,
        start=start,
        max_iter=config.max_iter,
        checkpointer=checkpointer,
        writer=writer,
        images_per_step=config.batch_size_label
        + (config.batch_size_unlabel if use_unsup else 0),
        log_every=config.log_every,
        checkpoint_every=config.checkpoint_every,
        describe=describe,
        data_state=lambda: {k: it.get_state() for k, it in iters.items()},
        eval_every=config.get("eval_every", 0),
        evaluate=evaluate if eval_on else None,
        close=tuple(iters.values()),
    )
    if jax.process_index() == 0 and int(state.step) == config.max_iter:
        final = os.path.join(workdir, "model_final")
        student = jax.device_get({"params": state.params, "batch_stats": state.batch_stats})
        export_detector(final, student, model.config, source="mean_teacher student")
        logging.info("The student (the model Mean Teacher produces) is in %s", final)
    return state, metrics


def run(config, workdir):
    """mode=mean_teacher."""
    train(config, workdir)
