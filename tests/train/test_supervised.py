"""Detector training, `configs/train_coco.py` run through mode=train at toy scale
(tests/train/toy_configs.py): kill-and-resume gives bitwise the same parameters and BN
statistics; metrics are written; PreciseBN runs every N steps and at the last one, before the
checkpoint."""

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
def dataset(tmp_path_factory):
    from hassod_jax.data import synthetic

    root = tmp_path_factory.mktemp("train_data")
    return synthetic.write_synthetic_dataset(str(root), 6, 0, (96, 128))


def _cmd(dataset, workdir):
    image_dir, gt = dataset
    return [
        sys.executable,
        "-m",
        "hassod_jax.main",
        "--config",
        toy_configs.TRAIN_CONFIG,
        "--workdir",
        str(workdir),
        *toy_configs.flags(toy_configs.TRAIN),
        f"--config.train_json={gt}",
        f"--config.images={image_dir}",
        # PreciseBN after steps 2 and 4 (the last), over 2 batches each.
        "--config.precise_bn_every=2",
        "--config.precise_bn_iters=2",
    ]


def _state(workdir, step):
    import orbax.checkpoint as ocp

    path = os.path.join(workdir, "checkpoints", str(step), "state")
    return ocp.StandardCheckpointer().restore(path)


def _params(workdir, step, part="params"):
    import jax

    return jax.tree_util.tree_leaves_with_path(_state(workdir, step)[part])


def test_sigkill_and_resume_reaches_the_same_parameters(dataset, tmp_path):
    cache = tmp_path / "cache"
    full = tmp_path / "full"
    # One persistent compilation cache for the three runs: the second and third do not compile.
    r = subprocess.run(_cmd(dataset, full), cwd=ROOT, env=cpu_env(cache=cache),
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    lines = [json.loads(x) for x in (full / "logs" / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [1, 2, 3, 4]
    for x in lines:
        for k in (
            "rpn/cls",
            "rpn/box",
            "stage0/cls",
            "stage2/box",
            "stage1/level",
            "mask",
            "lr",
            "images_per_s",
        ):
            assert np.isfinite(x[k]), (k, x)

    killed = tmp_path / "killed"
    proc = subprocess.Popen(
        _cmd(dataset, killed),
        cwd=ROOT,
        env=cpu_env(cache=cache),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None:
        if (killed / "checkpoints" / "2").exists():
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / "checkpoints" / "4").exists()
    r = subprocess.run(
        _cmd(dataset, killed),
        cwd=ROOT,
        env=cpu_env(cache=cache),
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert "Resuming at step" in r.stderr
    for part in ("params", "batch_stats"):
        a, b = _params(full, 4, part), _params(killed, 4, part)
        assert [p for p, _ in a] == [p for p, _ in b]
        for (path, x), (_, y) in zip(a, b):
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=str(path))
    _check_precise_bn_schedule(dataset, full)


def _check_precise_bn_schedule(dataset, workdir):
    """The checkpoints of steps 2 and 4 hold PreciseBN's statistics of their own parameters
    (recomputed here from the same deterministic batches); step 3's do not (they are step 3's
    momentum update of step 2's)."""
    import jax
    from jax.sharding import Mesh

    from hassod_jax.data import loader
    from hassod_jax.modes import train as train_mode
    from hassod_jax.train import precise_bn

    c = toy_configs.load(toy_configs.TRAIN_CONFIG, toy_configs.TRAIN)
    c.train_json, c.images = dataset[1], dataset[0]
    c.precise_bn_iters = 2
    records = loader.open_records(train_json=c.train_json, images=c.images)
    pbn = precise_bn.PreciseBN(
        train_mode.build_model(c, dtype="float32"),
        Mesh(np.array(jax.devices()[:1]), ("data",)),  # one device, as the run
        num_iters=2,
    )

    def recomputed(step):
        st = _state(workdir, step)
        batches = precise_bn.make_batches(
            records, train_mode.loader_config(c), step, 2, process_index=0, process_count=1
        )
        return jax.tree_util.tree_leaves(pbn(st["params"], st["batch_stats"], batches))

    def saved(step):
        return jax.tree_util.tree_leaves(_state(workdir, step)["batch_stats"])

    for step in (2, 4):
        for x, y in zip(recomputed(step), saved(step)):
            np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5, atol=1e-6)
    assert not all(
        np.allclose(np.asarray(x), np.asarray(y), rtol=1e-3)
        for x, y in zip(recomputed(3), saved(3))
    )


_NAN_SCRIPT = r"""
import sys
import jax.numpy as jnp
from hassod_jax.modes import train as train_mode
from hassod_jax.train import supervised
from tests.train import toy_configs

c = toy_configs.load(toy_configs.TRAIN_CONFIG, toy_configs.TRAIN)
c.train_json, c.images = sys.argv[1], sys.argv[2]
real = supervised.make_train_step


def poisoned(model, tx, schedule):
    step = real(model, tx, schedule)

    def fn(state, batch, rng):  # the loss of the second step becomes NaN
        new_state, metrics = step(state, batch, rng)
        bad = jnp.where(state.step >= 1, jnp.nan, 0.0)
        return new_state, {**metrics, "total_loss": metrics["total_loss"] + bad}

    return fn


supervised.make_train_step = poisoned
train_mode.train(c, sys.argv[3])
"""


def test_non_finite_loss_stops_and_names_the_last_good_checkpoint(dataset, tmp_path):
    image_dir, gt = dataset
    work = tmp_path / "w"
    r = subprocess.run(
        [sys.executable, "-c", _NAN_SCRIPT, gt, image_dir, str(work)],
        cwd=ROOT,
        env=cpu_env(),
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert r.returncode != 0
    assert "FloatingPointError: Non-finite loss at step 2" in r.stderr, r.stderr[-2000:]
    assert f"last good checkpoint: step 1 in {work / 'checkpoints'}" in r.stderr
    assert (work / "checkpoints" / "1").exists() and not (work / "checkpoints" / "2").exists()
