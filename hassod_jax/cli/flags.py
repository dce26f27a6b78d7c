"""The absl flags, and reading the command line before absl does to name a mistake in one line."""

import difflib
import importlib.util
import os
import re

from absl import flags
from ml_collections import config_flags

from hassod_jax.cli.errors import UserError, fail

LIBRARY_LOG_LEVELS = ("debug", "info", "warning", "error")

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file(
    "config", None, "Path to an ml_collections config file (configs/*.py).", lock_config=True
)
flags.DEFINE_string("workdir", None, "Directory for outputs, checkpoints and logs.")
flags.DEFINE_enum(
    "library_log_level",
    "warning",
    LIBRARY_LOG_LEVELS,
    "Lowest level of the libraries' (orbax, jax, ...) log messages that are shown; "
    "hassod_jax's own messages are shown from info up.",
)
flags.DEFINE_bool("traceback", False, "Show the traceback of user errors too.")


def flag_value(argv, name):
    """The last value given to --name (or -name) in argv, '--name=v' or '--name v'; None."""
    value = None
    for i, arg in enumerate(argv[1:], start=1):
        for dashes in ("--", "-"):
            if arg == dashes + name and i + 1 < len(argv):
                value = argv[i + 1]
            elif arg.startswith(dashes + name + "="):
                value = arg[len(dashes + name) + 1 :]
    return value


def _config_overrides(argv):
    """The field paths overridden by --config.PATH[=value] arguments, e.g. 'crf.srgb'."""
    paths = []
    for arg in argv[1:]:
        m = re.match(r"--?config\.([^=\s]+)", arg)
        if m:
            paths.append(m.group(1))
    return paths


def load_config_file(spec):
    """Loads `FILE[:ARG]` as ml_collections' config flag does (get_config(ARG)); UserError on
    a missing file or a failing get_config."""
    path, _, arg = spec.partition(":")
    if not os.path.isfile(path):
        raise UserError(
            f"--config {path}: no such file; pass one of configs/*.py "
            "(python -m hassod_jax.main --help lists them)"
        )
    try:
        module_spec = importlib.util.spec_from_file_location("hassod_jax_user_config", path)
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)
        return module.get_config(arg) if arg else module.get_config()
    except Exception as e:  # noqa: BLE001 - any failure of the user's file is reported as is
        raise UserError(f"--config {path}: cannot load it ({type(e).__name__}: {e})") from None


def field_paths(config, prefix=""):
    """{dotted path: value} of every leaf of a ConfigDict (nested ConfigDicts walked)."""
    out = {}
    for key in sorted(config.keys()):
        value = config[key]
        path = f"{prefix}{key}"
        if hasattr(value, "keys") and hasattr(value, "lock"):
            out.update(field_paths(value, path + "."))
        else:
            out[path] = value
    return out


def _known_path(config, path):
    node = config
    for part in re.sub(r"\[[^\]]*\]", "", path).split("."):
        if not hasattr(node, "keys") or part not in node:
            return False
        node = node[part]
    return True


def check_overrides(config, argv, config_path):
    """UserError for a --config.PATH that names no field, with the closest fields."""
    known = list(field_paths(config))
    groups = [p.rsplit(".", 1)[0] for p in known if "." in p]
    for path in _config_overrides(argv):
        if _known_path(config, path):
            continue
        close = difflib.get_close_matches(path, known + groups, n=3, cutoff=0.6)
        hint = (
            "did you mean " + " or ".join(f"--config.{c}" for c in close) + "?"
            if close
            else f"--config {config_path} --help lists its fields"
        )
        raise UserError(f"--config.{path}: {config_path} has no field {path!r}; {hint}")


def _clean_flag_error(e, config=None):
    """One line for an absl/ml_collections flag error, with the field's type when known."""
    text = " ".join(str(e).split())
    m = re.match(r"flag --config\.([\w.]+)=", text)
    if m and config is not None and m.group(1) in field_paths(config):
        value = field_paths(config)[m.group(1)]
        text += f" (the field holds {type(value).__name__}, default {value!r})"
    return text


def parse_flags(argv, require_workdir=True):
    """absl's flag parsing behind checks that name a user's mistake in one line."""
    if any(a.lstrip("-").startswith(("helpfull", "helpxml")) for a in argv[1:]):
        return FLAGS(argv)  # absl prints every flag and exits
    config_spec = flag_value(argv, "config")
    if not config_spec:
        raise UserError(
            "--config is required: pass a config file, e.g. --config configs/demo.py "
            "(python -m hassod_jax.main --help lists the modes and their configs)"
        )
    if require_workdir and not flag_value(argv, "workdir"):
        raise UserError("--workdir is required: the directory for outputs, checkpoints and logs")
    config_path = config_spec.partition(":")[0]
    config = load_config_file(config_spec)
    check_overrides(config, argv, config_path)
    try:
        rest = FLAGS(argv)
        FLAGS.config.keys()  # a failure to load the config surfaces here
    except flags.Error as e:
        raise UserError(_clean_flag_error(e, config)) from None
    except (AttributeError, KeyError, TypeError, ValueError, OSError) as e:
        raise UserError(f"--config {config_path}: {_clean_flag_error(e, config)}") from None
    return rest


def parse_or_fail(argv):
    try:
        return parse_flags(argv)
    except UserError as e:
        fail(str(e))
