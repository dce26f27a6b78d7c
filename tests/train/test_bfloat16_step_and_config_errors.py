"""Paths no other test exercises: a bfloat16 training step (the default `dtype` of
`configs/train_coco.py`, while every other training test forces float32) and the error paths of
`modes.train.train`, `modes.train.build_model` and `inference.predictor.predict`, each with one
clear message raised before any work is done."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hassod_jax import defaults, utils
from hassod_jax.data import loader, synthetic
from hassod_jax.inference import predictor
from hassod_jax.modes import train as train_mode
from hassod_jax.train import supervised
from tests.xla_env import FAST_JIT

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
LOSSES = {"rpn/cls", "rpn/box", "mask"} | {
    f"stage{k}/{n}" for k in range(3) for n in ("cls", "box", "level")
}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("scenes")
    return synthetic.write_synthetic_dataset(str(root), 8, 0, (128, 128), n_objects=(1, 2))


def _config(dataset):
    image_dir, gt = dataset
    c = defaults.training()
    c.train_json, c.images = gt, image_dir
    c.model.size = "small"
    c.model.pooler_sampling_ratio = 2
    c.batch_size = 4
    c.max_iter = 10
    c.warmup_iters = 2
    c.precise_bn = False
    c.data.short_edges = (128,)
    c.data.max_size = 128
    c.data.buckets = ((128, 128),)
    c.data.copy_paste = False
    c.data.max_instances = 16
    c.data.workers = 0
    return c


@pytest.fixture(scope="module")
def small(dataset):
    """The small detector's config, float32 state and two loader batches."""
    c = _config(dataset)
    records = loader.open_records(train_json=c.train_json, images=c.images)
    it = loader.make_train_iterator(records, train_mode.loader_config(c), num_steps=2)
    keys = ("images", "image_sizes", "boxes", "masks", "levels", "valid")
    batches = [{k: np.asarray(b[k]) for k in keys} for b in (next(it), next(it))]
    c.dtype = "float32"
    model = train_mode.build_model(c)
    tx, sched = train_mode.make_optimizer(c)
    state = supervised.init_state(model, tx, jax.random.PRNGKey(0))
    return c, model, tx, sched, jax.device_get(state), batches


def _run(step, state, batch, seed):
    return step(
        jax.tree_util.tree_map(jnp.asarray, state),
        {k: jnp.asarray(v) for k, v in batch.items()},
        jax.random.PRNGKey(seed),
    )


def test_bfloat16_train_step_is_finite_keeps_float32_params_and_tracks_float32(small):
    """One jitted step of the small detector built with config.dtype='bfloat16' against the
    float32 step from the same state, batch and rng, on two loader batches.

    Bounds (relative to the float32 loss), from the spread measured on 8 (state, batch) pairs
    (2 init seeds x 4 batches of these scenes, batch 4) and the two here:
    - rpn/cls, rpn/box: anchor labels and targets come from the float32 ground truth, so only
      the bf16 arithmetic of the network differs: measured <= 5e-5; bound 2e-3 (a loss
      accumulated in bf16, 8 mantissa bits, is off by ~4e-3);
    - stage{k}/cls, /box, /level and mask: the bf16 RPN scores reorder the proposals at the
      top-k and NMS, so the sampled ROIs (and the number of foreground rows that the losses
      sum over) differ; measured up to 0.087 (cls), 0.161 (box), 0.0015 (level), 5e-5
      (mask: ~ln 2 at init, insensitive); bounds 0.25, 0.4, 0.02, 0.01;
    - total: measured up to 0.034, bound 0.1.
    A bf16 step that diverges (inf / nan), keeps or updates the parameters in bf16, or goes
    wrong in a bf16-only branch (e.g. a loss summed in bf16, a misscaled cast) fails.
    """
    c, model32, tx, sched, state, batches = small
    c = c.copy_and_resolve_references()
    c.dtype = "bfloat16"
    model16 = train_mode.build_model(c)
    assert model16.dtype == jnp.bfloat16 and model16.config == model32.config
    # The computation really is bf16: the features (and so every head input) are bf16.
    feats = jax.eval_shape(
        lambda v, x: model16.apply(v, x, method=model16.features),
        {"params": state.params, "batch_stats": state.batch_stats},
        jnp.zeros((1, 128, 128, 3), jnp.float32),
    )
    assert {f.dtype for f in feats.values()} == {jnp.dtype(jnp.bfloat16)}

    rtol = {"rpn/cls": 2e-3, "rpn/box": 2e-3, "mask": 1e-2, "total_loss": 0.1}
    for k in range(3):
        rtol |= {f"stage{k}/cls": 0.25, f"stage{k}/box": 0.4, f"stage{k}/level": 0.02}
    step16 = jax.jit(supervised.make_train_step(model16, tx, sched),
                     compiler_options=FAST_JIT)
    step32 = jax.jit(supervised.make_train_step(model32, tx, sched),
                     compiler_options=FAST_JIT)
    spread = {}
    for i, batch in enumerate(batches):
        new16, m16 = _run(step16, state, batch, seed=i)
        _, m32 = _run(step32, state, batch, seed=i)
        m16, m32 = jax.device_get((m16, m32))
        assert LOSSES <= set(m16)
        for k in LOSSES | {"total_loss"}:
            assert m16[k].dtype == np.float32, (k, m16[k].dtype)
            assert np.isfinite(m16[k]) and m16[k] > 0, (k, m16[k])
            rel = abs(float(m16[k]) - float(m32[k])) / abs(float(m32[k]))
            spread[k] = max(spread.get(k, 0.0), rel)
        # Parameters, BN statistics and optimizer state stay float32 and finite.
        for part in ("params", "batch_stats", "opt_state"):
            for p, leaf in jax.tree_util.tree_leaves_with_path(getattr(new16, part)):
                if jnp.issubdtype(leaf.dtype, jnp.floating):
                    assert leaf.dtype == jnp.float32, (part, jax.tree_util.keystr(p))
                    assert np.all(np.isfinite(np.asarray(leaf))), (part, p)
        assert int(new16.step) == 1
    print("bf16 vs f32 relative loss spread:", {k: f"{v:.2e}" for k, v in sorted(spread.items())})
    bad = {k: (v, rtol[k]) for k, v in spread.items() if v > rtol[k]}
    assert not bad, bad


# ---------------------------------------------------------------------------------- errors


def test_batch_size_not_a_multiple_of_the_devices(dataset, tmp_path):
    n = jax.device_count()
    assert n > 1, "conftest forces 8 host devices"
    c = _config(dataset)
    c.batch_size = n + 1
    work = tmp_path / "work"
    with pytest.raises(utils.ConfigError) as e:
        train_mode.train(c, str(work))
    assert str(e.value) == (
        f"config.batch_size={n + 1} must be a multiple of the {n} devices"
    )
    assert not work.exists()  # refused before anything was written


def test_val_json_without_val_images_and_the_reverse(dataset, tmp_path):
    image_dir, gt = dataset
    for val_json, val_images in ((gt, ""), ("", image_dir)):
        c = _config(dataset)
        c.batch_size = jax.device_count()
        c.val_json, c.val_images = val_json, val_images
        with pytest.raises(utils.ConfigError) as e:
            train_mode.train(c, str(tmp_path / "work"))
        msg = str(e.value)
        assert msg.startswith(
            "periodic evaluation needs both config.val_json and config.val_images"
        ), msg
        assert repr(val_json) in msg and repr(val_images) in msg
        assert not (tmp_path / "work").exists()


def test_unknown_model_size(dataset, tmp_path):
    c = _config(dataset)
    c.model.size = "r101"
    with pytest.raises(utils.ConfigError) as e:
        train_mode.build_model(c)
    assert str(e.value) == "config.model.size must be 'r50' or 'small', got 'r101'"
    # Through training (the user's path): the same error, before anything is written.
    c.batch_size = jax.device_count()
    with pytest.raises(utils.ConfigError, match="config.model.size must be 'r50' or 'small'"):
        train_mode.train(c, str(tmp_path / "work"))
    assert not (tmp_path / "work").exists()


def test_every_detector_field_is_a_config_field_unset_means_the_models_own():
    """config.model of both stage-2 configs holds every DetectorConfig field but the backbone's
    (so --config.model.X=... reaches the model); an unset field keeps the size's value."""
    import dataclasses

    from hassod_jax.models import detector as D

    names = {f.name for f in dataclasses.fields(D.DetectorConfig)} - {"resnet"}
    assert set(defaults.training().model) == names | {"size"}
    assert set(defaults.mean_teacher().model) == names
    c = defaults.training()
    c.model.size = "small"
    assert train_mode.build_model(c).config == D.SMALL_CONFIG  # droploss, level weight: its own
    c.model.rpn_post_nms_topk_train = 7
    c.model.cascade_ious = (0.5, 0.55, 0.7)
    got = train_mode.build_model(c).config
    assert got == dataclasses.replace(
        D.SMALL_CONFIG, rpn_post_nms_topk_train=7, cascade_ious=(0.5, 0.55, 0.7)
    )


@pytest.mark.parametrize("detections", [0, -1])
def test_predict_needs_at_least_one_detection_per_image(small, detections):
    _, model, _, _, state, _ = small
    variables = {"params": state.params, "batch_stats": state.batch_stats}
    image = np.zeros((64, 64, 3), np.uint8)
    with pytest.raises(ValueError) as e:
        predictor.predict(model, variables, [(image, 1)], short_edge=64, max_size=64,
                        detections=detections)
    assert str(e.value) == f"predict: detections must be >= 1, got {detections}"
