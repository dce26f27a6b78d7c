"""Stage 2's training step and state: the Cascade Mask R-CNN on stage-1 pseudo-labels
(docs/recipe.md, Stage 2); `modes/train.py` runs it.

One jitted step over a Mesh whose `data` axis spans every device of every process: the batch
is sharded along it, the train state is replicated, so batch-norm statistics computed inside
the step are the global (synchronised) ones. The state is donated.
"""

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from jax.sharding import NamedSharding, PartitionSpec

from hassod_jax.data import loader
from hassod_jax.weights.torch_resnet import load_resnet50


@flax.struct.dataclass
class TrainState:
    step: jnp.ndarray
    params: dict
    batch_stats: dict
    opt_state: optax.OptState


def init_state(model, tx, rng, resnet_checkpoint=None):
    """Random heads; the backbone from `resnet_checkpoint` (DINO ResNet-50) when given."""
    images = jnp.zeros((1, 64, 64, 3), jnp.float32)
    variables = jax.jit(lambda r: model.init(r, images, train=False))(rng)
    params, batch_stats = variables["params"], variables.get("batch_stats", {})
    if resnet_checkpoint:
        _, loaded = load_resnet50(resnet_checkpoint, config=model.config.resnet)
        params = _replace_subtree(params, "backbone", loaded["params"], resnet_checkpoint)
        batch_stats = _replace_subtree(
            batch_stats, "backbone", loaded["batch_stats"], resnet_checkpoint
        )
        logging.info("Backbone initialised from %s", resnet_checkpoint)
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        batch_stats=batch_stats,
        opt_state=tx.init(params),
    )


def _replace_subtree(tree, key, new, source):
    old_shapes = jax.tree_util.tree_map(np.shape, tree[key])
    new_shapes = jax.tree_util.tree_map(np.shape, new)
    if old_shapes != new_shapes:
        raise ValueError(
            f"{source}: the checkpoint's backbone does not fit config.model (shapes differ)"
        )
    return {**tree, key: jax.tree_util.tree_map(jnp.asarray, new)}


def make_train_step(model, tx, schedule):
    """(state, batch, rng) -> (state, metrics); batch arrays as the loader emits them."""
    def step_fn(state, batch, rng):
        images = batch["images"]
        if images.dtype == jnp.uint8:
            images = loader.normalize_padded(images, batch["image_sizes"])
        masks = batch["masks"]
        if masks.dtype == jnp.uint8:  # bit-packed by the loader
            masks = loader.unpack_masks(masks, images.shape[2])
        targets = {
            "boxes": batch["boxes"],
            "masks": masks,
            "levels": batch["levels"],
            "valid": batch["valid"],
        }
        key = jax.random.fold_in(rng, state.step)

        def loss_fn(params):
            losses, new_vars = model.apply(
                {"params": params, "batch_stats": state.batch_stats},
                images,
                targets,
                train=True,
                rng=key,
                image_sizes=batch["image_sizes"],
                mutable=["batch_stats"],
            )
            total = sum(losses.values())
            return total, (losses, new_vars["batch_stats"])

        (total, (losses, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            state.params
        )
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {**losses, "total_loss": total, "lr": schedule(state.step)}
        new_state = TrainState(
            step=state.step + 1, params=params, batch_stats=batch_stats, opt_state=opt_state
        )
        return new_state, metrics

    return step_fn


def jit_train_step(model, tx, schedule, mesh):
    """The train step as `train` runs it: jitted over `mesh`, the batch sharded along its `data`
    axis, the state and the rng replicated, the state donated. Returns (step_fn, data sharding,
    replicated sharding); experiments/aot.py compiles the same function for TPU topologies."""
    data_sharding = NamedSharding(mesh, PartitionSpec("data"))
    replicated = NamedSharding(mesh, PartitionSpec())
    step_fn = jax.jit(
        make_train_step(model, tx, schedule),
        in_shardings=(replicated, data_sharding, replicated),
        out_shardings=(replicated, replicated),
        donate_argnums=(0,),
    )
    return step_fn, data_sharding, replicated


_DEVICE_KEYS = ("images", "image_sizes", "boxes", "masks", "levels", "valid")


def shard_batch(batch, sharding):
    """Host-local numpy batch -> global jax arrays sharded along the batch axis."""
    return {
        k: jax.make_array_from_process_local_data(sharding, np.asarray(batch[k]))
        for k in _DEVICE_KEYS
    }
