"""The loop both stage-2 trainers run (`train/loop.py`), with a counter for a model: when it
saves, evaluates and runs its between-steps job, in which order (detectron2's hook order: the
job, then the checkpoint, then the evaluation), the NaN guard, resuming, and closing."""

import math

import flax
import jax.numpy as jnp
import pytest

from hassod_jax.train import loop


@flax.struct.dataclass
class Counter:
    step: jnp.ndarray
    total: jnp.ndarray


def _run(tmp_path, max_iter=7, bad_at=None, start_state=None, **kw):
    events = []
    checkpointer, state, data_state, start = loop.restore(
        str(tmp_path), start_state or Counter(jnp.int32(0), jnp.float32(0)), None, keep=10
    )
    save = checkpointer.save

    def recording_save(step, state, data=None):
        events.append(("save", step, data))
        save(step, state, data)

    checkpointer.save = recording_save

    def step(state, i):
        loss = math.nan if i + 1 == bad_at else float(i)
        return Counter(state.step + 1, state.total + i), {"total_loss": jnp.float32(loss),
                                                          "lr": jnp.float32(0.1)}

    def after_step(state, done):
        if done % 3:
            return state, False
        events.append(("job", done, None))
        return state.replace(total=state.total + 1000), True

    def evaluate(state):
        events.append(("eval", int(state.step), float(state.total)))
        return {"val/x": float(state.total)}

    class It:
        closed = False

        def close(self):
            It.closed = True

    state, metrics = loop.run(
        state, step, start=start, max_iter=max_iter, checkpointer=checkpointer,
        writer=loop.make_writer(str(tmp_path)),
        images_per_step=2, log_every=2, checkpoint_every=kw.get("checkpoint_every", 2),
        describe=lambda h: f"loss {h['total_loss']:.4f}",
        data_state=lambda: {"position": 1}, after_step=after_step,
        eval_every=kw.get("eval_every", 3), evaluate=evaluate, close=(It(),),
    )
    return state, metrics, events, It.closed, start


def test_job_then_checkpoint_then_evaluation_at_their_steps(tmp_path):
    state, metrics, events, closed, start = _run(tmp_path)
    assert start == 0 and int(state.step) == 7 and closed
    assert float(state.total) == sum(range(7)) + 2000  # the job ran after steps 3 and 6
    assert [e for e in events if e[0] != "eval"] == [
        ("save", 2, {"position": 1}), ("job", 3, None), ("save", 4, {"position": 1}),
        ("job", 6, None), ("save", 6, {"position": 1}), ("save", 7, {"position": 1}),
    ]
    # Evaluations every 3 steps and at the end, each after that step's job and checkpoint.
    evals = [e for e in events if e[0] == "eval"]
    assert evals == [("eval", 3, 3.0 + 1000), ("eval", 6, 15.0 + 2000), ("eval", 7, 21.0 + 2000)]
    assert events.index(("job", 6, None)) < events.index(("save", 6, {"position": 1})) < \
        events.index(evals[1])
    assert metrics["val/x"] == 2021.0 and metrics["total_loss"] == 6.0
    assert metrics["images_per_s"] > 0


def test_a_rerun_resumes_after_the_last_checkpoint(tmp_path):
    _run(tmp_path, max_iter=4)
    state, _, events, _, start = _run(tmp_path, max_iter=7)
    assert start == 4 and int(state.step) == 7
    assert [e[:2] for e in events if e[0] == "save"] == [("save", 6), ("save", 7)]


def test_a_non_finite_loss_stops_naming_the_last_good_checkpoint(tmp_path):
    with pytest.raises(FloatingPointError, match=r"step 6: .*last good checkpoint: step 4 in"):
        _run(tmp_path, bad_at=6)
    # Nothing was written after the bad step.
    _, _, events, _, start = _run(tmp_path, max_iter=4)
    assert start == 4 and events == []


def test_the_validation_set_and_its_settings_come_from_the_val_fields(tmp_path):
    """mode=train's and mode=mean_teacher's val_* fields become the loop's `Validation`, each
    field where evaluation reads it; evaluation off (no val_json) is None."""
    from hassod_jax import defaults
    from hassod_jax.modes import train as train_mode

    (tmp_path / "val.json").write_text("{}")
    for make in (defaults.training, defaults.mean_teacher):
        c = make()
        assert train_mode.validation(c) is None
        c.val_json, c.val_images = str(tmp_path / "val.json"), str(tmp_path)
        c.val_max_images, c.val_short_edge, c.val_max_size, c.val_batch_size = 3, 96, 160, 2
        c.data.buckets = ((96, 128), (128, 96))
        assert train_mode.validation(c) == loop.Validation(
            json=str(tmp_path / "val.json"), images=str(tmp_path), max_images=3, short_edge=96,
            max_size=160, batch_size=2, buckets=((96, 128), (128, 96)),
        )
