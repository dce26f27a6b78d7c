"""Logs: our own messages from info up, the libraries' from --library_log_level up; W/log.txt
and W/config.json."""

import logging as py_logging
import os

from absl import logging

from hassod_jax import utils

_PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class LibraryLogFilter(py_logging.Filter):
    """Passes every record at or above `level`, and hassod_jax's own records at any level."""

    def __init__(self, level="warning"):
        super().__init__()
        self.level = getattr(py_logging, level.upper())

    def filter(self, record):
        if record.levelno >= self.level:
            return True
        path = os.path.abspath(record.pathname or "")
        return path.startswith(_PACKAGE_DIR + os.sep)


def _process_index():
    """This process's index when several JAX processes run (jax.distributed), else 0."""
    from hassod_jax import parallel

    if not parallel.distributed_requested():
        return 0
    import jax

    parallel.maybe_initialize_distributed()
    return jax.process_index()


def setup_run_files(config, workdir, library_log_level="warning"):
    """Filters library logs, adds W/log.txt (appended; W/log.txt.rankN on other processes) and
    writes W/config.json (process 0). Returns the file handler."""
    os.makedirs(workdir, exist_ok=True)
    log_filter = LibraryLogFilter(library_log_level)
    absl_handler = logging.get_absl_handler()
    absl_handler.addFilter(log_filter)
    rank = _process_index()
    name = "log.txt" if rank == 0 else f"log.txt.rank{rank}"
    handler = py_logging.FileHandler(os.path.join(workdir, name), mode="a", encoding="utf-8")
    handler.setFormatter(logging.PythonFormatter())
    handler.addFilter(log_filter)
    handler.setLevel(py_logging.DEBUG)
    py_logging.getLogger().addHandler(handler)
    logging.set_verbosity(logging.DEBUG if library_log_level == "debug" else logging.INFO)
    if rank == 0:
        text = config.to_json_best_effort(indent=1, sort_keys=True) + "\n"
        utils.atomic_write_bytes(os.path.join(workdir, "config.json"), text.encode("utf-8"))
    return handler


def log_to_file(handler, level, message):
    """Writes a record to log.txt only (the terminal gets its own one-line message)."""
    if handler is None:
        return
    record = py_logging.LogRecord("absl", level, __file__, 0, message, (), None)
    handler.handle(record)
