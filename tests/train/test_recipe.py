"""Items of the stage-2 recipe that detectron2 (its defaults and its code) decides, not HASSOD's
own configs (docs/recipe.md, Stage 2), stated as tests against the original's definitions:

- weight decay 0 on every norm-layer parameter (detectron2 WEIGHT_DECAY_NORM 0.0), and
  5e-5 on every other parameter, biases included;
- P6 = `max_pool2d(P5, kernel_size=1, stride=2)` (LastLevelMaxPool), checked
  against torch;
- loss normalisers: RPN objectness BCE and box L1 (smooth-L1 with beta 0) both
  divided by 256 x #images; Fast R-CNN box L1 divided by the number of sampled proposals
  (detectron2 `FastRCNNOutputLayers.box_reg_loss`: `/ max(gt_classes.numel(), 1.0)`) and its
  CE averaged over them, checked against torch's losses in float64.

The norm layers are found by module type (every `resnet.BatchNorm` the detector calls), not by
name, so a renamed or new BN layer cannot slip past the weight-decay mask.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from hassod_jax import defaults
from hassod_jax.models import resnet
from hassod_jax.modes import train as train_mode
from hassod_jax.train import losses, optim

torch = pytest.importorskip("torch")
F = torch.nn.functional


def _model(size):
    c = defaults.training()
    c.model.size = size
    c.dtype = "float32"
    return c, train_mode.build_model(c)


def _params_and_bn_layers(model):
    """Abstract params of the whole detector and the paths of every BatchNorm it calls."""
    seen = set()

    def interceptor(next_fun, args, kwargs, context):
        if isinstance(context.module, resnet.BatchNorm):
            seen.add(tuple(context.module.path))
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(interceptor):
        v = jax.eval_shape(
            lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 64, 64, 3)), train=False)
        )
    return v["params"], seen


def _path(keys):
    return tuple(str(getattr(k, "key", k)) for k in keys)


@pytest.mark.parametrize("size", ["small", "r50"])
def test_weight_decay_is_zero_on_every_batchnorm_parameter_and_only_there(size):
    _, model = _model(size)
    params, bn_layers = _params_and_bn_layers(model)
    names = {p[-1] for p in bn_layers}
    expected = {"norm1", "norm2", "shortcut_norm", "stem_norm", "norm"}
    assert names == (expected | {"norm3"} if size == "r50" else expected)
    mask = optim.weight_decay_mask(params)
    wrong = []
    for keys, decayed in jax.tree_util.tree_leaves_with_path(mask):
        path = _path(keys)
        is_bn = path[:-1] in bn_layers
        if is_bn:
            assert path[-1] in ("scale", "bias"), path
        if decayed == is_bn:
            wrong.append("/".join(path))
    assert not wrong, f"{len(wrong)} leaves with the wrong weight decay, e.g. {wrong[:6]}"


def test_weight_decay_update_skips_norm_params_and_decays_biases():
    """One SGD step with zero gradients: exactly -lr * wd * p on decayed leaves, 0 on norms."""
    params = {
        "backbone": {
            "stem_conv1": {"kernel": jnp.full((3, 3, 3, 4), 2.0)},
            "res2_0": {"norm1": {"scale": jnp.full((4,), 3.0), "bias": jnp.full((4,), 1.0)}},
        },
        "box_head": {"fc1": {"kernel": jnp.full((5, 2), 4.0), "bias": jnp.full((2,), 5.0)}},
        "fpn": {"lateral2": {"norm": {"scale": jnp.full((4,), 6.0), "bias": jnp.ones((4,))}}},
    }
    tx = optim.sgd(0.01, momentum=0.9, weight_decay=5e-5, clip_norm=1.0)
    grads = jax.tree_util.tree_map(jnp.zeros_like, params)
    updates, _ = tx.update(grads, tx.init(params), params)
    flat_p, flat_u = traverse_util.flatten_dict(params), traverse_util.flatten_dict(updates)
    assert set(flat_p) == set(flat_u)
    for path, p in flat_p.items():
        want = np.zeros(p.shape) if path[-2].startswith("norm") else -0.01 * 5e-5 * np.asarray(p)
        np.testing.assert_allclose(np.asarray(flat_u[path]), want, rtol=1e-6, err_msg=str(path))


def test_p6_is_max_pool_kernel_1_stride_2_of_p5():
    _, model = _model("small")
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 96, 160, 3))  # P5 3x5, P6 2x3
    v = jax.jit(lambda r: model.init(r, x, train=False, method="features"))(
        jax.random.PRNGKey(1)
    )
    feats = jax.jit(lambda v, x: model.apply(v, x, False, method="features"))(v, x)
    p5 = torch.from_numpy(np.asarray(feats["p5"], np.float64)).permute(0, 3, 1, 2)
    want = F.max_pool2d(p5, kernel_size=1, stride=2).permute(0, 2, 3, 1).numpy()
    assert feats["p5"].shape[1:3] == (3, 5) and want.shape[1:3] == (2, 3)
    np.testing.assert_array_equal(np.asarray(feats["p6"], np.float64), want)


def test_rpn_losses_are_normalised_by_256_times_the_images():
    rng = np.random.default_rng(0)
    b, n = 3, 500
    logits = rng.normal(size=(b, n))
    pred, gt = rng.normal(size=(b, n, 4)), rng.normal(size=(b, n, 4))
    labels = rng.choice([-1, 0, 1], size=(b, n), p=[0.6, 0.3, 0.1])
    cls, box = losses.rpn_losses(
        jnp.asarray(logits, jnp.float32),
        jnp.asarray(pred, jnp.float32),
        jnp.asarray(gt, jnp.float32),
        jnp.asarray(labels),
        256,
    )
    t = torch.from_numpy
    sampled, pos = labels >= 0, labels == 1
    want_cls = F.binary_cross_entropy_with_logits(
        t(logits[sampled]), t(pos[sampled].astype(np.float64)), reduction="sum"
    ) / (256 * b)
    want_box = F.smooth_l1_loss(t(pred[pos]), t(gt[pos]), beta=0.0, reduction="sum") / (256 * b)
    np.testing.assert_allclose(float(cls), float(want_cls), rtol=1e-5)
    np.testing.assert_allclose(float(box), float(want_box), rtol=1e-5)


def test_fast_rcnn_box_loss_is_normalised_by_the_sampled_proposals():
    rng = np.random.default_rng(1)
    b, r = 2, 64
    logits = rng.normal(size=(b, r, 2))
    pred, gt = rng.normal(size=(b, r, 4)), rng.normal(size=(b, r, 4))
    valid = np.zeros((b, r), bool)
    valid[0, :50], valid[1, :37] = True, True  # padded slots after the sampled rows
    is_fg = rng.random((b, r)) < 0.3
    cls, box = losses.fast_rcnn_losses(
        jnp.asarray(logits, jnp.float32),
        jnp.asarray(pred, jnp.float32),
        jnp.asarray(gt, jnp.float32),
        jnp.asarray(is_fg),
        jnp.asarray(valid),
    )
    t = torch.from_numpy
    fg = is_fg & valid
    labels = np.where(is_fg, 0, 1)[valid]  # class 0 = foreground, 1 = background
    want_cls = F.cross_entropy(t(logits[valid]), t(labels), reduction="mean")
    want_box = F.smooth_l1_loss(t(pred[fg]), t(gt[fg]), beta=0.0, reduction="sum") / valid.sum()
    np.testing.assert_allclose(float(cls), float(want_cls), rtol=1e-5)
    np.testing.assert_allclose(float(box), float(want_box), rtol=1e-5)
