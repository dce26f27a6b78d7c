"""The whole detector against detectron2 running HASSOD's own code (the d2_hassod_cascade
fixture: random weights, thin widths, three photos). Tolerances are the fixture README's
"Tolerances to expect from a float32 reimplementation"; detections are compared as sets
matched by IoU, never by index."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hassod_jax import ops
from hassod_jax.inference import predictor
from hassod_jax.inference import processing
from hassod_jax.models import detector as D
from hassod_jax.models.rpn import find_top_proposals
from tests.d2_fixture import fixture_path, greedy_match, load_npz

IMAGES = ("astronaut", "coffee", "chelsea")
TEST_SIZE = (320, 533)  # the fixture's INPUT.MIN_SIZE_TEST / MAX_SIZE_TEST


@pytest.fixture(scope="module")
def fx():
    root = fixture_path("model.pth", "outputs.npz")
    from hassod_jax.weights.detectron2 import load_detector

    module, variables = load_detector(f"{root}/model.pth")
    return module, variables, load_npz("outputs.npz")


def _parts(mm, x, sizes, stage_boxes, raw_boxes):
    bottom = mm.backbone(x, False)
    feats = mm.fpn(bottom, False)
    (logits, deltas, _), (props, _, pvalid) = mm.proposals(feats, sizes, False)
    tf = [mm.box_stage(feats, stage_boxes[k][None], k) for k in range(mm.config.num_stages)]
    return {
        "bottom": bottom,
        "feats": feats,
        "rpn_logits": jnp.concatenate(logits, axis=1)[0],
        "rpn_deltas": jnp.concatenate(deltas, axis=1)[0],
        "proposals": props[0],
        "proposal_valid": pvalid[0],
        "stages": [[a[0] for a in t] for t in tf],
        "mask_logits": mm.mask_logits(feats, raw_boxes[None])[0],
    }


@pytest.fixture(scope="module")
def parts(fx):
    module, variables, z = fx
    out = {}
    for name in IMAGES:
        rgb = z[f"{name}/input_rgb"]
        (ph, pw), (h, w) = z[f"{name}/padded_hw"], rgb.shape[:2]
        x = np.zeros((1, ph, pw, 3), np.float32)
        x[0, :h, :w] = np.asarray(D.normalize_images(rgb[None]))[0]  # normalise, then zero-pad
        stage_boxes = np.stack([z[f"{name}/stage{k}_proposal_boxes"] for k in range(3)])
        fn = jax.jit(lambda v, *a: module.apply(v, *a, method=_parts))
        res = fn(variables, x, np.asarray([[h, w]], np.int32), stage_boxes,
                 z[f"{name}/raw_pred_boxes"])
        out[name] = jax.device_get(res)
    return out


def test_loaded_architecture_is_the_fixtures(fx):
    module, variables, _ = fx
    cfg = module.config
    assert cfg.resnet.stage_sizes == (3, 4, 6, 3) and cfg.resnet.block == "bottleneck"
    assert (cfg.resnet.width, cfg.resnet.stem_width) == (16, 64)
    assert (cfg.fpn_channels, cfg.box_fc_dim, cfg.mask_head_dim) == (64, 256, 64)
    assert (cfg.num_levels, cfg.box_pooler_resolution, cfg.detections_per_image) == (3, 7, 1000)
    # The thin model's res2 block 0 has no shortcut (stem 64 == res2 out 64), as in detectron2.
    assert "shortcut" not in variables["params"]["backbone"]["res2_0"]


def test_backbone_and_fpn_maps(fx, parts):
    _, _, z = fx
    p = parts["astronaut"]
    for key in ("res2", "res3", "res4", "res5", "p2", "p3", "p4", "p5", "p6"):
        ours = (p["bottom"] if key.startswith("res") else p["feats"])[key][0].transpose(2, 0, 1)
        ref = z[f"astronaut/feat_{key}"]
        assert ours.shape == ref.shape, key
        err = np.abs(ours - ref).max() / np.abs(ref).max()
        assert err <= 1e-4, (key, err)


def test_anchors_and_rpn_head(fx, parts):
    module, _, z = fx
    cfg = module.config
    for name in IMAGES:
        p = parts[name]
        sizes = z[f"{name}/rpn_level_sizes"]
        hw = [tuple(f.shape[1:3]) for k, f in sorted(p["feats"].items())]
        anchors = np.concatenate(
            ops.generate_anchors(
                hw, D._RPN_STRIDES, [(s,) for s in cfg.anchor_sizes], cfg.aspect_ratios
            )
        )
        assert [int(np.prod(s)) * 3 for s in hw] == list(sizes)
        np.testing.assert_allclose(anchors, z[f"{name}/anchors"], rtol=0, atol=1e-4)
        assert np.abs(p["rpn_logits"] - z[f"{name}/rpn_objectness_logits"]).max() <= 2e-3
        assert np.abs(p["rpn_deltas"] - z[f"{name}/rpn_anchor_deltas"]).max() <= 2e-4


def test_rpn_postprocessing_on_the_fixtures_floats(fx):
    """detectron2's find_top_rpn_proposals on the fixture's own anchors, logits and deltas:
    the same proposals in the same order (up to an ulp of exp and ties)."""
    module, _, z = fx
    cfg = module.config
    for name in IMAGES:
        split = np.cumsum(z[f"{name}/rpn_level_sizes"])[:-1]
        lg = np.split(z[f"{name}/rpn_objectness_logits"], split)
        dl = np.split(z[f"{name}/rpn_anchor_deltas"], split)
        an = np.split(z[f"{name}/anchors"], split)
        h, w = z[f"{name}/input_hw"]
        boxes, scores, valid = jax.jit(
            lambda lg, dl, an, size: find_top_proposals(
                lg, dl, an, size, pre_nms_topk=cfg.rpn_pre_nms_topk_test,
                post_nms_topk=cfg.rpn_post_nms_topk_test, nms_thresh=cfg.rpn_nms_thresh,
            )
        )(lg, dl, an, np.asarray([h, w], np.float32))
        ref = z[f"{name}/rpn_proposal_boxes"]
        assert int(valid.sum()) == len(ref)
        boxes, scores = np.asarray(boxes)[: len(ref)], np.asarray(scores)[: len(ref)]
        same = np.all(np.abs(boxes - ref) <= 1e-3, axis=1)
        assert same.mean() >= 0.999, (name, same.mean())
        np.testing.assert_allclose(scores, z[f"{name}/rpn_proposal_logits"], rtol=0, atol=1e-6)


def test_rpn_proposals_end_to_end_as_sets(fx, parts):
    _, _, z = fx
    for name in IMAGES:
        p = parts[name]
        ours = p["proposals"][p["proposal_valid"]]
        ref = z[f"{name}/rpn_proposal_boxes"]
        assert len(ours) == len(ref)
        iou = np.asarray(ops.box_iou(ref, ours))
        assert (iou.max(axis=1) > 0.999).mean() >= 0.99, name


def test_cascade_heads_teacher_forced(fx, parts):
    _, _, z = fx
    for name in IMAGES:
        for k, (cls, deltas, lvl) in enumerate(parts[name]["stages"]):
            e_cls = np.abs(cls - z[f"{name}/stage{k}_cls_logits"]).max()
            e_box = np.abs(deltas - z[f"{name}/stage{k}_box_deltas"]).max()
            e_lvl = np.abs(lvl - z[f"{name}/stage{k}_level_logits"]).max()
            assert e_cls <= 1e-3 and e_lvl <= 1e-3 and e_box <= 5e-4, (name, k, e_cls, e_lvl, e_box)


def test_mask_head_teacher_forced(fx, parts):
    _, _, z = fx
    for name in IMAGES:
        err = np.abs(parts[name]["mask_logits"] - z[f"{name}/raw_mask_logits"]).max()
        assert err <= 5e-3, (name, err)


def test_stage_averages_and_postprocessing_on_the_fixtures_floats(fx):
    """Softmax averages over the stages (scores AND levels) and fast_rcnn_inference reproduce
    the fixture's kept proposals, boxes, scores and levels exactly."""
    module, _, z = fx
    cfg = module.config
    for name in IMAGES:
        probs = [jax.nn.softmax(z[f"{name}/stage{k}_cls_logits"], axis=-1) for k in range(3)]
        lprobs = [jax.nn.softmax(z[f"{name}/stage{k}_level_logits"], axis=-1) for k in range(3)]
        np.testing.assert_allclose(sum(probs) / 3, z[f"{name}/mean_class_probs"], atol=1e-6)
        np.testing.assert_allclose(sum(lprobs) / 3, z[f"{name}/mean_level_probs"], atol=1e-6)
        # Sigmoid averages (our old rule) would give other levels: the softmax is what counts.
        sig = sum(jax.nn.sigmoid(z[f"{name}/stage{k}_level_logits"]) for k in range(3))
        assert (np.argmax(sig, -1) != np.argmax(z[f"{name}/mean_level_probs"], -1)).any()
        last = z[f"{name}/last_stage_pred_boxes"]
        n = len(last)
        det = jax.device_get(
            D.fast_rcnn_inference(
                last[None],
                z[f"{name}/mean_class_probs"][None, :, 0],
                z[f"{name}/mean_level_probs"][None],
                np.ones((1, n), bool),
                np.asarray([z[f"{name}/input_hw"]]),
                cfg,
            )
        )
        v = det["valid"][0]
        np.testing.assert_array_equal(det["index"][0][v], z[f"{name}/det_proposal_idx"])
        np.testing.assert_allclose(det["boxes"][0][v], z[f"{name}/raw_pred_boxes"], atol=1e-4)
        np.testing.assert_array_equal(det["scores"][0][v], z[f"{name}/raw_scores"])
        np.testing.assert_array_equal(det["levels"][0][v], z[f"{name}/raw_pred_levels"])


def test_detector_postprocess_on_the_fixtures_floats(fx):
    _, _, z = fx
    for name in IMAGES:
        oh, ow = z[f"{name}/orig_hw"]
        boxes, nonempty = processing.rescale_boxes(
            z[f"{name}/raw_pred_boxes"], z[f"{name}/input_hw"], (oh, ow)
        )
        np.testing.assert_array_equal(np.nonzero(nonempty)[0], z[f"{name}/final_to_raw"])
        np.testing.assert_allclose(boxes[nonempty], z[f"{name}/pred_boxes"], atol=1e-4)
        probs = jax.nn.sigmoid(z[f"{name}/raw_mask_logits"][z[f"{name}/final_to_raw"]])
        masks = processing.paste_masks_numpy(np.asarray(probs), z[f"{name}/pred_boxes"], oh, ow)
        differing = int((masks != z[f"{name}/pred_masks"]).sum())
        assert differing <= 10, (name, differing)  # the fixture's own numpy paste: 0 / 0 / 1


def test_final_detections_end_to_end(fx):
    """`detect` on the original photo (detectron2's ResizeShortestEdge(320, 533) included)
    against the DefaultPredictor's outputs, as sets matched by IoU."""
    skimage_data = pytest.importorskip("skimage.data")
    module, variables, z = fx
    for name in IMAGES:
        image = getattr(skimage_data, name)()
        resized = processing.resize_for_test(image, *TEST_SIZE)
        np.testing.assert_array_equal(resized, z[f"{name}/input_rgb"])
        got = predictor.detect(module, variables, image, short_edge=TEST_SIZE[0],
                             max_size=TEST_SIZE[1])
        ref_boxes, ref_scores = z[f"{name}/pred_boxes"], z[f"{name}/scores"]
        n, n_ref = len(got["scores"]), len(ref_scores)
        assert abs(n - n_ref) <= 0.01 * n_ref, (name, n, n_ref)
        assert np.all(np.diff(got["scores"]) <= 0)
        match, _ = greedy_match(got["boxes"], got["scores"], ref_boxes, 0.99)
        ok = match >= 0
        assert ok.sum() >= 0.99 * n_ref, (name, ok.sum(), n_ref)
        j = match[ok]
        assert np.abs(got["scores"][ok] - ref_scores[j]).max() <= 1e-3
        assert np.abs(got["boxes"][ok] - ref_boxes[j]).max() <= 0.5
        assert (got["levels"][ok] == z[f"{name}/pred_levels"][j]).mean() >= 0.99
        np.testing.assert_allclose(got["level_probs"][ok], z[f"{name}/level_probs"][j], atol=1e-3)
        ref_masks = z[f"{name}/pred_masks"]
        xor = (got["masks"][ok] ^ ref_masks[j]).sum(axis=(1, 2))
        union = (got["masks"][ok] | ref_masks[j]).sum(axis=(1, 2))
        assert (xor / np.maximum(union, 1)).mean() <= 5e-3, name
        assert got["masks"].shape[1:] == tuple(z[f"{name}/orig_hw"])
