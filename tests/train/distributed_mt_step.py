"""Two Mean Teacher steps of the small detector, as one of N `jax.distributed` processes (or
alone).

    python tests/train/distributed_mt_step.py INIT TRAIN_JSON IMAGES OUT.npz \
        [--coordinator HOST:PORT --num-processes N --process-id I]

Built the way `modes.mean_teacher.train` builds its run: the model and its starting variables from
the checkpoint INIT (`modes.mean_teacher.build_model`), the optimizer (`make_optimizer`), the two
loader streams "label" (seed) and "unlabel" (seed + 1) with strong views, each process reading
only its host shard (`process_index` / `process_count`), the host batches made global arrays
over every device of every process (`mean_teacher._shard`), and the jitted step with the
state replicated, both batches sharded on "data" and the state donated. Two steps, so the
second one's EMA mixes student into teacher (step 0's is a copy).

Process 0 writes both steps' metrics, the student's parameter update over the two steps, its
momentum trace and new batch statistics, the teacher's parameters and batch statistics to
OUT.npz; every process writes the image ids it read. Used by test_distributed_mt.py; set
XLA_FLAGS to choose the number of CPU devices per process before starting it.
"""

import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

GLOBAL_BATCH = 4  # label and unlabel each, over all processes
STEPS = 2


def config(init, train_json, images):
    from hassod_jax import defaults

    c = defaults.mean_teacher()
    c.init_checkpoint, c.train_json, c.images = init, train_json, images
    c.model.pooler_sampling_ratio = 2
    c.model.rpn_pre_nms_topk_train = 64
    c.model.rpn_post_nms_topk_train = 32
    c.model.roi_batch_size_per_image = 16
    c.model.detections_per_image = 16
    c.model.mask_max_fg = 4
    c.score_thresh = 0.0  # an untrained teacher: let its detections through
    c.max_targets = 6
    c.batch_size_label = GLOBAL_BATCH
    c.batch_size_unlabel = GLOBAL_BATCH
    c.max_iter = 10
    c.warmup_iters = 2
    c.data.short_edges = (64,)
    c.data.max_size = 96
    c.data.buckets = ((64, 96), (96, 64), (64, 64))
    c.data.max_instances = 6
    c.data.workers = 0
    return c


def main():
    p = argparse.ArgumentParser()
    p.add_argument("init")
    p.add_argument("train_json")
    p.add_argument("images")
    p.add_argument("out")
    p.add_argument("--coordinator", default=None)
    p.add_argument("--num-processes", type=int, default=1)
    p.add_argument("--process-id", type=int, default=0)
    a = p.parse_args()

    import jax

    if a.num_processes > 1:
        # CPU collectives across processes go through gloo.
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    from jax.sharding import NamedSharding, PartitionSpec

    from hassod_jax import parallel
    from hassod_jax.data import loader
    from hassod_jax.modes import mean_teacher as mt_mode
    from hassod_jax.train import mean_teacher as MT

    if a.num_processes > 1:
        assert parallel.maybe_initialize_distributed(a.coordinator, a.num_processes, a.process_id)
    c = config(a.init, a.train_json, a.images)
    mesh = parallel.global_mesh()
    data = NamedSharding(mesh, PartitionSpec("data"))
    replicated = NamedSharding(mesh, PartitionSpec())
    model, variables = mt_mode.build_model(c)
    tx, schedule = mt_mode.make_optimizer(c)
    state = jax.device_put(MT.init_mt_state(variables, tx), replicated)
    init_params = jax.tree_util.tree_map(np.asarray, variables["params"])
    records = loader.open_records(train_json=c.train_json, images=c.images)
    iters = {
        name: loader.make_train_iterator(
            records, mt_mode._loader_config(c, GLOBAL_BATCH, seed), num_steps=STEPS,
            process_index=jax.process_index(), process_count=jax.process_count(),
        )
        for name, seed in (("label", c.seed), ("unlabel", c.seed + 1))
    }
    step = jax.jit(
        MT.make_mt_step(
            model, tx, schedule, total_steps=c.max_iter, ema_keep=c.ema_keep,
            score_thresh=c.score_thresh, coverage=c.coverage, max_targets=c.max_targets,
            sup_weight=c.sup_weight, unsup_weight=c.unsup_weight,
        ),
        in_shardings=(replicated, data, data, replicated),
        out_shardings=(replicated, replicated),
        donate_argnums=(0,),
    )
    rng = jax.random.PRNGKey(c.seed)
    out, ids = {}, {"label": [], "unlabel": []}
    batches = []
    for _ in range(STEPS):
        label, unlabel = next(iters["label"]), next(iters["unlabel"])
        for name, b in (("label", label), ("unlabel", unlabel)):
            assert b["images"].shape[0] == GLOBAL_BATCH // jax.process_count()
            assert b["images_strong"].shape == b["images"].shape
            ids[name].append(np.asarray(b["image_ids"]))
        batches.append((MT._shard(label, data), MT._shard(unlabel, data)))
    # Compile first, then wait for every process: gloo sets up its connections at the first
    # collective and gives up after a fixed, short timeout, while compile times differ between
    # processes by minutes on a loaded machine. The barrier is the coordination service's
    # (jax.distributed's own client, as JAX's multi-process tests and orbax use), whose timeout
    # is ours to set.
    compiled = step.lower(state, *batches[0], rng).compile()
    if a.num_processes > 1:
        from jax._src import distributed

        distributed.global_state.client.wait_at_barrier("mt_step_compiled", 30 * 60 * 1000)
    for k, (label, unlabel) in enumerate(batches):
        state, metrics = compiled(state, label, unlabel, rng)
        # Fully replicated global arrays: every process holds the whole value.
        out.update({f"step{k}:{name}": np.asarray(v) for name, v in metrics.items()})
    delta = jax.tree_util.tree_map(lambda n, o: np.asarray(n) - o, state.params, init_params)
    trees = (("delta", delta), ("params", state.params), ("stats", state.batch_stats),
             ("teacher", state.teacher_params), ("teacher_stats", state.teacher_batch_stats))
    for prefix, tree in trees:
        for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
            out[f"{prefix}:{jax.tree_util.keystr(path)}"] = np.asarray(leaf)
    # The momentum trace (the step count is left out): the gradients' running sum.
    for path, leaf in jax.tree_util.tree_leaves_with_path(state.opt_state):
        if np.ndim(leaf):
            out[f"trace:{jax.tree_util.keystr(path)}"] = np.asarray(leaf)
    for name, v in ids.items():
        out[f"ids:{name}"] = np.stack(v)  # (STEPS, local batch)
    if jax.process_index() == 0:
        np.savez(a.out, **out)
    else:
        np.savez(a.out + f".process{jax.process_index()}.npz",
                 **{k: v for k, v in out.items() if k.startswith("ids:")})
    if a.num_processes > 1:
        jax.distributed.shutdown()


if __name__ == "__main__":
    main()
