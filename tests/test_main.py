"""The command line: config loading, overrides, mode dispatch and its errors."""

import glob
import json
import os
import subprocess
import sys

import pytest

from hassod_jax import main, modes, parallel, utils
from hassod_jax.cli import run_files

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
        modes.resolve_mode("dicsover")
    assert "sweep" in str(e.value) and "dicsover" in str(e.value)


def test_every_mode_resolves_to_a_run_function():
    for mode in modes.MODES:
        assert callable(modes.resolve_mode(mode)), mode


def test_each_modes_config_file_sets_that_mode():
    # --help names one config file per mode: that file must exist and select the mode.
    from hassod_jax.cli.flags import load_config_file

    for name, mode in modes.MODES.items():
        path = os.path.join(ROOT, mode.config)
        assert load_config_file(path).mode == name, (name, mode.config)


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(ROOT, "configs", "*.py"))))
def test_configs_load_and_are_locked(path):
    import importlib.util

    spec = importlib.util.spec_from_file_location("cfg", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()
    assert config.mode in modes.MODES
    config.lock()  # what --config with lock_config=True does
    with pytest.raises(AttributeError):
        config.no_such_field = 1


# What the toy presets change: the scale of a run, never the recipe's arithmetic (EMA, score
# threshold, coverage, loss weights, LR, losses).
TOY_SCALE_FIELDS = {
    "train_coco.py": {
        "model.size", "model.pooler_sampling_ratio", "model.rpn_pre_nms_topk_train",
        "model.rpn_post_nms_topk_train", "model.roi_batch_size_per_image", "dtype", "batch_size",
        "max_iter", "warmup_iters", "log_every", "data.short_edges", "data.max_size",
        "data.buckets", "data.max_instances", "data.workers",
    },
    "mean_teacher_coco.py": {
        "model.pooler_sampling_ratio", "model.rpn_pre_nms_topk_train",
        "model.rpn_post_nms_topk_train", "model.rpn_pre_nms_topk_test",
        "model.rpn_post_nms_topk_test", "model.roi_batch_size_per_image",
        "model.detections_per_image", "model.mask_max_fg", "score_thresh", "max_targets",
        "batch_size_label", "batch_size_unlabel", "max_iter", "warmup_iters", "log_every",
        "data.short_edges", "data.max_size", "data.buckets", "data.max_instances",
        "data.workers",
    },
}


@pytest.mark.parametrize("name", sorted(TOY_SCALE_FIELDS))
def test_toy_preset_changes_the_scale_only(name):
    from hassod_jax.cli.flags import field_paths, load_config_file

    path = os.path.join(ROOT, "configs", name)
    recipe, toy = field_paths(load_config_file(path)), field_paths(load_config_file(path + ":toy"))
    assert set(recipe) == set(toy)
    changed = {k for k in recipe if recipe[k] != toy[k]}
    # Mean Teacher's score_thresh 0 and max_targets 8 are the toy's only departures beyond size:
    # they let a barely trained teacher's detections through, at most 8 per image.
    assert changed <= TOY_SCALE_FIELDS[name], changed - TOY_SCALE_FIELDS[name]
    assert toy["max_iter"] == 4 and changed


def test_an_unknown_preset_is_one_line(tmp_path):
    r = _run("--config", "configs/train_coco.py:tiny", "--workdir", str(tmp_path))
    line = _one_line_error(r)
    assert "configs/train_coco.py" in line and "tiny" in line and ":toy" in line


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


# ----------------------------------------------------------------------------------------------
# User errors: one line on stderr, exit code 2, no traceback.


def _one_line_error(r):
    """The run's error: exit code 2, one `error: ...` line (after the log lines written before
    the error, if any), no traceback, no escaped newlines."""
    import re

    assert r.returncode == 2, (r.returncode, r.stderr[-3000:])
    lines = [x for x in r.stderr.splitlines() if x.strip()]
    lines = [x for x in lines if not re.match(r"[IWEF]\d{4} \d\d:\d\d:\d\d", x)]
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr[-3000:]
    assert "Traceback" not in r.stderr and "\\n" not in r.stderr
    return lines[0]


def test_misspelt_override_is_one_line_naming_the_field(tmp_path):
    r = _run(
        "--config", "configs/discover_coco.py", "--workdir", str(tmp_path), "--config.imagez=x"
    )
    line = _one_line_error(r)
    assert "--config.imagez" in line and "--config.images" in line  # the typo and the fix


def test_misspelt_nested_override_suggests_the_nested_field(tmp_path):
    r = _run(
        "--config", "configs/discover_coco.py", "--workdir", str(tmp_path), "--config.crf.srbg=3"
    )
    line = _one_line_error(r)
    assert "--config.crf.srbg" in line and "--config.crf.srgb" in line


def test_bad_override_value_is_one_line(tmp_path):
    r = _run(
        "--config",
        "configs/discover_coco.py",
        "--workdir",
        str(tmp_path),
        "--config.image_size=big",
    )
    line = _one_line_error(r)
    assert "--config.image_size" in line and "big" in line


def test_missing_required_field_is_one_line(tmp_path):
    r = _run("--config", "configs/discover_coco.py", "--workdir", str(tmp_path))
    line = _one_line_error(r)
    assert "--config.images" in line


def test_missing_config_file_and_workdir_are_one_line(tmp_path):
    line = _one_line_error(_run("--config", "configs/nope.py", "--workdir", str(tmp_path)))
    assert "configs/nope.py" in line
    line = _one_line_error(_run("--config", "configs/demo.py"))
    assert "--workdir" in line
    line = _one_line_error(_run("--workdir", str(tmp_path)))
    assert "--config" in line


def test_unknown_mode_is_one_line_listing_the_modes(tmp_path):
    r = _run("--config", "configs/demo.py", "--workdir", str(tmp_path), "--config.mode=dicsover")
    line = _one_line_error(r)
    assert "dicsover" in line and all(m in line for m in modes.MODES)


def test_extra_arguments_and_a_config_without_mode_are_one_line(tmp_path):
    r = _run("--config", "configs/demo.py", "--workdir", str(tmp_path / "w"), "oops")
    line = _one_line_error(r)
    assert "unexpected arguments: oops" in line and "--config.FIELD=V" in line
    cfg = tmp_path / "no_mode.py"
    cfg.write_text(
        "import ml_collections\n\n\ndef get_config():\n"
        "    return ml_collections.ConfigDict({'images': 'x'})\n"
    )
    line = _one_line_error(_run("--config", str(cfg), "--workdir", str(tmp_path / "w")))
    assert "no 'mode' field" in line and all(m in line for m in modes.MODES)
    assert not (tmp_path / "w").exists()  # nothing written for a run that never started


def test_help_lists_the_modes():
    r = _run("--help")
    assert r.returncode == 0, r.stderr
    for mode in modes.MODES:
        assert mode in r.stdout
    assert "predict" in modes.MODES and "--config" in r.stdout and "--workdir" in r.stdout


def test_help_with_a_config_lists_its_fields_values_and_comments():
    r = _run("--config", "configs/predict.py", "--help")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    (thr,) = [x for x in lines if "--config.score_threshold" in x]
    assert "0.5" in thr and "#" in thr  # value and comment
    assert any("--config.checkpoint" in x for x in lines)
    # Overrides are applied before printing, nested fields are listed with their full path.
    r = _run("--config", "configs/demo.py", "--config.crf.srgb=4", "--help")
    assert r.returncode == 0, r.stderr
    (srgb,) = [x for x in r.stdout.splitlines() if "--config.crf.srgb" in x]
    assert "4" in srgb


def test_one_tpu_host_is_a_single_process_run():
    """TPU_WORKER_HOSTNAMES naming one host (a single TPU VM, or `localhost` left behind by a
    compile-only libtpu tool) starts no jax.distributed: there is no coordinator to find, and
    jax.distributed.initialize fails on a CPU box. Several hosts, or a coordinator address, do."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "TPU_WORKER_HOSTNAMES": "localhost"}
    for k in ("JAX_COORDINATOR_ADDRESS", "COORDINATOR_ADDRESS"):
        env.pop(k, None)
    code = "from hassod_jax.cli import run_files; print('rank', run_files._process_index())"
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                       env=env, timeout=120)
    assert r.returncode == 0 and "rank 0" in r.stdout, r.stderr[-2000:]
    assert not parallel.distributed_requested({"TPU_WORKER_HOSTNAMES": " 10.0.0.2 "})
    assert parallel.distributed_requested({"TPU_WORKER_HOSTNAMES": "10.0.0.2,10.0.0.3"})
    assert parallel.distributed_requested({"JAX_COORDINATOR_ADDRESS": "10.0.0.2:1234"})
    assert parallel.distributed_requested({"COORDINATOR_ADDRESS": "10.0.0.2:1234"})
    assert not parallel.distributed_requested({})


def _corrupt_file(path):
    path.write_bytes(b"this is not a checkpoint" * 10)
    return path


def test_a_run_failing_at_start_up_does_not_lock_the_settings(tmp_path):
    """A wrong DINO checkpoint stops the run; the corrected rerun (the hint's
    --config.backbone=standin) in the same workdir runs instead of being refused."""
    from PIL import Image

    (tmp_path / "imgs").mkdir()
    Image.new("RGB", (64, 48), (10, 20, 30)).save(tmp_path / "imgs" / "1.png")
    work = tmp_path / "w"
    base = [
        "--config",
        "configs/discover_coco.py",
        "--workdir",
        str(work),
        f"--config.images={tmp_path / 'imgs'}",
        "--config.image_size=64",
        "--config.num_workers=0",
        "--config.crf.iterations=1",
    ]
    bad = _corrupt_file(tmp_path / "bad.pth")
    line = _one_line_error(_run(*base, f"--config.dino_checkpoint={bad}"))
    assert "bad.pth" in line
    r = _run(*base, "--config.backbone=standin")
    assert r.returncode == 0, r.stderr[-3000:]
    assert (work / "pseudo_labels" / "pseudo_labels_hier.json").exists()
    assert os.listdir(work / "pictures") == ["1.png"]  # the pseudo-labels drawn
    # Work has been committed now: the settings are locked.
    line = _one_line_error(_run(*base, "--config.backbone=standin", "--config.min_area=7"))
    assert "min_area" in line
    # The run wrote its resolved config and a log file, as detectron2 writes config.yaml and
    # log.txt; library INFO logs (orbax, absl internals) are kept out at the default level.
    saved = json.loads((work / "config.json").read_text())
    assert saved["backbone"] == "standin" and saved["image_size"] == 64
    log = (work / "log.txt").read_text()
    assert "mode=discover" in log and "bad.pth" in log  # every run appends, errors included


def test_library_info_logs_are_filtered_unless_asked():
    import logging as py_logging

    def record(path, level):
        return py_logging.LogRecord("absl", level, path, 1, "msg", (), None)

    ours = os.path.join(os.path.dirname(main.__file__), "train", "x.py")
    lib = "/site-packages/orbax/checkpoint/checkpoint_manager.py"
    f = run_files.LibraryLogFilter("warning")
    assert f.filter(record(ours, py_logging.INFO))
    assert not f.filter(record(lib, py_logging.INFO))
    assert f.filter(record(lib, py_logging.WARNING))
    assert run_files.LibraryLogFilter("info").filter(record(lib, py_logging.INFO))


@pytest.mark.parametrize("umask", [0o022, 0o027, 0o077])
def test_atomic_writes_respect_the_umask(tmp_path, umask):
    old = os.umask(umask)
    try:
        utils.atomic_write_json(str(tmp_path / "a.json"), [1])
        utils.atomic_write_bytes(str(tmp_path / "b.bin"), b"x")
    finally:
        os.umask(old)
    for name in ("a.json", "b.bin"):
        assert os.stat(tmp_path / name).st_mode & 0o777 == 0o666 & ~umask, name


# ----------------------------------------------------------------------------------------------
# The README stays true and self-contained.


def _markdown_files():
    files = [os.path.join(ROOT, "README.md")]
    files += sorted(glob.glob(os.path.join(ROOT, "docs", "**", "*.md"), recursive=True))
    return files


def test_readme_and_docs_links_resolve_inside_the_repository():
    import re

    assert len(_markdown_files()) >= 2, "docs/ holds the recipe"
    for path in _markdown_files():
        text = open(path, encoding="utf-8").read()
        assert "../shared" not in text, path
        for target in re.findall(r"\]\(([^)#\s]+)", text):
            if "://" in target:
                continue
            full = os.path.normpath(os.path.join(os.path.dirname(path), target))
            assert full.startswith(ROOT + os.sep), (path, target)
            assert os.path.exists(full), (path, target)


def test_readme_claims_no_mode_that_is_not_implemented():
    import re

    text = " ".join(open(os.path.join(ROOT, "README.md"), encoding="utf-8").read().split())
    for mode in re.findall(r"`mode=(\w+)`", text) + re.findall(r"\| `(\w+)` \|", text):
        assert mode in modes.MODES, mode
    if "mean_teacher" not in modes.MODES:
        for sentence in re.split(r"(?<=[.!?])\s", text):
            if "Mean Teacher" in sentence:
                assert "not implemented" in sentence, sentence
