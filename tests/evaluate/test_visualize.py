"""Pictures: each instance its own colour and contour, the level as line style and tag, the
legend on the picture, one panel per level on request; the sweep plot; PNGs on disk."""

import json
import os

import numpy as np
import pytest
from PIL import Image

from hassod_jax.evaluate import visualize as V


def _scene():
    h, w = 120, 160
    img = np.full((h, w, 3), 90, np.uint8)
    yy, xx = np.mgrid[:h, :w]
    whole = (yy > 10) & (yy < 110) & (xx > 10) & (xx < 100)
    part = (yy - 60) ** 2 + (xx - 55) ** 2 < 25**2
    sub = (yy - 60) ** 2 + (xx - 55) ** 2 < 8**2
    other = (yy > 20) & (yy < 60) & (xx > 115) & (xx < 150)
    return img, np.stack([whole, part, sub, other]), np.array([0, 1, 2, 0])


def test_instance_colors_are_distinct():
    c = V.instance_colors(30)
    assert c.shape == (30, 3) and (c >= 0).all() and (c <= 1).all()
    d = np.abs(c[:, None] - c[None]).sum(-1) + np.eye(30) * 9
    assert d.min() > 0.05  # no two alike
    assert np.abs(np.diff(c, axis=0)).sum(-1).min() > 0.3  # neighbours far apart
    assert V.instance_colors(0).shape == (0, 3)


def _contours(ax):
    from matplotlib.contour import ContourSet

    return [c for c in ax.get_children() if isinstance(c, ContourSet)]


def test_each_instance_gets_its_colour_contour_style_tag_and_the_legend():
    img, masks, levels = _scene()
    scores = np.array([0.9, 0.8, 0.7, 0.6])
    fig = V.figure(img, [V.instance_set("detector", masks, levels, scores)])
    image_ax, ax = fig.axes
    assert image_ax.get_title() == "image 160x120" and ax.get_title() == "detector: 4"
    # One underlay and one coloured contour per instance; the coloured one in the instance's
    # colour and its level's line style (dashes for part and subpart, none for whole).
    sets = _contours(ax)
    assert len(sets) == 8
    colors = V.instance_colors(4)
    coloured = sets[1::2]
    order = [0, 1, 3, 2]  # drawn largest first
    for cs, i in zip(coloured, order):
        np.testing.assert_allclose(cs.get_edgecolor()[0][:3], colors[i], atol=1e-6)
        offset, dashes = cs.get_linestyle()[0]
        assert (dashes is None) == (levels[i] == 0), i
    part_dash = coloured[order.index(1)].get_linestyle()[0][1]
    sub_dash = coloured[order.index(2)].get_linestyle()[0][1]
    assert max(part_dash) > max(sub_dash)  # dashed vs dotted
    tags = sorted(t.get_text() for t in ax.texts)
    assert tags == ["P 0.80", "S 0.70", "W 0.60", "W 0.90"]
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert legend == ["W whole (2, solid)", "P part (1, dashed)", "S subpart (1, dotted)"]
    # The pixels: each instance's colour is on the picture (its contour), the fill is blended.
    picture = V.render(img, [V.instance_set("detector", masks, levels, scores)])
    flat = picture.reshape(-1, 3).astype(int)
    for c in colors:
        assert np.abs(flat - np.round(c * 255)).sum(-1).min() < 40, c


def test_one_panel_per_level_and_several_sets():
    img, masks, levels = _scene()
    sets = [("pseudo-labels", masks, levels), ("detector", masks[:2], levels[:2], [0.9, 0.5])]
    fig = V.figure(img, sets, by_level=True)
    titles = [ax.get_title() for ax in fig.axes]
    assert titles == [
        "pseudo-labels whole: 2",
        "pseudo-labels part: 1",
        "pseudo-labels subpart: 1",
        "detector whole: 1",
        "detector part: 1",
        "detector subpart: 0",
    ]
    assert [ax.get_legend() is not None for ax in fig.axes] == [True, False, False] * 2
    # An instance keeps its colour in its level's panel.
    whole_panel = _contours(fig.axes[0])[1::2]
    colors = {tuple(np.round(cs.get_edgecolor()[0][:3], 6)) for cs in whole_panel}
    assert colors == {tuple(np.round(V.instance_colors(4)[i], 6)) for i in (0, 3)}
    flat = V.figure(img, sets)
    assert [ax.get_title() for ax in flat.axes] == [
        "image 160x120",
        "pseudo-labels: 4",
        "detector: 2",
    ]


def test_max_instances_keeps_the_best_scores():
    img, masks, levels = _scene()
    fig = V.figure(img, [("d", masks, levels, [0.1, 0.9, 0.8, 0.2])], max_instances=2)
    ax = fig.axes[1]
    assert ax.get_title() == "d: 2 (+2 not drawn)"
    assert sorted(t.get_text() for t in ax.texts) == ["P 0.90", "S 0.80"]


def test_bad_inputs_name_the_problem():
    img, masks, levels = _scene()
    with pytest.raises(ValueError, match="masks are"):
        V.figure(img, [("x", masks[:, :50], levels)])
    with pytest.raises(ValueError, match="levels"):
        V.figure(img, [("x", masks, levels[:2])])
    with pytest.raises(ValueError, match="uint8"):
        V.figure(img.astype(np.float32), [("x", masks, levels)])


def test_save_picture_writes_a_png(tmp_path):
    img, masks, levels = _scene()
    path = tmp_path / "p.png"
    V.save_picture(str(path), img, [("labels", masks, levels)], panel_width=400)
    with Image.open(path) as im:
        assert im.format == "PNG" and im.size[0] == 800 and im.size[1] > 300
    V.save_picture(str(path), img, [("empty", masks[:0], levels[:0])])  # nothing to draw
    assert [f for f in os.listdir(tmp_path) if f.startswith(".tmp")] == []


def test_annotation_pictures_from_coco_dicts(tmp_path):
    from pycocotools import mask as mask_utils

    from hassod_jax.data.coco import rle_to_json

    img, masks, levels = _scene()
    Image.fromarray(img).save(tmp_path / "a.jpg")
    rles = mask_utils.encode(np.asfortranarray(masks.transpose(1, 2, 0).astype(np.uint8)))
    anns = [{"segmentation": rle_to_json(r), "hier_level": int(lv)} for r, lv in zip(rles, levels)]
    poly = [{"segmentation": [[10, 10, 50, 10, 50, 40, 10, 40]], "score": 0.7}]
    out = V.save_annotation_pictures(
        str(tmp_path / "pics"),
        str(tmp_path),
        [{"id": 3, "file_name": "a.jpg"}],
        {3: [("pseudo-labels", anns), ("detector", poly)]},
    )
    assert out == [str(tmp_path / "pics" / "a.png")]
    m = V.masks_of(poly, (120, 160))
    assert m.shape == (1, 120, 160) and m[0, 20, 30] and not m[0, 60, 100]


def test_sweep_plot(tmp_path):
    report = {
        "thresholds": [0.1, 0.2, 0.4],
        "images": 5,
        "statistics": {
            "0.1": {"regions_per_image": 3.0, "masks_per_image": 2.0},
            "0.2": {"regions_per_image": 6.0, "masks_per_image": 4.0},
            "0.4": {"regions_per_image": 20.0, "masks_per_image": 11.0},
            "ensemble": {"masks_per_image": 17.0},
        },
        "segm": {
            "0.1": {"AR@100": 0.1, "AP": 0.05},
            "0.2": {"AR@100": 0.2, "AP": 0.06},
            "0.4": {"AR@100": 0.3, "AP": 0.04},
            "ensemble": {"AR@100": 0.35, "AP": 0.05},
            "ensemble_0.1_0.2_0.4": {"AR@100": 0.35, "AP": 0.05},
        },
    }
    V.plot_sweep(str(tmp_path / "with_gt.png"), report)
    del report["segm"]
    V.plot_sweep(str(tmp_path / "without_gt.png"), report)
    with Image.open(tmp_path / "with_gt.png") as a, Image.open(tmp_path / "without_gt.png") as b:
        assert a.size[0] > 1.5 * b.size[0]  # two panels against one


def test_sweep_report_writes_the_plot_beside_the_table(tmp_path):
    from hassod_jax.discovery import sweep

    res = {"regions": [5, 2], "per_threshold": [[{}] * 3, [{}]], "ensemble": [{}] * 4}
    rows = [({"id": 1}, res), ({"id": 2}, res)]
    report = sweep.write_report(str(tmp_path), rows, [0.3, 0.1])
    assert json.loads((tmp_path / "sweep" / "sweep.json").read_text()) == report
    with Image.open(tmp_path / "sweep" / "sweep.png") as im:
        assert im.format == "PNG"
