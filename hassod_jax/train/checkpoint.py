"""Whole-train-state checkpoints with orbax: keep the last N, resume from the newest.

A checkpoint holds the train-state pytree (params, batch statistics, optimizer state, step, EMA
teacher when present) and, as JSON beside it, the data iterator's state, so a resumed run sees
the same batches it would have seen, and the model's `DetectorConfig` (item `model`), so
`load_detector(W)` builds the detector the run trained, fields no tensor shape shows
(thresholds, proposal counts) included. Checkpoints written before the `model` item existed
resume and load as before. Orbax writes each step into a temporary folder and renames
it when complete, so a kill mid-save leaves the previous checkpoint as the newest.
"""

import dataclasses
import os

import jax
import orbax.checkpoint as ocp
from absl import logging


class Checkpointer:
    def __init__(self, directory, max_to_keep=3, model_config=None):
        """model_config: the detector's `DetectorConfig`, stored with every step (None: not)."""
        self.directory = os.path.abspath(directory)
        self.model = None if model_config is None else dataclasses.asdict(model_config)
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True),
        )

    def latest_step(self):
        return self.manager.latest_step()

    def save(self, step, state, data_state=None):
        args = {"state": ocp.args.StandardSave(state)}
        args["data"] = ocp.args.JsonSave(data_state if data_state is not None else {})
        if self.model is not None:
            args["model"] = ocp.args.JsonSave(self.model)
        self.manager.save(int(step), args=ocp.args.Composite(**args))
        self.manager.wait_until_finished()

    def restore(self, target_state, step=None):
        """Restores into the structure, shapes, dtypes and shardings of `target_state`.

        Returns (state, data_state), or (target_state, None) when there is no checkpoint.
        """
        step = self.latest_step() if step is None else step
        if step is None:
            return target_state, None
        abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, target_state)
        restored = self.manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract), data=ocp.args.JsonRestore()
            ),
        )
        logging.info("Restored checkpoint at step %d from %s", step, self.directory)
        return restored["state"], restored["data"]

    def close(self):
        self.manager.close()
