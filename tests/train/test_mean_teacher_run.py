"""mode=mean_teacher end to end on CPU, `configs/mean_teacher_coco.py` at toy scale
(tests/train/toy_configs.py): metrics of both branches, the student written where the
loaders read a checkpoint, and kill-and-resume reaching bitwise the same student AND teacher."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from tests.train import toy_configs
from tests.xla_env import cpu_env

ROOT = toy_configs.ROOT


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    import jax
    import jax.numpy as jnp

    from hassod_jax.data import synthetic
    from hassod_jax.models import detector as D
    from hassod_jax.weights.detectron2 import export_detector

    root = tmp_path_factory.mktemp("mt")
    image_dir, gt = synthetic.write_synthetic_dataset(str(root / "data"), 6, 0, (96, 128))
    model = D.CascadeMaskRCNN(D.SMALL_CONFIG)
    variables = jax.jit(lambda r: model.init(r, jnp.zeros((1, 64, 64, 3))))(jax.random.PRNGKey(0))
    init = root / "init"
    export_detector(init, jax.device_get(variables), model.config)
    return image_dir, gt, init


def _cmd(setup, workdir):
    image_dir, gt, init = setup
    return [
        sys.executable, "-m", "hassod_jax.main", "--config", toy_configs.MEAN_TEACHER_CONFIG,
        "--workdir", str(workdir), *toy_configs.flags(toy_configs.MEAN_TEACHER),
        f"--config.init_checkpoint={init}", f"--config.train_json={gt}",
        f"--config.images={image_dir}",
    ]


def _leaves(workdir, step, part):
    import jax
    import orbax.checkpoint as ocp

    state = ocp.StandardCheckpointer().restore(
        os.path.join(workdir, "checkpoints", str(step), "state")
    )
    return jax.tree_util.tree_leaves_with_path(state[part])


def test_mean_teacher_run_metrics_student_and_sigkill_resume(setup, tmp_path):
    cache = tmp_path / "cache"
    full = tmp_path / "full"
    r = subprocess.run(_cmd(setup, full), cwd=ROOT, env=cpu_env(cache=cache), capture_output=True,
                       text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    lines = [json.loads(x) for x in (full / "logs" / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [1, 2, 3, 4]
    for x in lines:
        for k in ("sup/rpn/cls", "sup/mask", "sup/stage2/level", "unsup/rpn/box",
                  "unsup/stage0/cls", "unsup/stage2/level", "w_sup", "w_unsup", "lr",
                  "teacher/targets_per_image", "images_per_s"):
            assert np.isfinite(x[k]), (k, x)
    assert lines[0]["w_sup"] == 1.0 and lines[0]["w_unsup"] == 2.0
    assert lines[0]["teacher/targets_per_image"] > 0

    # The student is what the run produces: load_detector(W) and W/model_final give it.
    import jax

    from hassod_jax.weights.detectron2 import load_detector

    student = _leaves(full, 4, "params")
    for where in (full, full / "model_final"):
        _, variables = load_detector(where)
        got = jax.tree_util.tree_leaves(variables["params"])
        assert len(got) == len(student)
        for (path, a), b in zip(student, got):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=str(path))

    killed = tmp_path / "killed"
    proc = subprocess.Popen(_cmd(setup, killed), cwd=ROOT, env=cpu_env(cache=cache),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None:
        if (killed / "checkpoints" / "2").exists():
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / "checkpoints" / "4").exists()
    r = subprocess.run(_cmd(setup, killed), cwd=ROOT, env=cpu_env(cache=cache), capture_output=True,
                       text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "Resuming at step" in r.stderr
    for part in ("params", "batch_stats", "teacher_params", "teacher_batch_stats"):
        a, b = _leaves(full, 4, part), _leaves(killed, 4, part)
        assert [p for p, _ in a] == [p for p, _ in b]
        for (path, x), (_, y) in zip(a, b):
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=f"{part} {path}")
