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

import ast
import difflib
import importlib
import importlib.util
import io
import logging as py_logging
import os
import re
import sys
import tokenize
import traceback

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
    "prepare_gt": "hassod_jax.data.prepare_gt:run",
    "evaluate": "hassod_jax.evaluate.coco_eval:run",
    "predict": "hassod_jax.evaluate.predict:run",
}

# mode -> (the config file that sets it, what it does), for --help.
MODE_HELP = {
    "demo": (
        "configs/demo.py",
        "the embedded default: stage 1 on generated scenes and photos, "
        "a short detector run, metrics and pictures; no downloads",
    ),
    "discover": (
        "configs/discover_coco.py",
        "stage 1: a folder of images -> hierarchical pseudo-labels (resumable, shardable)",
    ),
    "sweep": (
        "configs/sweep_thresholds.py",
        "many HAC thresholds from one merge sequence per "
        "image; statistics, AR/AP with ground truth, a plot",
    ),
    "merge_pseudo_labels": (
        "configs/merge_pseudo_labels.py",
        "joins the shards of independent discovery jobs",
    ),
    "train": ("configs/train_coco.py", "stage 2: Cascade Mask R-CNN on the pseudo-labels"),
    "mean_teacher": (
        "configs/mean_teacher_coco.py",
        "stage 2, second part: Mean Teacher self-training from a trained detector",
    ),
    "evaluate": ("configs/evaluate.py", "class-agnostic COCO AP/AR of a prediction file"),
    "prepare_gt": (
        "configs/prepare_gt.py",
        "class-agnostic ground truth from COCO, LVIS, Objects365, SA-1B, UVO or KITTI files",
    ),
    "predict": (
        "configs/predict.py",
        "a trained detector on your images: predictions.json and pictures",
    ),
}

LIBRARY_LOG_LEVELS = ("debug", "info", "warning", "error")
_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))

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


class UserError(Exception):
    """An error the user can fix from its message alone: shown as one line, exit code 2."""


def user_error_types():
    """The exception types that mean a user error (shown without a traceback)."""
    from hassod_jax import utils
    from hassod_jax.data.images import ImageReadError
    from hassod_jax.weights.torch_reader import CheckpointError

    return (UserError, utils.ConfigError, utils.InputError, CheckpointError, ImageReadError)


def is_user_error(e):
    """True for the types of `user_error_types` and for a FileNotFoundError raised by our own
    checks with a message (those carry no errno; the operating system's always do)."""
    if isinstance(e, FileNotFoundError):
        return e.errno is None
    return isinstance(e, user_error_types())


def resolve_mode(mode):
    """Returns the `run` callable for `mode`, or raises ValueError naming the valid modes."""
    if mode not in MODES:
        raise ValueError(
            f"Unknown config.mode {mode!r}; set --config.mode to one of: {', '.join(sorted(MODES))}"
        )
    module_name, fn_name = MODES[mode].split(":")
    return getattr(importlib.import_module(module_name), fn_name)


# ----------------------------------------------------------------------------------------------
# Reading the command line before absl does, to name the problem in one line.


def _flag_value(argv, name):
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
    config_spec = _flag_value(argv, "config")
    if not config_spec:
        raise UserError(
            "--config is required: pass a config file, e.g. --config configs/demo.py "
            "(python -m hassod_jax.main --help lists the modes and their configs)"
        )
    if require_workdir and not _flag_value(argv, "workdir"):
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


# ----------------------------------------------------------------------------------------------
# --help


def _wants_help(argv):
    return any(a in ("--help", "-help", "-h", "--helpshort", "-?") for a in argv[1:])


def _source_comments(source, start=1, end=None):
    """{field path: comment} from `c.NAME = value  # comment` lines (and full-line comments just
    above them) between lines start..end of `source`, and from `NAME=value,  # comment` lines
    inside a `c.NAME = ml_collections.ConfigDict(dict(...))` block (path 'NAME.KEY')."""
    comments = {}
    try:
        for tok in tokenize.generate_tokens(io.StringIO(source).readline):
            if tok.type == tokenize.COMMENT:
                comments[tok.start[0]] = (tok.start[1], tok.string.lstrip("#").strip())
    except (tokenize.TokenError, IndentationError):
        return {}
    lines = source.splitlines()
    end = len(lines) if end is None else end
    out, pending, parent, depth = {}, [], None, 0
    for lineno in range(start, end + 1):
        line = lines[lineno - 1]
        col, comment = comments.get(lineno, (len(line), ""))
        code = line[:col].strip()
        if not code:
            pending = pending + [comment] if comment else []
            continue
        name = None
        m = re.match(r"c\.([\w.]+)\s*=(?!=)", code)
        if m and depth == 0:
            name = parent = m.group(1)
        elif depth > 0 and parent:
            m = re.match(r"[\"']?(\w+)[\"']?\s*[=:](?!=)", code)
            if m:
                name = f"{parent}.{m.group(1)}"
        text = " ".join(pending + ([comment] if comment else []))
        if name and text:
            out[name] = text
        pending = []
        depth += sum(code.count(c) for c in "([{") - sum(code.count(c) for c in ")]}")
        depth = max(depth, 0)
    return out


def config_comments(config_path):
    """Comments on the fields of a config file: those of the `defaults.X()` functions it calls
    (and those they call), then the file's own, later ones winning."""
    from hassod_jax import defaults

    try:
        own = open(config_path, encoding="utf-8").read()
        base = open(defaults.__file__, encoding="utf-8").read()
        own_tree, base_tree = ast.parse(own), ast.parse(base)
    except (OSError, SyntaxError):
        return {}
    functions = {n.name: n for n in base_tree.body if isinstance(n, ast.FunctionDef)}

    def called(tree, module_prefix):
        names = []
        for node in ast.walk(tree):
            if isinstance(node, ast.Call):
                f = node.func
                if module_prefix and isinstance(f, ast.Attribute) and f.attr in functions:
                    names.append(f.attr)
                elif not module_prefix and isinstance(f, ast.Name) and f.id in functions:
                    names.append(f.id)
        return names

    def from_function(name, seen):
        if name in seen:
            return {}
        seen.add(name)
        fn = functions[name]
        out = {}
        for inner in called(fn, module_prefix=False):
            out.update(from_function(inner, seen))
        out.update(_source_comments(base, fn.lineno, fn.end_lineno))
        return out

    out, seen = {}, set()
    for name in called(own_tree, module_prefix=True):
        out.update(from_function(name, seen))
    out.update(_source_comments(own))
    return out


def _format_value(value):
    if value is None:
        return "None"
    return repr(value.to_dict() if hasattr(value, "to_dict") else value)


def config_help(config, config_path):
    """The fields of `config` as `--config.PATH = VALUE  # comment` lines."""
    comments = config_comments(config_path)
    paths = field_paths(config)
    mode = config.get("mode", "?")
    lines = [
        f"{config_path} (mode={mode}): set any field with --config.FIELD=VALUE",
        "",
    ]
    rows = []
    for path, value in paths.items():
        shown = _format_value(value)
        if value is None:
            try:
                field_type = config.get_type(path) if "." not in path else None
            except (AttributeError, KeyError, TypeError):
                field_type = None
            if field_type is not None:
                shown = f"None ({field_type.__name__})"
        rows.append((f"--config.{path} = {shown}", comments.get(path, "")))
    width = min(max((len(a) for a, _ in rows), default=0), 60)
    for a, comment in rows:
        lines.append(f"  {a:<{width}}  # {comment}" if comment else f"  {a}")
    return "\n".join(lines)


def general_help():
    lines = [
        "usage: python -m hassod_jax.main --config configs/NAME.py --workdir DIR "
        "[--config.FIELD=VALUE ...]",
        "",
        "HASSOD in JAX. config.mode (set by the config file) picks what runs:",
        "",
    ]
    for mode in MODES:
        path, what = MODE_HELP.get(mode, ("", ""))
        lines.append(f"  {mode:<20} {path:<32} {what}")
    lines += [
        "",
        "flags:",
        "  --config FILE[:ARG]       the config file (its get_config(ARG) is used)",
        "  --config.FIELD=VALUE      override one field (nested: --config.crf.srgb=5)",
        "  --workdir DIR             outputs, checkpoints, config.json and log.txt go here",
        "  --library_log_level LVL   libraries' messages from this level up "
        f"({'|'.join(LIBRARY_LOG_LEVELS)}; default warning)",
        "  --traceback               show the traceback of user errors too",
        "",
        "--config FILE --help lists that config's fields with their values and comments;",
        "--helpfull lists every absl flag.",
    ]
    return "\n".join(lines)


def print_help(argv, out=None):
    out = out or sys.stdout
    rest = [a for a in argv if not _wants_help([None, a])]
    if _flag_value(rest, "config"):
        parse_flags(rest, require_workdir=False)
        print(config_help(FLAGS.config, _flag_value(rest, "config").partition(":")[0]), file=out)
    else:
        print(general_help(), file=out)


# ----------------------------------------------------------------------------------------------
# Logs: our own messages from info up, the libraries' from --library_log_level up; log.txt.


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

    if not any(os.environ.get(k) for k in parallel._DISTRIBUTED_ENV):
        return 0
    import jax

    parallel.maybe_initialize_distributed()
    return jax.process_index()


def setup_run_files(config, workdir, library_log_level="warning"):
    """Filters library logs, adds W/log.txt (appended; W/log.txt.rankN on other processes) and
    writes W/config.json (process 0). Returns the file handler."""
    from hassod_jax import utils

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


def _log_to_file(handler, level, message):
    """Writes a record to log.txt only (the terminal gets its own one-line message)."""
    if handler is None:
        return
    record = py_logging.LogRecord("absl", level, __file__, 0, message, (), None)
    handler.handle(record)


# ----------------------------------------------------------------------------------------------
# Running


def _fail(message, code=2):
    print(f"error: {message}", file=sys.stderr)
    sys.exit(code)


def _parse_or_fail(argv):
    try:
        return parse_flags(argv)
    except UserError as e:
        _fail(str(e))


def main(argv):
    if len(argv) > 1:
        _fail(f"unexpected arguments: {' '.join(argv[1:])} (fields are set as --config.FIELD=V)")
    config = FLAGS.config
    if "mode" not in config:
        _fail(f"the config has no 'mode' field; add one of: {', '.join(sorted(MODES))}")
    if config.mode not in MODES:
        _fail(
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
            _log_to_file(handler, py_logging.ERROR, f"error: {e}")
            _fail(str(e))
        _log_to_file(handler, py_logging.ERROR, traceback.format_exc())
        raise
    finally:
        if handler is not None:
            py_logging.getLogger().removeHandler(handler)
            handler.close()


def cli(argv=None):
    argv = list(sys.argv if argv is None else argv)
    if _wants_help(argv):
        try:
            print_help(argv)
        except UserError as e:
            _fail(str(e))
        sys.exit(0)
    app.run(main, argv=argv, flags_parser=_parse_or_fail)


if __name__ == "__main__":
    cli()
