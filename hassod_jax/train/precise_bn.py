"""PreciseBN: batch-norm running statistics recomputed over training batches (HASSOD stage 2.2).

The original (`TEST.PRECISE_BN ENABLED True, NUM_ITER 200`; detectron2 `hooks.PreciseBN`,
registered before the checkpointer and the evaluation hook) recomputes the statistics every
`TEST.EVAL_PERIOD` (5000) iterations and at the last iteration, so the stage-2.2 detector that
is saved, evaluated and handed to Mean Teacher carries them. It calls
`fvcore.nn.precise_bn.update_bn_stats(model, loader, 200)`: 200 train-mode forwards with every
BN's momentum set to 1, so that after forward k each BN's running statistics are batch k's
own (its mean and its unbiased, Bessel-corrected variance; with SyncBN over the whole global
batch), which an estimator accumulates. Two estimators exist, by fvcore version:

* ``"population"`` (fvcore from 0.1.5.post20210630 on, hence what HASSOD's 2023 environment
  ran; `_PopulationVarianceEstimator`): the statistics of all the batches' elements pooled.
  With n_k the number of elements per channel of batch k (images x height x width at that
  layer), m_k its mean and v_k its unbiased variance:
  mean = sum n_k m_k / N and var = sum n_k (m_k^2 + v_k (n_k - 1) / n_k) / N - mean^2,
  N = sum n_k. So batches weigh by their element count, and the spread of the batch means is
  part of the variance.
* ``"mean"`` (older fvcore; `_MeanOfBatchVarianceEstimator`): each BN's momentum 1/k at
  batch k, i.e. mean = average of m_k, var = average of v_k, every batch weighing the same.

Here each BN layer's (m_k, v_k) come from the `bn_stats` collection of
`hassod_jax.models.resnet.BatchNorm` (backbone + FPN are the detector's only batch norms) and
n_k from the layer's input shape. Under `jax.jit` with the batch sharded over the mesh's
`data` axis, m_k and v_k are the global batch's, as SyncBN's. The pooled variance is
accumulated in Chan's parallel form (a running mean and a sum of squared deviations), which is
the formula above without its float32 cancellation. n_k is the count of the global batch; with
SyncBN, fvcore takes the per-GPU count instead (numel / C of the local input), which weighs
the batches the same when every GPU's batch has one shape and changes the Bessel undo factor
by ~3 / N.

Where the batches come from: detectron2 builds a SECOND training loader for the hook (the
same dataset, mapper and batch size; its own shuffle), so PreciseBN does not consume the
training stream. The forward is the model's own, outside `run_step`, so the batches are the
mapper's output -- resized and flipped, but without the copy-paste that HASSOD's trainer
applies in `run_step` -- and in float32 (no autocast). Here: a separate
`loader.DetectionBatchSource` over the same records and loader settings, copy-paste off, with
a seed derived from (config.seed, the step it runs at), its first `num_iters` batches, and
`normalize_padded` as the train step. The seed per invocation makes a resumed run recompute
exactly the statistics of an uninterrupted one (detectron2's iterator instead continues from
one invocation to the next: the batches differ, their distribution does not).
"""

from __future__ import annotations

import dataclasses
import itertools
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import traverse_util

from hassod_jax.models import resnet

ESTIMATORS = ("population", "mean")
_SEED_TAG = 0x50424E  # "PBN": keeps PreciseBN's plan apart from the training plan's


def runs_at(done, every, max_iter):
    """True when PreciseBN runs after step `done` (1-based count of finished steps): every
    `every` steps (0 = never periodically) and at the last step (detectron2's
    `PreciseBN.after_step`: `next_iter == max_iter or next_iter % period == 0`)."""
    done = int(done)
    return done == int(max_iter) or (int(every) > 0 and done % int(every) == 0)


def batch_seed(seed, step):
    """The loader seed of the PreciseBN run after step `step` (a pure function of both)."""
    ss = np.random.SeedSequence([int(seed), _SEED_TAG, int(step)])
    return int(ss.generate_state(1, dtype=np.uint32)[0])


def loader_config(train_loader_config, step):
    """The training LoaderConfig with the PreciseBN seed for `step` and copy-paste off."""
    return dataclasses.replace(
        train_loader_config,
        seed=batch_seed(train_loader_config.seed, step),
        copy_paste=False,
    )


def make_batches(records, train_loader_config, step, num_iters, worker_count=0, **shard):
    """Iterator over the `num_iters` PreciseBN batches of the run after step `step`."""
    from hassod_jax.data import loader

    return loader.make_train_iterator(
        records,
        loader_config(train_loader_config, step),
        num_steps=num_iters,
        start_step=0,
        worker_count=worker_count,
        **shard,
    )


def _is_bn(module, method_name):
    return isinstance(module, resnet.BatchNorm) and method_name == "__call__"


def batch_statistics(model, params, batch_stats, images, method="features"):
    """One train-mode forward: {layer path: (mean (C,), unbiased var (C,), count n)} with n the
    elements per channel of the layer's input (a Python int). Traceable."""
    _, mutated = model.apply(
        {"params": params, "batch_stats": batch_stats},
        images,
        True,
        method=method,
        mutable=["batch_stats", "bn_stats", "intermediates"],
        capture_intermediates=_is_bn,
    )
    stats = traverse_util.flatten_dict(mutated["bn_stats"])
    shapes = traverse_util.flatten_dict(mutated["intermediates"])
    counts = {}
    for key, out in shapes.items():
        # key = (*module path, "__call__"); out = the tuple of that call's outputs
        value = out[0] if isinstance(out, (tuple, list)) else out
        counts[key[:-1]] = int(np.prod(value.shape[:-1]))
    layers = {k[:-1] for k in stats}
    return {
        layer: (stats[layer + ("mean",)], stats[layer + ("var",)], counts[layer])
        for layer in sorted(layers)
    }


def init_accumulator(model, params, batch_stats, image_shape, method="features"):
    """Zeros for every BN layer the forward uses: {layer: {"mean", "m2", "count"}}."""
    shapes = jax.eval_shape(
        lambda p, s: batch_statistics(
            model, p, s, jnp.zeros(image_shape, jnp.float32), method=method
        ),
        params,
        batch_stats,
    )
    return {
        "/".join(layer): {
            "mean": jnp.zeros(mean.shape, jnp.float32),
            "m2": jnp.zeros(mean.shape, jnp.float32),
            "count": jnp.zeros((), jnp.float32),
        }
        for layer, (mean, _, _) in shapes.items()
    }


def accumulate(acc, stats, estimator="population"):
    """Adds one batch's statistics ({layer: (mean, var, n)}) to the accumulator."""
    out = {}
    for layer, (m, v, n) in stats.items():
        a = acc["/".join(layer)]
        m, v = m.astype(jnp.float32), v.astype(jnp.float32)
        if estimator == "population":
            tot = a["count"] + n
            delta = m - a["mean"]
            biased = v * ((n - 1) / n)
            out["/".join(layer)] = {
                "mean": a["mean"] + delta * (n / tot),
                "m2": a["m2"] + n * biased + jnp.square(delta) * (n * a["count"] / tot),
                "count": tot,
            }
        else:  # "mean": momentum 1/k
            k = a["count"] + 1.0
            out["/".join(layer)] = {
                "mean": a["mean"] + (m - a["mean"]) / k,
                "m2": a["m2"] + (v - a["m2"]) / k,
                "count": k,
            }
    return out


def finalize(acc, batch_stats, estimator="population"):
    """The new running statistics: `batch_stats` with every accumulated layer replaced."""
    flat = dict(traverse_util.flatten_dict(batch_stats))
    for name, a in acc.items():
        layer = tuple(name.split("/"))
        if layer + ("mean",) not in flat:
            raise KeyError(f"PreciseBN: layer {name} has no running statistics")
        var = a["m2"] / a["count"] if estimator == "population" else a["m2"]
        flat[layer + ("mean",)] = a["mean"].astype(flat[layer + ("mean",)].dtype)
        flat[layer + ("var",)] = var.astype(flat[layer + ("var",)].dtype)
    return traverse_util.unflatten_dict(flat)


def make_accumulate_step(model, estimator="population", method="features"):
    """(params, batch_stats, acc, images, image_sizes) -> acc, for jax.jit; uint8 images are
    normalised (padding zeroed) as the train step does."""
    from hassod_jax.data import loader

    if estimator not in ESTIMATORS:
        raise ValueError(f"estimator must be one of {ESTIMATORS}, got {estimator!r}")

    def step(params, batch_stats, acc, images, image_sizes):
        if images.dtype == jnp.uint8:
            images = loader.normalize_padded(images, image_sizes)
        stats = batch_statistics(model, params, batch_stats, images, method=method)
        return accumulate(acc, stats, estimator)

    return step


def jit_accumulate_step(model, mesh, estimator="population", method="features"):
    """`make_accumulate_step` as `PreciseBN` runs it: jitted over `mesh` like the train step
    (params, batch_stats and the accumulator replicated, images and sizes sharded along `data`),
    the accumulator donated. Returns (step, data sharding, replicated sharding)."""
    from jax.sharding import NamedSharding, PartitionSpec

    data_sharding = NamedSharding(mesh, PartitionSpec("data"))
    replicated = NamedSharding(mesh, PartitionSpec())
    step = jax.jit(
        make_accumulate_step(model, estimator, method),
        in_shardings=(replicated,) * 3 + (data_sharding,) * 2,
        out_shardings=replicated,
        donate_argnums=(2,),
    )
    return step, data_sharding, replicated


class PreciseBN:
    """The jitted PreciseBN of a training run, sharded like the train step.

    Args:
      model: the detector (any module whose `method` runs every BN layer in train mode).
      mesh: the training Mesh; the batch is sharded over its `data` axis.
      num_iters: batches per run (200).
      estimator: "population" (default, fvcore as HASSOD ran it) or "mean".
    `__call__(params, batch_stats, batches)` returns the new batch_stats (replicated).
    """

    def __init__(self, model, mesh, num_iters=200, estimator="population", method="features"):
        self.model, self.method = model, method
        self.num_iters, self.estimator = int(num_iters), estimator
        self._step, self.data_sharding, replicated = jit_accumulate_step(
            model, mesh, estimator, method
        )
        self._finalize = jax.jit(
            lambda acc, stats: finalize(acc, stats, estimator), out_shardings=replicated
        )
        self._replicated = replicated

    def _shard(self, x):
        return jax.make_array_from_process_local_data(self.data_sharding, np.asarray(x))

    def __call__(self, params, batch_stats, batches):
        acc, k = None, 0
        for batch in itertools.islice(batches, self.num_iters):
            images, sizes = batch["images"], batch["image_sizes"]
            if acc is None:
                global_shape = (images.shape[0] * jax.process_count(),) + images.shape[1:]
                acc = jax.device_put(
                    init_accumulator(
                        self.model, params, batch_stats, global_shape, method=self.method
                    ),
                    self._replicated,
                )
            acc = self._step(params, batch_stats, acc, self._shard(images), self._shard(sizes))
            k += 1
        if k != self.num_iters:
            raise ValueError(
                f"PreciseBN is meant to run for {self.num_iters} batches, but the data "
                f"stopped after {k}"
            )
        return self._finalize(acc, batch_stats)


def run_for_step(pbn, state, records, train_loader_config, step, worker_count=0, **shard):
    """PreciseBN after training step `step`: `state` with new batch_stats (params untouched)."""
    t0 = time.perf_counter()
    it = make_batches(records, train_loader_config, step, pbn.num_iters, worker_count, **shard)
    try:
        new_stats = pbn(state.params, state.batch_stats, it)
    finally:
        if hasattr(it, "close"):
            it.close()
    logging.info(
        "PreciseBN after step %d: BN statistics over %d batches (%s estimator) in %.1f s",
        step,
        pbn.num_iters,
        pbn.estimator,
        time.perf_counter() - t0,
    )
    return state.replace(batch_stats=new_stats)
