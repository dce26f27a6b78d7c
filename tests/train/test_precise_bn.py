"""PreciseBN against float64 NumPy statistics of the BN layers' own inputs, and its schedule.

The reference never uses the BN layers' statistics: it intercepts the input of every
`resnet.BatchNorm` call of the small detector's train-mode `features` (backbone + FPN) and
computes, in float64, fvcore's two estimators over the batches:
- "population" = the mean and the (biased) variance of all the batches' elements pooled
  (fvcore's `_PopulationVarianceEstimator`: sum n_k (m_k^2 + v_k (n_k - 1) / n_k) / N - mean^2
  is exactly that);
- "mean" = the average of the batch means and of the unbiased batch variances (older fvcore;
  torch's BatchNorm with momentum=None, checked below).
The batches have different shapes (different element counts, so the two differ) and are
sharded over the 8 forced CPU devices, as the train step shards them.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util
from jax.sharding import Mesh

from hassod_jax import defaults
from hassod_jax.data import loader
from hassod_jax.models import resnet
from hassod_jax.modes import train as train_mode
from hassod_jax.train import precise_bn

SHAPES = ((32, 32), (32, 64), (32, 32))  # two shapes: two compilations
BATCH = 8


def _config():
    c = defaults.training()
    c.model.size = "small"
    c.dtype = "float32"
    return c


@pytest.fixture(scope="module")
def setup():
    config = _config()
    model = train_mode.build_model(config)
    # Backbone + FPN variables only: what `features` reads.
    v = jax.jit(
        lambda r: model.init(r, jnp.zeros((1, 64, 64, 3)), train=False, method="features")
    )(jax.random.PRNGKey(0))
    rng = np.random.default_rng(0)
    # Non-trivial BN parameters and running statistics (the result must not depend on the
    # latter): scale/bias change what the next layers see.
    params = traverse_util.flatten_dict(v["params"])
    for k in params:
        if k[-1] in ("scale", "bias") and "norm" in k[-2]:
            mu = 1.0 if k[-1] == "scale" else 0.0
            params[k] = jnp.asarray(rng.normal(mu, 0.3, params[k].shape), jnp.float32)
    params = traverse_util.unflatten_dict(params)
    stats = jax.tree_util.tree_map(
        lambda x: jnp.asarray(rng.uniform(0.5, 2.0, x.shape), jnp.float32), v["batch_stats"]
    )
    batches = []
    for h, w in SHAPES:
        images = rng.integers(0, 256, size=(BATCH, h, w, 3), dtype=np.uint8)
        sizes = np.stack([rng.integers(h // 2, h + 1, BATCH), rng.integers(w // 2, w + 1, BATCH)])
        batches.append({"images": images, "image_sizes": sizes.T.astype(np.int32)})
    inputs = [bn_inputs(model, params, stats, b) for b in batches]
    return model, params, stats, batches, inputs


def bn_inputs(model, params, stats, batch):
    """{layer path: float64 (elements, C) input of that BN call} of one train-mode forward of
    the batch, normalised by NumPy."""

    def forward(params, stats, images):
        seen = {}

        def interceptor(next_fun, args, kwargs, context):
            module = context.module
            if isinstance(module, resnet.BatchNorm) and context.method_name == "__call__":
                seen[module.path] = args[0]
            return next_fun(*args, **kwargs)

        with nn.intercept_methods(interceptor):
            model.apply(
                {"params": params, "batch_stats": stats},
                images,
                True,
                method="features",
                mutable=["batch_stats"],
            )
        return seen

    images = loader.normalize_padded(batch["images"], batch["image_sizes"])
    seen = jax.jit(forward)(params, stats, jnp.asarray(images))
    return {k: np.asarray(x, np.float64).reshape(-1, x.shape[-1]) for k, x in seen.items()}


def reference(per_batch, estimator):
    out = {}
    for layer in per_batch[0]:
        xs = [p[layer] for p in per_batch]
        if estimator == "population":
            pooled = np.concatenate(xs, axis=0)
            out[layer] = (pooled.mean(0), pooled.var(0))
        else:
            out[layer] = (
                np.mean([x.mean(0) for x in xs], axis=0),
                np.mean([x.var(0, ddof=1) for x in xs], axis=0),
            )
    return out


@pytest.mark.parametrize("estimator", precise_bn.ESTIMATORS)
def test_precise_bn_matches_float64_statistics_of_the_bn_inputs(setup, estimator):
    model, params, stats, batches, inputs = setup
    mesh = Mesh(np.array(jax.devices()), ("data",))
    assert mesh.devices.size == 8  # sharded as the train step
    pbn = precise_bn.PreciseBN(model, mesh, num_iters=len(batches), estimator=estimator)
    new = pbn(params, stats, iter(batches))
    ref = reference(inputs, estimator)
    flat_new = traverse_util.flatten_dict(new)
    flat_old = traverse_util.flatten_dict(stats)
    assert set(flat_new) == set(flat_old)
    # Every BN layer of the detector is in backbone + FPN and was recomputed.
    assert {k[:-1] for k in flat_old} == set(ref)
    for layer, (mean, var) in ref.items():
        scale = np.sqrt(var.mean())
        np.testing.assert_allclose(
            flat_new[layer + ("mean",)], mean, rtol=1e-4, atol=1e-5 * scale, err_msg=str(layer)
        )
        np.testing.assert_allclose(
            flat_new[layer + ("var",)], var, rtol=2e-4, atol=1e-6 * var.mean(), err_msg=str(layer)
        )
    # The previous running statistics play no part.
    other = jax.tree_util.tree_map(lambda x: x * 3.0 + 1.0, stats)
    again = pbn(params, other, iter(batches))
    for a, b in zip(jax.tree_util.tree_leaves(new), jax.tree_util.tree_leaves(again)):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


def test_the_estimators_differ_and_population_weighs_by_element_count(setup):
    """Not vacuous: with batches of different sizes and means the two disagree."""
    pop = reference(setup[-1], "population")
    avg = reference(setup[-1], "mean")
    layer = next(iter(pop))
    assert not np.allclose(pop[layer][1], avg[layer][1], rtol=1e-3)


def test_mean_estimator_reference_is_torch_cumulative_batchnorm():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(1)
    xs = [rng.normal(rng.normal(), 2.0, size=(n, 5)) for n in (7, 19, 4)]
    bn = torch.nn.BatchNorm1d(5, momentum=None, dtype=torch.float64)  # cumulative average
    bn.train()
    for x in xs:
        bn(torch.from_numpy(x))
    np.testing.assert_allclose(bn.running_mean.numpy(), np.mean([x.mean(0) for x in xs], 0))
    np.testing.assert_allclose(
        bn.running_var.numpy(), np.mean([x.var(0, ddof=1) for x in xs], 0), rtol=1e-12
    )


def test_accumulate_is_fvcores_population_formula():
    """Chan's update equals fvcore's sum n_k (m_k^2 + v_k (n_k - 1) / n_k) / N - mean^2."""
    rng = np.random.default_rng(2)
    xs = [rng.normal(3.0 + i, 1.0 + i, size=(n, 4)) for i, n in enumerate((50, 7, 300))]
    acc = {"l": {k: jnp.zeros(s) for k, s in (("mean", 4), ("m2", 4), ("count", ()))}}
    for x in xs:
        stats = {("l",): (jnp.asarray(x.mean(0)), jnp.asarray(x.var(0, ddof=1)), len(x))}
        acc = precise_bn.accumulate(acc, stats, "population")
    n = np.array([len(x) for x in xs], np.float64)
    m = np.stack([x.mean(0) for x in xs])
    v = np.stack([x.var(0, ddof=1) for x in xs])
    mean = (n[:, None] * m).sum(0) / n.sum()
    var = (n[:, None] * (m**2 + v * ((n - 1) / n)[:, None])).sum(0) / n.sum() - mean**2
    np.testing.assert_allclose(acc["l"]["mean"], mean, rtol=1e-6)
    np.testing.assert_allclose(acc["l"]["m2"] / acc["l"]["count"], var, rtol=1e-5)


def test_too_few_batches_is_an_error(setup):
    model, params, stats, batches, _ = setup
    pbn = precise_bn.PreciseBN(model, Mesh(np.array(jax.devices()), ("data",)), num_iters=3)
    with pytest.raises(ValueError, match="meant to run for 3 batches, but the data stopped"):
        pbn(params, stats, iter(batches[:1] * 2))


def test_schedule_every_n_and_at_the_last_step():
    def when(every, max_iter):
        return [d for d in range(1, max_iter + 1) if precise_bn.runs_at(d, every, max_iter)]

    assert when(5000, 40000) == list(range(5000, 40001, 5000))
    assert when(5000, 12345) == [5000, 10000, 12345]
    assert when(0, 300) == [300]
    assert when(2, 4) == [2, 4]
    c = defaults.training()
    assert (c.precise_bn, c.precise_bn_every, c.precise_bn_iters) == (True, 5000, 200)
    assert c.precise_bn_estimator == "population" and c.precise_bn_dtype == "float32"


def test_batches_are_deterministic_per_step_without_copy_paste(tmp_path):
    from hassod_jax.data.synthetic import write_synthetic_dataset

    image_dir, gt = write_synthetic_dataset(str(tmp_path), 6, seed=0, size=(64, 96))
    records = loader.CocoRecords(gt, image_dir)
    cfg = loader.LoaderConfig(
        global_batch_size=2, short_edges=(64, 96), max_size=128, buckets=((64, 128), (128, 128),
        (128, 64)), max_instances=8, image_dtype="uint8", seed=3,
    )
    assert precise_bn.loader_config(cfg, 10).copy_paste is False
    assert precise_bn.loader_config(cfg, 10).seed == precise_bn.batch_seed(3, 10)
    assert len({precise_bn.batch_seed(3, s) for s in range(100)} | {3}) == 101

    def take(step):
        return list(precise_bn.make_batches(records, cfg, step, 3, process_index=0,
                                            process_count=1))

    a, b, c = take(10), take(10), take(20)
    assert all(np.array_equal(x["images"], y["images"]) for x, y in zip(a, b))
    assert not all(
        x["images"].shape == y["images"].shape and np.array_equal(x["image_ids"], y["image_ids"])
        for x, y in zip(a, c)
    )
    # The training stream is a separate iterator: drawing PreciseBN batches does not move it.
    train = loader.make_train_iterator(records, cfg, 6, process_index=0, process_count=1)
    first = next(train)
    take(2)
    second = next(train)
    fresh = loader.make_train_iterator(records, cfg, 6, process_index=0, process_count=1)
    for want, got in zip([next(fresh), next(fresh)], [first, second]):
        assert all(np.array_equal(want[k], got[k]) for k in want)
