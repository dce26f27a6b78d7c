"""Multi-process training: two `jax.distributed` CPU processes (2 devices each), each reading
only its host shard of the global batch, compute the same train step (losses, parameter
updates and batch statistics) as one process with 4 devices over the same global batch.

The three processes run at once (`distributed_step.py`); the coordinator listens on
127.0.0.1 at a free port.
"""

import os
import socket
import subprocess
import sys

import numpy as np
import pytest

from tests.xla_env import cpu_env

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
WORKER = os.path.join(HERE, "distributed_step.py")


def _free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(devices):
    return cpu_env(devices, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    from hassod_jax.data import synthetic

    root = tmp_path_factory.mktemp("dist_data")
    # 48 x 72 resizes to exactly 64 x 96 (short side 64): one bucket for every example.
    return synthetic.write_synthetic_dataset(str(root), 8, 3, (48, 72))


def test_two_processes_give_the_one_process_step(dataset, tmp_path):
    image_dir, gt = dataset
    single = str(tmp_path / "single.npz")
    multi = str(tmp_path / "multi.npz")
    coordinator = f"127.0.0.1:{_free_port()}"
    procs = [
        subprocess.Popen(
            [sys.executable, WORKER, gt, image_dir, single],
            cwd=ROOT,
            env=_env(4),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
    ]
    for pid in range(2):
        procs.append(
            subprocess.Popen(
                [sys.executable, WORKER, gt, image_dir, multi]
                + ["--coordinator", coordinator, "--num-processes", "2"]
                + ["--process-id", str(pid)],
                cwd=ROOT,
                env=_env(2),
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        )
    logs = []
    try:
        for p in procs:
            out, _ = p.communicate(timeout=300)
            logs.append(out)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for p, log in zip(procs, logs):
        assert p.returncode == 0, log[-4000:]

    a, b = np.load(single), np.load(multi)
    other = np.load(multi + ".process1.npz")
    # The hosts read disjoint halves that together are the global batch.
    np.testing.assert_array_equal(
        np.concatenate([b["image_ids"], other["image_ids"]]), a["image_ids"]
    )
    assert len(b["image_ids"]) == 2 and len(a["image_ids"]) == 4
    assert sorted(a.files) == sorted(b.files)
    losses = [k for k in a.files if k.startswith("loss:")]
    assert {"loss:rpn/cls", "loss:stage2/box", "loss:mask", "loss:total_loss"} <= set(losses)
    for k in losses:
        assert np.isfinite(a[k]), k
        # Same arithmetic, different reduction trees across processes: float32 rounding.
        np.testing.assert_allclose(b[k], a[k], rtol=2e-5, atol=1e-6, err_msg=k)
    n_delta = 0
    for k in a.files:
        if k.startswith("delta:"):
            n_delta += 1
            assert np.abs(a[k]).max() > 0, k  # every parameter moved: the step is not vacuous
            # float32 gradients summed in another order: relative error ~1e-6 on large
            # entries; entries near zero are held to the tensor's scale; and `new - old` is
            # itself rounded to the parameters' float32 spacing.
            scale = float(np.abs(a[k]).max())
            ulp = float(np.spacing(np.abs(a["params:" + k[6:]]).max().astype(np.float32)))
            np.testing.assert_allclose(
                b[k], a[k], rtol=1e-3, atol=1e-4 * scale + 2 * ulp, err_msg=k
            )
        elif k.startswith("stats:"):
            np.testing.assert_allclose(b[k], a[k], rtol=1e-5, atol=1e-6, err_msg=k)
    assert n_delta > 50
