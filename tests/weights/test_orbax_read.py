"""Our own fresh orbax checkpoints load without a warning: orbax logs nothing at warning level
or above when a training checkpoint is resumed or read for prediction / Mean Teacher init
(it used to warn `Metadata file does not exist: .../state/_CHECKPOINT_METADATA` on every
read, which teaches users to ignore warnings)."""

import logging
import os

import jax.numpy as jnp
import numpy as np

from hassod_jax.train import checkpoint as ckpt_lib
from hassod_jax.weights import detectron2 as W


def _state():
    return {
        "params": {"w": jnp.arange(6.0).reshape(2, 3), "b": jnp.ones((3,))},
        "batch_stats": {"mean": jnp.full((3,), 0.5)},
        "step": jnp.asarray(5, jnp.int32),
    }


def _warnings(caplog):
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


def test_fresh_checkpoint_reads_without_warnings(tmp_path, caplog):
    state = _state()
    ck = ckpt_lib.Checkpointer(tmp_path / "W" / "checkpoints")
    ck.save(5, state, {"it": 1})
    ck.close()
    caplog.clear()
    with caplog.at_level(logging.DEBUG):
        for where in (tmp_path / "W", tmp_path / "W" / "checkpoints" / "5"):
            variables = W._read_orbax(W._orbax_step_dir(str(where)))
            np.testing.assert_array_equal(variables["params"]["w"], state["params"]["w"])
            np.testing.assert_array_equal(variables["batch_stats"]["mean"], 0.5)
        resumed = ckpt_lib.Checkpointer(tmp_path / "W" / "checkpoints")
        got, data = resumed.restore(state)
        resumed.close()
    assert data == {"it": 1} and int(got["step"]) == 5
    assert _warnings(caplog) == []
    assert not any("_CHECKPOINT_METADATA" in r.getMessage() for r in caplog.records)


def test_a_checkpoint_with_the_model_config_reads_and_resumes_without_warnings(
    tmp_path, caplog
):
    """The stored model config (item 'model') is read by load_detector and left alone by the
    resume and the state-only read, all without orbax's 'found in the checkpoint, but could not
    be restored' warning."""
    import jax

    from hassod_jax.models import detector as D
    from hassod_jax.train import optim, supervised

    cfg = D.SMALL_CONFIG
    state = supervised.init_state(D.CascadeMaskRCNN(cfg), optim.sgd(0.01), jax.random.PRNGKey(0))
    ck = ckpt_lib.Checkpointer(tmp_path / "W" / "checkpoints", model_config=cfg)
    ck.save(1, state, {"it": 3})
    ck.close()
    caplog.clear()
    with caplog.at_level(logging.DEBUG):
        module, _ = W.load_detector(tmp_path / "W")
        W._read_orbax(W._orbax_step_dir(str(tmp_path / "W")))
        resumed = ckpt_lib.Checkpointer(tmp_path / "W" / "checkpoints", model_config=cfg)
        _, data = resumed.restore(state)
        resumed.close()
    assert module.config == cfg and data == {"it": 3}
    assert _warnings(caplog) == []


def test_a_step_holding_only_the_state_item_reads_too(tmp_path, caplog):
    """A step directory without the data iterator's item (the state alone) is read as well."""
    import orbax.checkpoint as ocp

    state = _state()
    step = tmp_path / "checkpoints" / "3"
    with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ck:
        ck.save(str(step), args=ocp.args.Composite(state=ocp.args.StandardSave(state)))
    assert os.path.isdir(step / "state")
    with caplog.at_level(logging.DEBUG):
        variables = W._read_orbax(W._orbax_step_dir(str(tmp_path)))
    np.testing.assert_array_equal(variables["params"]["b"], 1.0)
    assert _warnings(caplog) == []


def test_which_teacher_reads_a_mean_teacher_runs_ema_teacher(tmp_path):
    """A Mean Teacher state holds the student (params) and the teacher (teacher_params): the
    default reads the student, which='teacher' the teacher; a plain run has no teacher."""
    import pytest

    state = {**_state(), "teacher_params": {"w": jnp.full((2, 3), 7.0), "b": jnp.zeros((3,))},
             "teacher_batch_stats": {"mean": jnp.full((3,), 0.25)}}
    ck = ckpt_lib.Checkpointer(tmp_path / "MT" / "checkpoints")
    ck.save(2, state, {})
    ck.close()
    step = W._orbax_step_dir(str(tmp_path / "MT"))
    student, teacher = W._read_orbax(step), W._read_orbax(step, "teacher")
    np.testing.assert_array_equal(student["params"]["w"], state["params"]["w"])
    np.testing.assert_array_equal(teacher["params"]["w"], 7.0)
    np.testing.assert_array_equal(teacher["batch_stats"]["mean"], 0.25)
    plain = ckpt_lib.Checkpointer(tmp_path / "W" / "checkpoints")
    plain.save(1, _state(), {})
    plain.close()
    with pytest.raises(W.CheckpointError, match="holds no teacher"):
        W._read_orbax(W._orbax_step_dir(str(tmp_path / "W")), "teacher")
