"""Command-line entry point: `python -m hassod_jax.main --config configs/x.py --workdir DIR`.

`config.mode` picks the stage; each stage module exposes `run(config, workdir)`.
Fields can be overridden from the command line: `--config.images=/data/coco`.
"""

import importlib

from absl import app, flags, logging
from ml_collections import config_flags

# mode -> "module:function". The module is imported only when its mode runs.
MODES = {
    "discover": "hassod_jax.discovery.pipeline:run",
    "sweep": "hassod_jax.discovery.pipeline:run_sweep",
    "merge_pseudo_labels": "hassod_jax.discovery.pipeline:run_merge",
    "demo": "hassod_jax.demo:run",
    "train": "hassod_jax.train.supervised:run",
    "mean_teacher": "hassod_jax.train.mean_teacher:run",
    "evaluate": "hassod_jax.evaluate.coco_eval:run",
}

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file(
    "config", None, "Path to an ml_collections config file.", lock_config=True
)
flags.DEFINE_string("workdir", None, "Directory for outputs, checkpoints and logs.")
flags.mark_flags_as_required(["config", "workdir"])


def resolve_mode(mode):
    """Returns the `run` callable for `mode`, or raises ValueError naming the valid modes."""
    if mode not in MODES:
        raise ValueError(
            f"Unknown config.mode {mode!r}; set --config.mode to one of: {', '.join(sorted(MODES))}"
        )
    module_name, fn_name = MODES[mode].split(":")
    return getattr(importlib.import_module(module_name), fn_name)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    config = FLAGS.config
    if "mode" not in config:
        raise app.UsageError(
            f"The config has no 'mode' field; add one of: {', '.join(sorted(MODES))}"
        )
    try:
        run = resolve_mode(config.mode)
    except ValueError as e:
        raise app.UsageError(str(e)) from None
    logging.info("hassod_jax mode=%s workdir=%s", config.mode, FLAGS.workdir)
    run(config, FLAGS.workdir)


if __name__ == "__main__":
    app.run(main)
