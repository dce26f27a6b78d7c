"""FPN, RPN head, cascade heads and the whole small detector: shapes, references, one jitted
train step (compiles once, finite losses and gradients), and 8-device sharding parity."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

torch = pytest.importorskip("torch")

from hassod_jax.models import detector as D  # noqa: E402
from hassod_jax.models.fpn import FPN  # noqa: E402
from hassod_jax.models.roi_heads import Deconv2x2, MaskHead, scale_gradient  # noqa: E402
from hassod_jax.models.rpn import RPNHead  # noqa: E402
from tests.xla_env import FAST_JIT  # noqa: E402

F = torch.nn.functional


def _t(x):
    return torch.from_numpy(np.asarray(x, np.float64))


def _conv_t(x, kernel, pad):
    # x NHWC numpy, flax kernel (kh, kw, I, O) -> NHWC float64 via torch.
    y = F.conv2d(_t(x).permute(0, 3, 1, 2), _t(kernel).permute(3, 2, 0, 1), padding=pad)
    return y.permute(0, 2, 3, 1)


def test_fpn_matches_torch_transcription():
    r = np.random.default_rng(0)
    chans = {"res2": 8, "res3": 16, "res4": 24, "res5": 32}
    feats = {
        k: r.normal(size=(2, 32 // 2**i, 48 // 2**i, c)).astype(np.float32)
        for i, (k, c) in enumerate(chans.items())
    }
    fpn = FPN(channels=16)
    v = jax.jit(lambda f: fpn.init(jax.random.PRNGKey(0), f))(feats)
    # Random BN statistics so eval-mode BN is not the identity.
    v = jax.tree_util.tree_map(
        lambda x: x + jnp.asarray(r.random(x.shape).astype(np.float32)) * 0.5, v
    )
    out = jax.jit(lambda v, f: fpn.apply(v, f, train=False))(v, feats)

    def conv_bn(x, name, pad):
        p, s = v["params"][name], v["batch_stats"][name]
        y = _conv_t(x, p["conv"]["kernel"], pad)
        return (y - _t(s["norm"]["mean"])) / torch.sqrt(_t(s["norm"]["var"]) + 1e-5) * _t(
            p["norm"]["scale"]
        ) + _t(p["norm"]["bias"])

    prev, ref = None, {}
    for i in (5, 4, 3, 2):
        lat = conv_bn(feats[f"res{i}"], f"fpn_lateral{i}", 0)
        if prev is not None:
            up = F.interpolate(prev.permute(0, 3, 1, 2), scale_factor=2.0, mode="nearest")
            lat = lat + up.permute(0, 2, 3, 1)
        prev = lat
        ref[f"p{i}"] = conv_bn(prev.numpy(), f"fpn_output{i}", 1)
    ref["p6"] = F.max_pool2d(ref["p5"].permute(0, 3, 1, 2), 1, 2).permute(0, 2, 3, 1)
    for k, rv in ref.items():
        rv = rv.numpy()
        # float32 sums of up to 9*32 products: relative to the map's scale.
        np.testing.assert_allclose(np.asarray(out[k]), rv, rtol=1e-5, atol=1e-6 * np.abs(rv).max())
    with pytest.raises(ValueError, match="multiple of 32"):
        bad = dict(feats, res2=feats["res2"][:, :-1])
        jax.eval_shape(lambda f: fpn.apply(v, f), bad)


def test_rpn_and_mask_head_shapes_and_scale_gradient():
    feats = [jnp.ones((2, s, s, 8)) for s in (16, 8, 4, 2, 1)]
    head = RPNHead(3)
    v = jax.jit(lambda f: head.init(jax.random.PRNGKey(0), f))(feats)
    logits, deltas = jax.jit(head.apply)(v, feats)
    assert [x.shape for x in logits] == [(2, s * s * 3) for s in (16, 8, 4, 2, 1)]
    assert [x.shape for x in deltas] == [(2, s * s * 3, 4) for s in (16, 8, 4, 2, 1)]
    # detectron2 init: std 0.01 normal weights, zero bias.
    k = np.asarray(v["params"]["conv"]["kernel"])
    assert 0.005 < k.std() < 0.015 and not np.any(v["params"]["conv"]["bias"])
    mh = MaskHead(dim=8, num_conv=2)
    x = jnp.ones((2, 5, 14, 14, 8))
    mv = jax.jit(lambda x: mh.init(jax.random.PRNGKey(1), x))(x)
    assert jax.jit(mh.apply)(mv, x).shape == (2, 5, 28, 28)
    x = jnp.arange(6.0)
    g = jax.grad(lambda x: jnp.sum(scale_gradient(x, 1.0 / 3) ** 2))(x)
    np.testing.assert_allclose(np.asarray(g), 2 * np.arange(6.0) / 3, rtol=1e-6)


def test_deconv_matches_torch_conv_transpose():
    """The mask head's 2x2/2 deconvolution against torch.nn.ConvTranspose2d (detectron2's
    layer), values and gradients, float64 reference."""
    rng = np.random.default_rng(4)
    x = rng.normal(size=(2, 3, 7, 5, 16)).astype(np.float32)  # (B, K, h, w, C)
    m = Deconv2x2(12)
    v = m.init(jax.random.PRNGKey(0), x)
    v = {"params": {"kernel": v["params"]["kernel"], "bias": jnp.asarray(rng.normal(size=12))}}
    deconv = torch.nn.ConvTranspose2d(16, 12, kernel_size=2, stride=2).double()
    with torch.no_grad():  # ours (a, b, C, O) -> torch (C, O, a, b)
        deconv.weight.copy_(_t(v["params"]["kernel"]).permute(2, 3, 0, 1))
        deconv.bias.copy_(_t(v["params"]["bias"]))
    xt = _t(x.reshape(6, 7, 5, 16)).permute(0, 3, 1, 2).requires_grad_(True)
    want = deconv(xt).permute(0, 2, 3, 1).reshape(2, 3, 14, 10, 12)
    got = m.apply(v, x)
    assert got.shape == (2, 3, 14, 10, 12)
    scale = float(want.abs().max())
    np.testing.assert_allclose(np.asarray(got), want.detach().numpy(), rtol=0, atol=1e-5 * scale)
    weight = rng.normal(size=want.shape)
    (want * _t(weight)).sum().backward()
    gx, gp = jax.grad(lambda x, p: jnp.sum(m.apply(p, x) * weight), argnums=(0, 1))(x, v)
    want_gx = xt.grad.permute(0, 2, 3, 1).reshape(x.shape).numpy()
    np.testing.assert_allclose(np.asarray(gx), want_gx, rtol=0, atol=1e-5 * np.abs(want_gx).max())
    want_gk = deconv.weight.grad.permute(2, 3, 0, 1).numpy()
    gk = np.asarray(gp["params"]["kernel"])
    np.testing.assert_allclose(gk, want_gk, rtol=0, atol=1e-5 * np.abs(want_gk).max())
    np.testing.assert_allclose(
        np.asarray(gp["params"]["bias"]), deconv.bias.grad.numpy(), rtol=1e-5
    )


CFG = dataclasses.replace(
    D.SMALL_CONFIG,
    rpn_pre_nms_topk_train=64,
    rpn_post_nms_topk_train=48,
    rpn_pre_nms_topk_test=64,
    rpn_post_nms_topk_test=32,
    roi_batch_size_per_image=32,
    detections_per_image=10,
    # A small sampling cap keeps the CPU test fast; exactness of the cap is the ops' tests.
    pooler_max_sampling=2,
)
B, H, W, G = 8, 64, 64, 3


def _batch(seed):
    r = np.random.default_rng(seed)
    images = r.normal(size=(B, H, W, 3)).astype(np.float32)
    x0 = r.uniform(0, 30, size=(B, G))
    y0 = r.uniform(0, 30, size=(B, G))
    bw = r.uniform(12, 34, size=(B, G))
    bh = r.uniform(12, 34, size=(B, G))
    boxes = np.stack([x0, y0, np.minimum(x0 + bw, W), np.minimum(y0 + bh, H)], -1)
    boxes = boxes.astype(np.float32)
    yy, xx = np.mgrid[0:H, 0:W]
    masks = (
        (xx[None, None] >= boxes[..., 0, None, None])
        & (xx[None, None] < boxes[..., 2, None, None])
        & (yy[None, None] >= boxes[..., 1, None, None])
        & (yy[None, None] < boxes[..., 3, None, None])
    )
    valid = np.ones((B, G), bool)
    valid[1, 2] = False  # padding slot
    valid[3, 1:] = False
    levels = r.integers(0, 3, size=(B, G)).astype(np.int32)
    targets = {"boxes": boxes, "masks": masks, "levels": levels, "valid": valid}
    return images, targets


@pytest.fixture(scope="module")
def model_and_vars():
    model = D.CascadeMaskRCNN(CFG)
    images, _ = _batch(0)
    variables = jax.jit(lambda im: model.init(jax.random.PRNGKey(0), im, train=False))(images)
    return model, variables


def _loss_fn(model):
    def f(params, batch_stats, images, targets, rng):
        losses, upd = model.apply(
            {"params": params, "batch_stats": batch_stats},
            images,
            targets,
            train=True,
            rng=rng,
            mutable=["batch_stats"],
        )
        return sum(losses.values()), (losses, upd["batch_stats"])

    return jax.value_and_grad(f, has_aux=True)


def test_train_step_compiles_once_and_sharding_matches(model_and_vars):
    model, variables = model_and_vars
    step = jax.jit(_loss_fn(model))
    params, bstats = variables["params"], variables["batch_stats"]
    results = []
    for seed in (1, 2):
        images, targets = _batch(seed)
        (total, (losses, new_bs)), grads = step(
            params, bstats, images, targets, jax.random.PRNGKey(seed)
        )
        results.append((total, losses, new_bs, grads))
    assert step._cache_size() == 1
    total, losses, new_bs, grads = results[0]
    names = {"rpn/cls", "rpn/box", "mask"} | {
        f"stage{k}/{n}" for k in range(3) for n in ("cls", "box", "level")
    }
    assert set(losses) == names
    for k, v in losses.items():
        assert np.isfinite(float(v)) and float(v) > 0, (k, v)
    for path, g in jax.tree_util.tree_leaves_with_path(grads):
        g = np.asarray(g)
        assert np.all(np.isfinite(g)), path
        assert np.any(g != 0), jax.tree_util.keystr(path)
    # BN running statistics moved.
    assert not np.allclose(
        np.asarray(new_bs["backbone"]["stem_norm"]["mean"]),
        np.asarray(bstats["backbone"]["stem_norm"]["mean"]),
    )

    # Same step with the batch sharded over 8 devices (BN statistics, losses and gradients
    # reduce over the global batch): equal to the single-device result up to float32
    # reduction order.
    devices = np.array(jax.devices()[:8])
    assert devices.size == 8, "conftest forces 8 host devices"
    mesh = Mesh(devices, ("data",))
    data = NamedSharding(mesh, P("data"))
    repl = NamedSharding(mesh, P())
    images, targets = _batch(1)
    sharded = jax.jit(
        _loss_fn(model),
        in_shardings=(repl, repl, data, data, repl),
        out_shardings=repl,
    )
    (s_total, (s_losses, s_bs)), s_grads = sharded(
        params, bstats, images, targets, jax.random.PRNGKey(1)
    )
    np.testing.assert_allclose(float(s_total), float(total), rtol=2e-4)
    for k in losses:
        np.testing.assert_allclose(float(s_losses[k]), float(losses[k]), rtol=2e-4, atol=1e-6)
    flat_a = jax.tree_util.tree_leaves(grads)
    flat_b = jax.tree_util.tree_leaves(s_grads)
    for a, b in zip(flat_a, flat_b):
        a, b = np.asarray(a), np.asarray(b)
        np.testing.assert_allclose(b, a, rtol=2e-3, atol=2e-4 * np.abs(a).max() + 1e-8)
    for a, b in zip(jax.tree_util.tree_leaves(new_bs), jax.tree_util.tree_leaves(s_bs)):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-4, atol=1e-5)


def test_level_loss_weight_zero_is_the_detector_without_a_level_head(model_and_vars):
    """`level_loss_weight=0` (the paper's "plain" row): the level losses are 0, the level head
    gets no gradient, and every other gradient is that of the ordinary model's losses without
    the level terms (what a detector without the head trains on)."""
    model, variables = model_and_vars
    plain = D.CascadeMaskRCNN(dataclasses.replace(CFG, level_loss_weight=0.0))
    images, targets = _batch(1)

    def losses_of(m, params):
        out, _ = m.apply(
            {"params": params, "batch_stats": variables["batch_stats"]}, images, targets,
            train=True, rng=jax.random.PRNGKey(1), mutable=["batch_stats"],
        )
        return out

    def both(params):
        g0, l0 = jax.grad(lambda p: (lambda o: (sum(o.values()), o))(losses_of(plain, p)),
                          has_aux=True)(params)
        g1 = jax.grad(
            lambda p: sum(v for k, v in losses_of(model, p).items() if not k.endswith("/level"))
        )(params)
        return g0, l0, g1

    g0, l0, g1 = jax.jit(both, compiler_options=FAST_JIT)(variables["params"])
    for k in range(3):
        assert float(l0[f"stage{k}/level"]) == 0.0
    flat1 = dict(jax.tree_util.tree_leaves_with_path(g1))
    heads = 0
    for path, a in jax.tree_util.tree_leaves_with_path(g0):
        a, b = np.asarray(a), np.asarray(flat1[path])
        if "level_predictor" in jax.tree_util.keystr(path):
            heads += 1
            assert not np.any(a), path
            continue
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6 * np.abs(b).max() + 1e-12,
                                   err_msg=jax.tree_util.keystr(path))
    assert heads == 2 * CFG.num_stages  # kernel and bias of each stage's level predictor


def test_inference_outputs_and_errors(model_and_vars):
    model, variables = model_and_vars
    images = _batch(3)[0][:2]
    sizes = np.tile(np.array([[H, W]], np.int32), (2, 1))
    sizes[0] = (40, 50)
    det = jax.jit(lambda v, im, s: model.apply(v, im, train=False, image_sizes=s))(
        variables, images, sizes
    )
    d = CFG.detections_per_image
    assert det["boxes"].shape == (2, d, 4) and det["scores"].shape == (2, d)
    assert det["level_probs"].shape == (2, d, 3) and det["masks"].shape == (2, d, 28, 28)
    assert det["valid"].shape == (2, d) and det["valid"].any()
    s = np.asarray(det["scores"])
    v = np.asarray(det["valid"])
    assert np.all(np.diff(np.where(v, s, -1.0), axis=1) <= 1e-7)  # descending
    assert np.all((s[v] > 0) & (s[v] <= 1))
    bx = np.asarray(det["boxes"])
    assert bx[0, :, 2].max() <= 50 and bx[0, :, 3].max() <= 40  # clipped to the content
    m = np.asarray(det["masks"])
    assert np.all((m >= 0) & (m <= 1))
    pasted = D.paste_detection_masks(det, H, W)
    assert pasted.shape == (2, d, H, W) and pasted.dtype == jnp.bool_
    assert not np.asarray(pasted)[~v].any()
    with pytest.raises(ValueError, match="multiples of 32"):
        model.apply(variables, images[:, :60], train=False)
    with pytest.raises(ValueError, match="targets"):
        model.apply(
            variables, images, None, train=True, rng=jax.random.PRNGKey(0), mutable=["batch_stats"]
        )


def test_normalize_images():
    x = np.full((1, 2, 2, 3), 255, np.uint8)
    y = np.asarray(D.normalize_images(x))
    np.testing.assert_allclose(
        y[0, 0, 0], (255 - np.array(D.PIXEL_MEAN)) / np.array(D.PIXEL_STD), rtol=1e-6
    )


def _np_decode(deltas, boxes):
    # detectron2 Box2BoxTransform.apply_deltas with weights (1, 1, 1, 1), float64.
    w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    cx, cy = boxes[:, 0] + 0.5 * w, boxes[:, 1] + 0.5 * h
    clamp = np.log(1000.0 / 16)
    dw, dh = np.minimum(deltas[:, 2], clamp), np.minimum(deltas[:, 3], clamp)
    pcx, pcy = deltas[:, 0] * w + cx, deltas[:, 1] * h + cy
    pw, ph = np.exp(dw) * w, np.exp(dh) * h
    return np.stack([pcx - 0.5 * pw, pcy - 0.5 * ph, pcx + 0.5 * pw, pcy + 0.5 * ph], 1)


def test_find_top_proposals_matches_detectron2_transcription():
    """detectron2's find_top_rpn_proposals for one image, transcribed in float64 NumPy with
    torchvision's batched_nms as the oracle."""
    import torchvision

    from hassod_jax.models.rpn import find_top_proposals

    r = np.random.default_rng(5)
    sizes = (60, 30, 12)
    anchors, logits, deltas = [], [], []
    for n in sizes:
        xy = r.uniform(-10, 70, size=(n, 2))
        wh = r.uniform(4, 40, size=(n, 2))
        anchors.append(np.concatenate([xy, xy + wh], 1).astype(np.float32))
        logits.append(r.normal(size=n).astype(np.float32))
        deltas.append((r.normal(size=(n, 4)) * 0.3).astype(np.float32))
    # A top-scoring anchor moved fully outside the image: empty once clipped, must be dropped.
    logits[0][3], deltas[0][3] = 10.0, (-30.0, -30.0, 0.0, 0.0)
    h, w, pre, post = 60.0, 80.0, 20, 25
    boxes, scores, valid = jax.jit(
        lambda lg, dl, an: find_top_proposals(
            lg, dl, an, jnp.asarray([h, w]), pre_nms_topk=pre, post_nms_topk=post, nms_thresh=0.65
        )
    )(logits, deltas, anchors)

    cand_b, cand_s, cand_l = [], [], []
    for lvl, (lg, dl, an) in enumerate(zip(logits, deltas, anchors)):
        idx = np.argsort(-lg, kind="stable")[: min(pre, len(lg))]
        cand_b.append(_np_decode(dl[idx].astype(np.float64), an[idx].astype(np.float64)))
        cand_s.append(lg[idx].astype(np.float64))
        cand_l.append(np.full(len(idx), lvl))
    b, s, lv = map(np.concatenate, (cand_b, cand_s, cand_l))
    b[:, [0, 2]] = b[:, [0, 2]].clip(0, w)
    b[:, [1, 3]] = b[:, [1, 3]].clip(0, h)
    keep = (b[:, 2] > b[:, 0]) & (b[:, 3] > b[:, 1])
    assert not keep[0]
    b, s, lv = b[keep], s[keep], lv[keep]
    k = torchvision.ops.batched_nms(
        torch.from_numpy(b), torch.from_numpy(s), torch.from_numpy(lv), 0.65
    ).numpy()[:post]
    v = np.asarray(valid)
    assert v.sum() == len(k)
    np.testing.assert_allclose(np.asarray(boxes)[v], b[k], rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(np.asarray(scores)[v], s[k], rtol=1e-6)
