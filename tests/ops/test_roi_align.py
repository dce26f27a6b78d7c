"""ROIAlign against torchvision.ops.roi_align (NCHW there, NHWC here), and the multi-level
pooler against a torch transcription of detectron2's ROIPooler (level assignment + one
torchvision roi_align per level)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torchvision

from hassod_jax.ops import multilevel_roi_align, roi_align


def _boxes(rng, b, k, img_h, img_w, max_frac=0.9):
    x = rng.uniform(-0.1 * img_w, img_w, (b, k, 1))
    y = rng.uniform(-0.1 * img_h, img_h, (b, k, 1))
    w = rng.uniform(0.0, max_frac * img_w, (b, k, 1))
    h = rng.uniform(0.0, max_frac * img_h, (b, k, 1))
    return np.concatenate([x, y, x + w, y + h], axis=-1).astype(np.float32)


def _tv_roi_align(feats_nhwc, boxes, s, scale, sr, aligned):
    b, k = boxes.shape[:2]
    rois = torch.cat(
        [torch.arange(b).repeat_interleave(k)[:, None].float(), torch.tensor(boxes).reshape(-1, 4)],
        dim=1,
    )
    x = torch.tensor(feats_nhwc).permute(0, 3, 1, 2)
    out = torchvision.ops.roi_align(x, rois, s, scale, sr, aligned)
    return out.permute(0, 2, 3, 1).reshape(b, k, s, s, -1).numpy()


def _assert_close(got, ref):
    # float32 sums of up to a few hundred taps: 1e-5 relative to the output scale.
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())


ALL_MODES = [(sr, al) for sr in (1, 2, 0) for al in (True, False)]


@pytest.mark.parametrize(
    "b,h,w,c,k,s,stride,modes",
    [
        (2, 13, 17, 3, 11, 7, 4, ALL_MODES),
        (1, 24, 9, 2, 20, 5, 2, [(1, True), (2, True), (0, True)]),
        (3, 6, 6, 4, 5, 2, 1, [(0, True), (2, False)]),
    ],
)
def test_roi_align_matches_torchvision(b, h, w, c, k, s, stride, modes):
    rng = np.random.default_rng(h * w + k)
    feats = rng.normal(size=(b, h, w, c)).astype(np.float32)
    boxes = _boxes(rng, b, k, h * stride, w * stride)
    scale = 1.0 / stride
    for sr, aligned in modes:
        fn = jax.jit(
            lambda f, bx, sr=sr, al=aligned: roi_align(
                f,
                bx,
                output_size=s,
                spatial_scale=scale,
                sampling_ratio=sr,
                aligned=al,
                max_sampling=1024,
            )
        )
        got = np.asarray(fn(feats, boxes))
        assert got.shape == (b, k, s, s, c)
        _assert_close(got, _tv_roi_align(feats, boxes, s, scale, sr, aligned))


@jax.jit
def _adaptive_default_cap(f, bx):
    return roi_align(f, bx, output_size=4, spatial_scale=1.0, sampling_ratio=0)


@jax.jit
def _adaptive_cap100(f, bx):
    return roi_align(f, bx, output_size=4, spatial_scale=1.0, sampling_ratio=0, max_sampling=100)


def test_adaptive_cap_is_exact_below_it_and_bounded_above():
    """The default cap (64 samples per bin, gh * gw) is exact for every box within it, however
    thin (one axis may need many samples); only boxes needing more are approximated."""
    rng = np.random.default_rng(5)
    feats = rng.normal(size=(1, 40, 300, 2)).astype(np.float32)
    s = 4
    # roi sizes up to 32 px -> at most 8 x 8 = 64 samples: exact.
    small = _boxes(rng, 1, 30, 32, 32, max_frac=1.0)
    # Thin boxes: 250 x 3 px -> 63 x 1 samples per bin; 3 x 39 px -> 1 x 10.
    thin = np.array([[[10.0, 5.0, 260.0, 8.0], [40.0, 0.5, 43.0, 39.5]]], np.float32)
    for bx in (small, thin):
        got = _adaptive_default_cap(feats, bx)
        _assert_close(np.asarray(got), _tv_roi_align(feats, bx, s, 1.0, 0, True))
    # A 40 x 40 px box needs 10 x 10 = 100 samples: approximated with the cap 64.
    big = np.array([[[0.0, 0.0, 40.0, 40.0]]], np.float32)
    approx = np.asarray(_adaptive_default_cap(feats, big))
    exact = np.asarray(_adaptive_cap100(feats, big))
    _assert_close(exact, _tv_roi_align(feats, big, s, 1.0, 0, True))
    assert not np.allclose(approx, exact, rtol=1e-5, atol=1e-6)
    assert np.abs(approx - exact).max() < 0.1 * np.abs(exact).max()


def test_roi_align_gradient_matches_torch():
    rng = np.random.default_rng(6)
    feats = rng.normal(size=(2, 9, 11, 3)).astype(np.float32)
    boxes = _boxes(rng, 2, 6, 36, 44)
    cot = rng.normal(size=(2, 6, 3, 3, 3)).astype(np.float32)

    def loss(f):
        out = roi_align(f, boxes, output_size=3, spatial_scale=0.25, sampling_ratio=0)
        return jnp.sum(out * cot)

    got = np.asarray(jax.jit(jax.grad(loss))(feats))
    x = torch.tensor(feats).permute(0, 3, 1, 2).requires_grad_(True)
    rois = torch.cat(
        [torch.arange(2).repeat_interleave(6)[:, None].float(), torch.tensor(boxes).reshape(-1, 4)],
        1,
    )
    out = torchvision.ops.roi_align(x, rois, 3, 0.25, 0, True)
    (out * torch.tensor(cot).reshape(12, 3, 3, 3).permute(0, 3, 1, 2)).sum().backward()
    ref = x.grad.permute(0, 2, 3, 1).numpy()
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())


def _d2_pooler(feats, boxes, s, strides, sr, canonical_size=224, canonical_level=4):
    """detectron2 ROIPooler (ROIAlignV2): assign_boxes_to_levels then one torchvision
    roi_align per level with aligned=True, scattered back."""
    b, k = boxes.shape[:2]
    flat = torch.tensor(boxes).reshape(-1, 4)
    rois = torch.cat([torch.arange(b).repeat_interleave(k)[:, None].float(), flat], 1)
    min_level = -math.log2(1.0 / strides[0])
    max_level = -math.log2(1.0 / strides[-1])
    area = (flat[:, 2] - flat[:, 0]) * (flat[:, 3] - flat[:, 1])
    lvl = torch.floor(canonical_level + torch.log2(torch.sqrt(area) / canonical_size + 1e-8))
    lvl = torch.clamp(lvl, min=min_level, max=max_level).to(torch.int64) - int(min_level)
    c = feats[0].shape[-1]
    out = torch.zeros(b * k, c, s, s)
    for i, (f, st) in enumerate(zip(feats, strides)):
        sel = torch.nonzero(lvl == i).squeeze(1)
        x = torch.tensor(f).permute(0, 3, 1, 2)
        out[sel] = torchvision.ops.roi_align(x, rois[sel], s, 1.0 / st, sr, True)
    return out.permute(0, 2, 3, 1).reshape(b, k, s, s, c).numpy(), lvl.numpy()


@pytest.mark.parametrize("sr", [0, 2])
def test_multilevel_roi_align_matches_detectron2_pooler(sr):
    rng = np.random.default_rng(10 + sr)
    img_h, img_w = 480, 640
    strides = (4, 8, 16, 32)
    feats = [rng.normal(size=(2, img_h // st, img_w // st, 3)).astype(np.float32) for st in strides]
    # Mix of sizes so that every level receives boxes.
    boxes = np.concatenate(
        [_boxes(rng, 2, 8, img_h, img_w, max_frac=f) for f in (0.1, 0.3, 0.6, 1.0)]
        + [np.array([[[10.0, 20.0, 600.0, 470.0]], [[-20.0, 0.0, 700.0, 400.0]]], np.float32)]
        # Long thin boxes on P2/P3 need many samples along one axis (32 x 1 and 1 x 24 per bin).
        + [np.array([[[5.0, 100.0, 630.0, 108.0]], [[300.0, 2.0, 310.0, 470.0]]], np.float32)],
        axis=1,
    )
    ref, lvl = _d2_pooler(feats, boxes, 5, strides, sr)
    assert set(lvl.tolist()) == {0, 1, 2, 3}
    fn = jax.jit(
        lambda fs, bx: multilevel_roi_align(
            fs, bx, output_size=5, strides=strides, sampling_ratio=sr
        )
    )
    got = np.asarray(fn(feats, boxes))
    _assert_close(got, ref)


def test_roi_align_bad_input():
    f = np.zeros((1, 4, 4, 2), np.float32)
    with pytest.raises(ValueError, match="roi_align.py.*boxes"):
        roi_align(
            f, np.zeros((2, 3, 4), np.float32), output_size=2, spatial_scale=1.0, sampling_ratio=0
        )
    with pytest.raises(ValueError, match="sampling_ratio"):
        roi_align(
            f, np.zeros((1, 3, 4), np.float32), output_size=2, spatial_scale=1.0, sampling_ratio=-1
        )
    with pytest.raises(ValueError, match="strides"):
        multilevel_roi_align(
            [f, f], np.zeros((1, 3, 4), np.float32), output_size=2, strides=(4, 16)
        )
