"""Stage 1 error paths: each bad setting stops with a one-line message naming its flag, before
anything is written (a corrected rerun in the same --workdir then just runs), and merges of
sharded runs refuse mixed, missing or mismatched shards. Includes the multi-job sweep merge.
"""

import json
import os

import pytest

from hassod_jax import defaults, utils
from hassod_jax.discovery import pipeline
from hassod_jax.modes import discovery as discovery_modes
from tests.discovery.test_pipeline import FAST, _config, _load, _write_images


def _one_line(excinfo, *needles):
    message = str(excinfo.value)
    assert "\n" not in message, message
    for needle in needles:
        assert needle in message, (needle, message)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("imgs")
    _write_images(folder, 3)
    return folder


@pytest.mark.parametrize(
    "overrides,error,needles",
    [
        (dict(crf_backend="cuda"), utils.ConfigError, ["config.crf_backend", "'cuda'"]),
        (dict(backbone="vit"), utils.ConfigError, ["config.backbone", "'vit'", "--config"]),
        (dict(backbone="dino"), utils.ConfigError, ["--config.dino_checkpoint"]),
        (
            dict(backbone="dino", dino_checkpoint="/nowhere/dino.pth"),
            FileNotFoundError,
            ["/nowhere/dino.pth", "--config.dino_checkpoint"],
        ),
        (dict(thresholds=()), utils.ConfigError, ["config.thresholds is empty", "--config"]),
        (dict(thresholds=(0.2, float("nan"))), utils.ConfigError, ["config.thresholds", "nan"]),
        (dict(thresholds=("high",)), utils.ConfigError, ["config.thresholds", "'high'"]),
        (dict(chunk_size=0), utils.ConfigError, ["config.chunk_size", "positive"]),
        (dict(batch_size=-2), utils.ConfigError, ["config.batch_size", "positive"]),
    ],
)
def test_bad_setting_stops_before_anything_is_written(images, tmp_path, overrides, error, needles):
    work = tmp_path / "w"
    with pytest.raises(error) as excinfo:
        pipeline.discover(_config(images, **overrides), str(work))
    _one_line(excinfo, *needles)
    assert not work.exists()  # no resume record that would refuse the corrected rerun
    with pytest.raises(error):  # the sweep stops the same way
        discovery_modes.run_sweep(_config(images, **overrides), str(tmp_path / "s"))
    assert not (tmp_path / "s").exists()


def test_corrected_rerun_in_the_same_workdir_runs(images, tmp_path):
    work = str(tmp_path / "w")
    with pytest.raises(utils.ConfigError, match="crf_backend"):
        pipeline.discover(_config(images, crf_backend="pydensecrf-gpu"), work)
    result = pipeline.discover(_config(images, thresholds=(0.3,)), work)
    assert result["images"] == 3


def test_merge_without_shards_names_both_outputs(tmp_path):
    with pytest.raises(FileNotFoundError) as excinfo:
        discovery_modes.run_merge(defaults.discovery(), str(tmp_path / "w"))
    _one_line(excinfo, "pseudo_labels", "sweep", "mode=discover", "--workdir")


def _two_jobs(images, work, n_jobs=(0, 1), **overrides):
    for j in n_jobs:
        pipeline.discover(_config(images, job_index=j, num_jobs=2, **overrides), str(work))


def test_merge_refuses_mixed_shard_counts(images, tmp_path):
    _two_jobs(images, tmp_path / "w")
    pipeline.discover(_config(images, job_index=0, num_jobs=3), str(tmp_path / "w"))
    with pytest.raises(ValueError) as excinfo:
        discovery_modes.run_merge(_config(images), str(tmp_path / "w"))
    _one_line(excinfo, "[2, 3]", "--config.num_jobs", "--workdir")


def test_merge_refuses_missing_shards(images, tmp_path):
    _two_jobs(images, tmp_path / "w", n_jobs=(0,))
    with pytest.raises(utils.InputError) as excinfo:  # a user error: one line, exit 2
        discovery_modes.run_merge(_config(images), str(tmp_path / "w"))
    _one_line(excinfo, "Shards [1] of 2", "not finished", "--config.job_index")
    # A finished shard whose chunk file went missing.
    _two_jobs(images, tmp_path / "w", n_jobs=(1,))
    chunk = tmp_path / "w" / "pseudo_labels" / "work" / "shard_0001_of_0002" / "chunk_000000.json"
    os.remove(chunk)
    with pytest.raises(FileNotFoundError) as excinfo:
        discovery_modes.run_merge(_config(images), str(tmp_path / "w"))
    _one_line(excinfo, "chunk file not found", str(chunk))


def test_merge_refuses_other_thresholds_than_the_run(images, tmp_path):
    _two_jobs(images, tmp_path / "w", thresholds=(0.3,))
    with pytest.raises(utils.ConfigError) as excinfo:  # the merge config's default thresholds
        discovery_modes.run_merge(_config(images), str(tmp_path / "w"))
    _one_line(excinfo, "(0.3,)", "--config.thresholds='(0.3,)'")
    merged = discovery_modes.run_merge(_config(images, thresholds=(0.3,)), str(tmp_path / "w"))
    assert merged["pseudo_labels"]["images"] == 3
    assert (tmp_path / "w" / "pseudo_labels" / "thresh_0.3.json").exists()


def _sweep_config(images, gt_json, **overrides):
    c = defaults.sweep()
    c.images, c.gt_json = str(images), gt_json
    c.thresholds = (0.1, 0.2, 0.4)
    for k, v in {**FAST, **overrides}.items():
        c[k] = v
    return c


def test_multi_job_sweep_merges_to_the_single_job_sweep(tmp_path):
    from hassod_jax.data import synthetic

    image_dir, gt_json = synthetic.write_synthetic_dataset(str(tmp_path / "data"), 3, 0, (96, 128))
    single = discovery_modes.run_sweep(
        _sweep_config(image_dir, gt_json, chunk_size=2), str(tmp_path / "one")
    )
    work = tmp_path / "two"
    for j in range(2):
        job = _sweep_config(image_dir, gt_json, job_index=j, num_jobs=2)
        assert discovery_modes.run_sweep(job, str(work)) is None
    assert not (work / "sweep" / "sweep.json").exists()  # each job only writes its shard
    merge_config = _sweep_config(image_dir, gt_json)
    merge_config.mode = "merge_pseudo_labels"
    merged = discovery_modes.run_merge(merge_config, str(work))
    assert list(merged) == ["sweep"]
    saved = _load(work / "sweep" / "sweep.json")
    assert saved == json.loads(json.dumps(single))
    assert set(saved["segm"]) == {"0.1", "0.2", "0.4", "ensemble", "ensemble_0.1_0.2_0.4"}
    for name in ("thresh_0.1.json", "thresh_0.4.json", "pseudo_labels_hier.json"):
        assert _load(work / "sweep" / name) == _load(tmp_path / "one" / "sweep" / name), name
    # The discovery config (configs/merge_pseudo_labels.py) has other default thresholds and
    # no ground truth: the thresholds are refused, and with them it reports statistics only.
    with pytest.raises(utils.ConfigError, match=r"--config.thresholds='\(0.1,0.2,0.4\)'"):
        discovery_modes.run_merge(defaults.discovery(), str(work))
    plain = defaults.discovery()
    plain.thresholds = (0.1, 0.2, 0.4)
    discovery_modes.run_merge(plain, str(work))
    saved = _load(work / "sweep" / "sweep.json")
    assert "segm" not in saved and saved["statistics"] == single["statistics"]
