"""Detector losses against torch / torchvision and float64 NumPy transcriptions."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
torchvision = pytest.importorskip("torchvision")

import jax  # noqa: E402

from hassod_jax.train import losses as _losses  # noqa: E402


class L:
    # Jitted once per function: eager dispatch of many tiny ops is slow on a busy CPU.
    bce_with_logits = staticmethod(jax.jit(_losses.bce_with_logits))
    softmax_cross_entropy = staticmethod(jax.jit(_losses.softmax_cross_entropy))
    sigmoid_focal_loss = staticmethod(jax.jit(_losses.sigmoid_focal_loss))
    rpn_losses = staticmethod(jax.jit(_losses.rpn_losses, static_argnums=4))
    droploss_weights = staticmethod(jax.jit(_losses.droploss_weights, static_argnums=3))
    fast_rcnn_losses = staticmethod(jax.jit(_losses.fast_rcnn_losses))
    level_loss = staticmethod(jax.jit(_losses.level_loss))
    mask_loss = staticmethod(jax.jit(_losses.mask_loss))


RTOL = 1e-5


def _rng(seed=0):
    return np.random.default_rng(seed)


def test_sigmoid_focal_loss_matches_torchvision():
    r = _rng(0)
    x = (r.normal(size=(37, 3)) * 4).astype(np.float32)
    t = (r.random((37, 3)) < 0.3).astype(np.float32)
    ref = torchvision.ops.sigmoid_focal_loss(
        torch.from_numpy(x), torch.from_numpy(t), alpha=0.25, gamma=2.0, reduction="none"
    ).numpy()
    np.testing.assert_allclose(np.asarray(L.sigmoid_focal_loss(x, t)), ref, rtol=RTOL, atol=1e-7)


def test_bce_and_ce_match_torch():
    r = _rng(1)
    x = (r.normal(size=(5, 7, 7)) * 10).astype(np.float32)
    z = (r.random((5, 7, 7)) < 0.5).astype(np.float32)
    ref = torch.nn.functional.binary_cross_entropy_with_logits(
        torch.from_numpy(x), torch.from_numpy(z), reduction="none"
    ).numpy()
    np.testing.assert_allclose(np.asarray(L.bce_with_logits(x, z)), ref, rtol=RTOL, atol=1e-6)
    logits = (r.normal(size=(11, 2)) * 3).astype(np.float32)
    labels = r.integers(0, 2, size=11)
    ref = torch.nn.functional.cross_entropy(
        torch.from_numpy(logits), torch.from_numpy(labels), reduction="none"
    ).numpy()
    np.testing.assert_allclose(
        np.asarray(L.softmax_cross_entropy(logits, labels)), ref, rtol=RTOL, atol=1e-6
    )


def test_rpn_losses_detectron2_normalisation():
    r = _rng(2)
    b, n, bs = 2, 50, 16
    obj = r.normal(size=(b, n)).astype(np.float32)
    pd = r.normal(size=(b, n, 4)).astype(np.float32)
    gd = r.normal(size=(b, n, 4)).astype(np.float32)
    labels = r.choice([-1, 0, 1], size=(b, n))
    gd[labels != 1] = np.nan  # unused targets must not leak into the loss
    cls, box = L.rpn_losses(obj, pd, gd, labels, bs)
    sel = labels >= 0
    ref_cls = torch.nn.functional.binary_cross_entropy_with_logits(
        torch.from_numpy(obj[sel]).double(),
        torch.from_numpy((labels[sel] == 1).astype(np.float64)),
        reduction="sum",
    ).item() / (bs * b)
    pos = labels == 1
    ref_box = np.abs(pd[pos].astype(np.float64) - gd[pos]).sum() / (bs * b)
    np.testing.assert_allclose(float(cls), ref_cls, rtol=RTOL)
    np.testing.assert_allclose(float(box), ref_box, rtol=RTOL)


def _np_iou(a, b):
    a, b = a.astype(np.float64), b.astype(np.float64)
    area = lambda x: (x[:, 2] - x[:, 0]) * (x[:, 3] - x[:, 1])  # noqa: E731
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    wh = np.clip(rb - lt, 0, None)
    inter = wh[..., 0] * wh[..., 1]
    return inter / (area(a)[:, None] + area(b)[None] - inter)


def test_fast_rcnn_losses_with_droploss():
    # Crafted: gt at [0,0,10,10] and [50,50,60,60] (third slot padding).
    gt = np.array([[0, 0, 10, 10], [50, 50, 60, 60], [100, 100, 120, 120]], np.float32)
    gv = np.array([True, True, False])
    pred = np.array(
        [
            [0, 0, 10, 10],  # IoU 1
            [9.95, 9.95, 20, 20],  # overlaps gt0 by 0.05^2 -> IoU ~2.5e-5 <= 0.01: dropped
            [30, 30, 40, 40],  # no overlap: dropped
            [100, 100, 120, 120],  # only overlaps the padding gt: dropped
            [55, 55, 65, 65],  # IoU 25/175 with gt1: kept
        ],
        np.float32,
    )
    w = np.asarray(L.droploss_weights(pred, gt, gv, 0.01))
    np.testing.assert_array_equal(w, [1, 0, 0, 0, 1])
    iou = _np_iou(pred, gt[gv]).max(1)
    np.testing.assert_array_equal(w, (iou > 0.01).astype(np.float32))

    r = _rng(3)
    b, n = 2, 5
    logits = r.normal(size=(b, n, 2)).astype(np.float32)
    pd = r.normal(size=(b, n, 4)).astype(np.float32)
    gd = r.normal(size=(b, n, 4)).astype(np.float32)
    is_fg = np.array([[1, 0, 0, 1, 0], [0, 1, 0, 0, 0]], bool)
    valid = np.array([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]], bool)
    weights = np.stack([w, np.array([1, 1, 0, 1, 1], np.float32)])
    gd[~(is_fg & valid)] = np.inf
    cls, box = L.fast_rcnn_losses(logits, pd, gd, is_fg, valid, weights)
    ce = torch.nn.functional.cross_entropy(
        torch.from_numpy(logits.reshape(-1, 2)).double(),
        torch.from_numpy(np.where(is_fg, 0, 1).reshape(-1)),
        reduction="none",
    ).numpy()
    wv = (weights * valid).reshape(-1)
    # CutLER: (weights * ce).mean() over all (valid) proposals.
    np.testing.assert_allclose(float(cls), (ce * wv).sum() / valid.sum(), rtol=RTOL)
    assert (ce * wv).sum() / valid.sum() != pytest.approx((ce * wv).sum() / wv.sum())
    fg = (is_fg & valid).reshape(-1)
    ref_box = np.abs(pd.reshape(-1, 4)[fg] - gd.reshape(-1, 4)[fg]).sum() / valid.sum()
    np.testing.assert_allclose(float(box), ref_box, rtol=RTOL)
    # DropLoss off: plain mean CE over the valid proposals (detectron2).
    cls_plain, _ = L.fast_rcnn_losses(logits, pd, gd, is_fg, valid, None)
    np.testing.assert_allclose(float(cls_plain), ce[valid.reshape(-1)].mean(), rtol=RTOL)


def test_level_and_mask_losses():
    r = _rng(4)
    b, n = 2, 6
    lvl_logits = (r.normal(size=(b, n, 3)) * 2).astype(np.float32)
    levels = r.integers(0, 3, size=(b, n))
    fg = r.random((b, n)) < 0.5
    fg[0, 0] = True
    got = float(L.level_loss(lvl_logits, levels, fg))
    onehot = np.eye(3)[levels]
    ref = torchvision.ops.sigmoid_focal_loss(
        torch.from_numpy(lvl_logits[fg]).double(),
        torch.from_numpy(onehot[fg]),
        alpha=0.25,
        gamma=2.0,
        reduction="mean",
    ).item()
    np.testing.assert_allclose(got, ref, rtol=RTOL)
    assert float(L.level_loss(lvl_logits, levels, np.zeros_like(fg))) == 0.0

    ml = (r.normal(size=(b, n, 28, 28)) * 3).astype(np.float32)
    mg = (r.random((b, n, 28, 28)) < 0.4).astype(np.float32)
    got = float(L.mask_loss(ml, mg, fg))
    ref = torch.nn.functional.binary_cross_entropy_with_logits(
        torch.from_numpy(ml[fg]).double(), torch.from_numpy(mg[fg]).double(), reduction="mean"
    ).item()
    np.testing.assert_allclose(got, ref, rtol=RTOL)
    assert float(L.mask_loss(ml, mg, np.zeros_like(fg))) == 0.0
