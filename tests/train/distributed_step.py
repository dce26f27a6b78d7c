"""One training step of the small detector, as one of N `jax.distributed` processes (or alone).

    python tests/train/distributed_step.py TRAIN_JSON IMAGES OUT.npz \
        [--coordinator HOST:PORT --num-processes N --process-id I]

Each process reads only its host shard of global batch 0 (`loader` with process_index /
process_count), the batch becomes one global array sharded over every device of every
process, and the jitted step runs over that global mesh (`supervised.make_train_step`,
exactly as `modes.train.train` builds it). Process 0 writes the step's losses, the parameter
updates and the new batch statistics to OUT.npz. Used by test_distributed.py; set XLA_FLAGS to
choose the number of CPU devices per process before starting it.
"""

import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

GLOBAL_BATCH = 4


def config(train_json, images):
    from hassod_jax import defaults

    c = defaults.training()
    c.train_json, c.images = train_json, images
    c.model.size = "small"
    c.model.pooler_sampling_ratio = 2
    c.model.rpn_pre_nms_topk_train = 64
    c.model.rpn_post_nms_topk_train = 32
    c.model.roi_batch_size_per_image = 16
    c.model.mask_max_fg = 4
    c.dtype = "float32"
    c.batch_size = GLOBAL_BATCH
    c.base_lr = 0.01
    c.warmup_iters = 0
    c.data.short_edges = (64,)
    c.data.max_size = 96
    c.data.buckets = ((64, 96), (96, 64), (64, 64))
    c.data.max_instances = 6
    # Copy-paste pairs examples within each host's local batch (as CutLER does per GPU), so
    # its targets depend on the host count by design; it is off to compare the step itself.
    c.data.copy_paste = False
    c.data.workers = 0
    return c


def main():
    p = argparse.ArgumentParser()
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
    from hassod_jax.modes import train as train_mode
    from hassod_jax.train import supervised

    if a.num_processes > 1:
        assert parallel.maybe_initialize_distributed(a.coordinator, a.num_processes, a.process_id)
    c = config(a.train_json, a.images)
    mesh = parallel.global_mesh()
    data_sharding = NamedSharding(mesh, PartitionSpec("data"))
    replicated = NamedSharding(mesh, PartitionSpec())
    model = train_mode.build_model(c)
    tx, schedule = train_mode.make_optimizer(c)
    init_rng, step_rng = jax.random.split(jax.random.PRNGKey(c.seed))
    state = jax.device_put(supervised.init_state(model, tx, init_rng), replicated)
    records = loader.open_records(train_json=c.train_json, images=c.images)
    it = loader.make_train_iterator(
        records,
        train_mode.loader_config(c),
        num_steps=1,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
    )
    init_params = jax.tree_util.tree_map(np.asarray, state.params)
    batch = next(it)
    assert batch["images"].shape[0] == GLOBAL_BATCH // jax.process_count()
    step = jax.jit(
        supervised.make_train_step(model, tx, schedule),
        in_shardings=(replicated, data_sharding, replicated),
        out_shardings=(replicated, replicated),
    )
    new_state, metrics = step(state, supervised.shard_batch(batch, data_sharding), step_rng)
    # Fully replicated global arrays: every process holds the whole value.
    out = {f"loss:{k}": np.asarray(v) for k, v in metrics.items()}
    # The parameter update (new - initial) is compared, not the parameters: the update is
    # what the gradient computation decides, and its rounding is not hidden by the weights.
    delta = jax.tree_util.tree_map(lambda n, o: np.asarray(n) - o, new_state.params, init_params)
    trees = (("delta", delta), ("params", new_state.params), ("stats", new_state.batch_stats))
    for prefix, tree in trees:
        for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
            out[f"{prefix}:{jax.tree_util.keystr(path)}"] = np.asarray(leaf)
    out["image_ids"] = np.asarray(batch["image_ids"])
    if jax.process_index() == 0:
        np.savez(a.out, **out)
    else:
        np.savez(a.out + f".process{jax.process_index()}.npz", image_ids=out["image_ids"])
    if a.num_processes > 1:
        jax.distributed.shutdown()


if __name__ == "__main__":
    main()
