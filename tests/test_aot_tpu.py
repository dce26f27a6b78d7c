"""The training step and the Mean Teacher step compile for a TPU pod slice.

libtpu's compile-only devices (`jax.experimental.topologies`, the `test` extra installs libtpu)
let this CPU-only session run the TPU compiler on the steps as the modes build them
(experiments/aot.py: `supervised.jit_train_step`, `modes.mean_teacher.jit_mt_step`, the batch
sharded over a 2x2 v5e slice), so a construct that only a CPU or CUDA backend accepts (a host
callback, a float64 op, a GPU-only kernel) fails here instead of on the first pod job. The small
detector at 64 x 64, one image per chip (MT: 1 + 1), at the compiler's lowest effort
(`FAST_COMPILE`): the question is whether it compiles, not how well.
"""

import importlib.util
import os
import sys

import pytest

pytest.importorskip("libtpu", reason="libtpu is not installed (pip install -e '.[test]')")

import jax  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def aot():
    name = "experiments_aot"  # registered: its dataclasses look their module up
    spec = importlib.util.spec_from_file_location(
        name, os.path.join(ROOT, "experiments", "aot.py")
    )
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    # aot.py sets libtpu's variables (TPU_WORKER_HOSTNAMES, TPU_ACCELERATOR_TYPE) in os.environ;
    # the worker's later tests start subprocesses with it, so it is put back as it was.
    environ = dict(os.environ)
    spec.loader.exec_module(mod)
    # Compile-only executables are not for the session's persistent compilation cache.
    saved = jax.config.jax_enable_compilation_cache
    jax.config.update("jax_enable_compilation_cache", False)
    yield mod
    jax.config.update("jax_enable_compilation_cache", saved)
    os.environ.clear()
    os.environ.update(environ)


@pytest.mark.parametrize("program", ["train_step", "mt_step"])
def test_step_compiles_for_a_tpu_slice(aot, program):
    opts = aot.Options(model="small", per_chip=1, image=(64, 64), max_instances=4)
    row = aot.run("v5e-4", program, opts, log=lambda s: None,
                  compiler_options=aot.FAST_COMPILE)
    assert row["status"] == "ok", row.get("error")
    assert row["devices"] == 4 and row["chips"] == 4
    hbm = aot.CHIPS["v5e"].hbm
    assert 0 < row["temp_bytes"] + row["arg_bytes"] < hbm
    assert row["flops"] > 0
    # The gradients are summed over the slice: the batch really is sharded over the 4 chips.
    assert row["collectives"].get("all-reduce", {}).get("count", 0) > 0
