"""`--help`: the modes, or one config's fields with their values and comments."""

import ast
import io
import re
import sys
import tokenize

from hassod_jax import defaults
from hassod_jax.cli.flags import FLAGS, LIBRARY_LOG_LEVELS, field_paths, flag_value, parse_flags
from hassod_jax.modes import MODES


def wants_help(argv):
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
    try:
        own = open(config_path, encoding="utf-8").read()
        base = open(defaults.__file__, encoding="utf-8").read()
        own_tree, base_tree = ast.parse(own), ast.parse(base)
    except (OSError, SyntaxError):
        return {}
    functions = {n.name: n for n in base_tree.body if isinstance(n, ast.FunctionDef)}

    def called(tree, module_prefix):
        # A config file names defaults.X (called, or handed to defaults.preset); inside
        # defaults.py the trees call each other by bare name.
        names = []
        for node in ast.walk(tree):
            if module_prefix and isinstance(node, ast.Attribute) and node.attr in functions:
                names.append(node.attr)
            elif not module_prefix and isinstance(node, ast.Call):
                f = node.func
                if isinstance(f, ast.Name) and f.id in functions:
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
    for name, mode in MODES.items():
        lines.append(f"  {name:<20} {mode.config:<32} {mode.help}")
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
    rest = [a for a in argv if not wants_help([None, a])]
    if flag_value(rest, "config"):
        parse_flags(rest, require_workdir=False)
        print(config_help(FLAGS.config, flag_value(rest, "config").partition(":")[0]), file=out)
    else:
        print(general_help(), file=out)
