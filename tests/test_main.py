"""The command line: config loading, overrides, mode dispatch and its errors."""

import glob
import json
import os
import subprocess
import sys

import pytest

from hassod_jax import main, utils

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(*args, timeout=120):
    return subprocess.run(
        [sys.executable, "-m", "hassod_jax.main", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
    )


def test_unknown_mode_names_the_valid_ones():
    with pytest.raises(ValueError, match="discover") as e:
        main.resolve_mode("dicsover")
    assert "sweep" in str(e.value) and "dicsover" in str(e.value)


def test_every_mode_resolves_to_a_run_function():
    for mode in main.MODES:
        assert callable(main.resolve_mode(mode)), mode


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(ROOT, "configs", "*.py"))))
def test_configs_load_and_are_locked(path):
    import importlib.util

    spec = importlib.util.spec_from_file_location("cfg", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()
    assert config.mode in main.MODES
    config.lock()  # what --config with lock_config=True does
    with pytest.raises(AttributeError):
        config.no_such_field = 1


def test_missing_required_field_says_what_to_set(tmp_path):
    r = _run("--config", "configs/discover_coco.py", "--workdir", str(tmp_path))
    assert r.returncode != 0
    assert "--config.images" in r.stderr


def test_typo_in_override_is_an_error(tmp_path):
    r = _run(
        "--config", "configs/discover_coco.py", "--workdir", str(tmp_path), "--config.imagez=x"
    )
    assert r.returncode != 0
    assert "imagez" in r.stderr


def test_missing_checkpoint_stops_at_once(tmp_path):
    (tmp_path / "imgs").mkdir()
    from PIL import Image

    Image.new("RGB", (64, 48), (10, 20, 30)).save(tmp_path / "imgs" / "1.png")
    r = _run(
        "--config",
        "configs/discover_coco.py",
        "--workdir",
        str(tmp_path / "w"),
        f"--config.images={tmp_path / 'imgs'}",
        f"--config.dino_checkpoint={tmp_path / 'nope.pth'}",
    )
    assert r.returncode != 0
    assert "nope.pth" in r.stderr and "dino_checkpoint" in r.stderr


def test_require_lists_every_missing_field():
    import ml_collections

    c = ml_collections.ConfigDict({"a": "", "b": None, "c": 1})
    with pytest.raises(utils.ConfigError, match="a, b") as e:
        utils.require(c, "a", "b", "c", mode="x")
    assert "--config.a=..." in str(e.value) and "mode=x" in str(e.value)


def test_atomic_write_and_read_json(tmp_path):
    p = tmp_path / "sub" / "x.json"
    utils.atomic_write_json(str(p), {"a": [1, 2]})
    assert utils.read_json(str(p)) == {"a": [1, 2]}
    assert [f for f in os.listdir(p.parent) if f.startswith(".tmp")] == []
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match="bad.json"):
        utils.read_json(str(tmp_path / "bad.json"))
    with pytest.raises(FileNotFoundError, match="missing.json"):
        utils.read_json(str(tmp_path / "missing.json"))


def test_metric_writer_writes_jsonl_and_tensorboard(tmp_path):
    w = utils.MetricWriter(str(tmp_path))
    w.write_scalars(3, {"loss": 1.5})
    w.write_scalars(4, {"loss": 0.5})
    w.close()
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert lines == [{"step": 3, "loss": 1.5}, {"step": 4, "loss": 0.5}]
    assert glob.glob(str(tmp_path / "events.out.tfevents.*"))


def test_progress_reports_rate_eta_and_shares():
    p = utils.Progress(10, name="images", every_s=1e9)
    p.add_time("decode", 1.0)
    p.add_time("crf", 3.0)
    p.update(5)
    s = p.summary()
    assert "5/10 images" in s and "ETA" in s and "decode 25%" in s and "crf 75%" in s
