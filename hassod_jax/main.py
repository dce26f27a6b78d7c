"""Command-line entry point: `python -m hassod_jax.main --config configs/x.py --workdir DIR`.

`config.mode` picks the stage; each stage module exposes `run(config, workdir)`.
Fields can be overridden from the command line: `--config.images=/data/coco`.
`--help` lists the modes; `--config FILE --help` lists that config's fields, their values (the
overrides applied) and the comments the config files give them.

Errors: a user error (a misspelt or missing field, a bad value, a missing or unreadable input
file) is one line on stderr, `error: ...`, and exit code 2; anything else is a bug and keeps its
traceback. Every run writes its resolved config to `W/config.json` and appends its log to
`W/log.txt` (as detectron2 writes `config.yaml` and `log.txt`); libraries' (orbax, jax, ...)
messages below warning level are left out unless `--library_log_level=info`.
"""
import logging as py_logging
import os
import sys
import traceback

from absl import app, logging

from hassod_jax.cli.errors import UserError, fail, is_user_error
from hassod_jax.cli.flags import FLAGS, parse_or_fail
from hassod_jax.cli.help import wants_help, print_help
from hassod_jax.cli.run_files import log_to_file, setup_run_files
from hassod_jax.modes import MODES, resolve_mode


def main(argv):
    if len(argv) > 1:
        fail(f"unexpected arguments: {' '.join(argv[1:])} (fields are set as --config.FIELD=V)")
    config = FLAGS.config
    if "mode" not in config:
        fail(f"the config has no 'mode' field; add one of: {', '.join(sorted(MODES))}")
    if config.mode not in MODES:
        fail(
            f"unknown config.mode {config.mode!r}; set --config.mode to one of: "
            f"{', '.join(sorted(MODES))}"
        )
    workdir = FLAGS.workdir
    handler = None
    try:
        handler = setup_run_files(config, workdir, FLAGS.library_log_level)
        logging.info(
            "hassod_jax mode=%s workdir=%s (resolved config in %s)",
            config.mode,
            workdir,
            os.path.join(workdir, "config.json"),
        )
        run = resolve_mode(config.mode)
        run(config, workdir)
    except Exception as e:  # noqa: BLE001 - sorted into user errors and bugs below
        if is_user_error(e) and not FLAGS.traceback:
            log_to_file(handler, py_logging.ERROR, f"error: {e}")
            fail(str(e))
        log_to_file(handler, py_logging.ERROR, traceback.format_exc())
        raise
    finally:
        if handler is not None:
            py_logging.getLogger().removeHandler(handler)
            handler.close()


def cli(argv=None):
    argv = list(sys.argv if argv is None else argv)
    if wants_help(argv):
        try:
            print_help(argv)
        except UserError as e:
            fail(str(e))
        sys.exit(0)
    app.run(main, argv=argv, flags_parser=parse_or_fail)


if __name__ == "__main__":
    cli()
