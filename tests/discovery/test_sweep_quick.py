"""The threshold sweep's cost made visible and the quick curve: the log reports each threshold
as it is done (with the run's ETA), and `--config.refine=False` scores the raw HAC masks
without a single CRF. The raw masks are checked against torch's bilinear interpolation and
scipy's hole filling, written out here."""

import json
import logging
import re

import numpy as np
import pytest

from hassod_jax import defaults, utils
from hassod_jax.discovery import crf, pipeline
from hassod_jax.modes import discovery as discovery_modes
from tests.discovery.test_pipeline import FAST, _write_images

THRESHOLDS = (0.1, 0.2, 0.3)


def _sweep_config(images, **fields):
    c = defaults.sweep()
    c.images = str(images)
    c.thresholds = THRESHOLDS
    for k, v in {**FAST, **fields}.items():
        c[k] = v
    return c


def test_refine_false_gives_the_raw_hac_masks_without_a_crf(tmp_path, monkeypatch):
    torch = pytest.importorskip("torch")
    from pycocotools import mask as mask_utils
    from scipy import ndimage

    rng = np.random.default_rng(0)
    labels = rng.integers(0, 4, (20, 20))
    labels[5:15, 5:15] = 4  # one large region, with a hole of another region inside it
    labels[9:11, 9:11] = 5
    regions = np.stack([labels == k for k in range(6)])
    size, orig = 160, (300, 410)

    def no_crf(*a, **k):
        raise AssertionError("refine=False must not run a CRF")

    monkeypatch.setattr(crf, "get_crf_fn", no_crf)
    job = {
        "uint8": rng.integers(0, 255, (size, size, 3), dtype=np.uint8),
        "height": orig[0],
        "width": orig[1],
        "regions": regions,
        "q": None,
        "refine": False,
        "min_area": 100,
        "crf_kwargs": {},
    }
    got = pipeline.refine_job(job)

    # Reference: torch's bilinear (align_corners False) to the CRF's size, then to the
    # original size, >= 0.5; area >= 100 and at most 2 corners; holes filled.
    t = torch.from_numpy(regions.astype(np.float32))[None]
    p = torch.nn.functional.interpolate(t, (size, size), mode="bilinear", align_corners=False)
    big = torch.nn.functional.interpolate(p, orig, mode="bilinear", align_corners=False)[0]
    want, near = [], []
    for m, v in zip((big >= 0.5).numpy(), big.numpy()):
        corners = int(m[0, 0]) + int(m[0, -1]) + int(m[-1, 0]) + int(m[-1, -1])
        if m.sum() >= 100 and corners <= 2:
            want.append(ndimage.binary_fill_holes(m))
            near.append(np.abs(v - 0.5) < 1e-5)  # float32 rounding may fall either side
    assert len(got) == len(want) >= 3
    for a, w, n in zip(got, want, near):
        g = mask_utils.decode(a["segmentation"]).astype(bool)
        assert n.sum() < 0.01 * n.size  # one-hot regions put many values at exactly 0.5
        np.testing.assert_array_equal(g[~n], w[~n])
    assert any(w.sum() > (big[4] >= 0.5).sum() for w in want)  # a hole was filled


def test_sweep_logs_each_threshold_and_refine_false_is_the_quick_curve(tmp_path, caplog):
    _write_images(tmp_path / "imgs", 3)
    with caplog.at_level(logging.INFO):
        full = discovery_modes.run_sweep(_sweep_config(tmp_path / "imgs"), str(tmp_path / "full"))
    lines = [r.getMessage() for r in caplog.records if "refinements" in r.getMessage()]
    assert lines[0].startswith("3 images x 3 thresholds = 9 refinements")
    per_threshold = [ln for ln in lines if re.match(r"θ=", ln)]
    assert [re.match(r"θ=([\d.]+) \((\d)/3\)", ln).groups() for ln in per_threshold] == [
        ("0.1", "1"),
        ("0.2", "2"),
        ("0.3", "3"),
    ]
    assert all("ETA" in ln and "3 images" in ln for ln in per_threshold)
    assert "3/9 refinements" in per_threshold[0] and "9/9 refinements" in per_threshold[-1]
    assert full["refine"] is True

    caplog.clear()
    with caplog.at_level(logging.INFO):
        quick = discovery_modes.run_sweep(
            _sweep_config(tmp_path / "imgs", refine=False), str(tmp_path / "q")
        )
    assert quick["refine"] is False
    assert json.load(open(tmp_path / "q" / "sweep" / "sweep.json"))["refine"] is False
    msgs = [r.getMessage() for r in caplog.records]
    assert any("refine=False: raw HAC masks" in m for m in msgs)
    assert sum(bool(re.match(r"θ=[\d.]+ \(\d/3\) raw", m)) for m in msgs) == 3
    # the same merge sequences: the same regions; the raw masks are not the refined ones
    for name in ("0.1", "0.2", "0.3"):
        assert (
            quick["statistics"][name]["regions_per_image"]
            == full["statistics"][name]["regions_per_image"]
        )
    assert quick["statistics"] != full["statistics"]


def test_a_workdir_is_not_resumed_with_the_other_refine(tmp_path):
    _write_images(tmp_path / "imgs", 2)
    discovery_modes.run_sweep(_sweep_config(tmp_path / "imgs", refine=False), str(tmp_path / "w"))
    with pytest.raises(utils.ConfigError, match="refine: False -> True"):
        discovery_modes.run_sweep(_sweep_config(tmp_path / "imgs"), str(tmp_path / "w"))
    # a record written before the field existed means refine=True
    path = tmp_path / "w2" / "pseudo_labels" / "work" / "config.json"
    c = _sweep_config(tmp_path / "imgs", mode="discover")
    record = pipeline._settings_snapshot(c)
    del record["refine"]
    utils.atomic_write_json(str(path), record)
    pipeline._check_resume_config(str(tmp_path / "w2" / "pseudo_labels"), c)  # no error
    c.refine = False
    with pytest.raises(utils.ConfigError, match="refine: True -> False"):
        pipeline._check_resume_config(str(tmp_path / "w2" / "pseudo_labels"), c)
