"""The package's layout: no import circle between its modules (imports inside functions
counted too: they still make a module depend on another), and a thin entry point."""

import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = "hassod_jax"


def _modules(root=ROOT):
    """{dotted module name: path} for every .py file of the package."""
    out = {}
    for d, _, files in os.walk(os.path.join(root, PACKAGE)):
        for f in files:
            if f.endswith(".py"):
                path = os.path.join(d, f)
                name = os.path.relpath(path, root)[:-3].replace(os.sep, ".")
                out[name[: -len(".__init__")] if name.endswith(".__init__") else name] = path
    return out


def import_graph(root=ROOT):
    """{module: set of the package's modules it imports anywhere in its file}. `from a import
    b` counts as importing a.b when a.b is a module, else a."""
    modules = _modules(root)
    graph = {}
    for name, path in modules.items():
        package = name if path.endswith("__init__.py") else name.rpartition(".")[0]
        deps = set()
        for node in ast.walk(ast.parse(open(path, encoding="utf-8").read())):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(parts + ([base] if base else []))
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base
                           for a in node.names]
            else:
                continue
            deps.update(t for t in targets if t in modules and t != name)
        graph[name] = deps
    return graph


def cycles(graph):
    """The strongly connected components of more than one module (Tarjan's algorithm)."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_cycle_finder_sees_a_circle_through_a_function_level_import(tmp_path):
    pkg = tmp_path / PACKAGE
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "sub" / "a.py").write_text("from hassod_jax.sub import b\n")
    (pkg / "sub" / "b.py").write_text("def f():\n    from . import c\n")
    (pkg / "sub" / "c.py").write_text("import hassod_jax.sub.a\n")
    (pkg / "d.py").write_text("from hassod_jax.sub import a\n")
    graph = import_graph(str(tmp_path))
    assert graph["hassod_jax.sub.b"] == {"hassod_jax.sub.c"}
    assert cycles(graph) == [["hassod_jax.sub.a", "hassod_jax.sub.b", "hassod_jax.sub.c"]]


def test_the_package_has_no_import_circle():
    graph = import_graph()
    assert len(graph) > 50 and graph["hassod_jax.main"], sorted(graph)
    assert cycles(graph) == []


def test_main_is_thin():
    # main.py parses flags, picks the mode from modes.MODES and runs it; everything else lives in
    # cli/ and modes/.
    with open(os.path.join(ROOT, PACKAGE, "main.py"), encoding="utf-8") as f:
        assert len(f.read().splitlines()) <= 100


# The modules that may read a run's ConfigDict: the modes, the command line, the config trees
# and `utils.require`; and, until it takes typed arguments, discovery's folder-to-JSON job.
CONFIG_READERS = ("modes", "cli", "defaults", "utils", "discovery.pipeline")


def config_reads(path):
    """[(function, line)] where a function reads a parameter named `config` as a ConfigDict:
    `config.get(...)`, `config[...]`, or a section (`config.data.x`, `config.model.x`);
    dataclass configs (DetectorConfig, LoaderConfig) have neither `get` nor sections."""
    out = []
    for f in ast.walk(ast.parse(open(path, encoding="utf-8").read())):
        if not isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        if "config" not in [a.arg for a in f.args.args + f.args.kwonlyargs]:
            continue
        for n in ast.walk(f):
            is_config = lambda x: isinstance(x, ast.Name) and x.id == "config"  # noqa: E731
            if isinstance(n, ast.Subscript) and is_config(n.value):
                out.append((f.name, n.lineno))
            elif isinstance(n, ast.Attribute) and is_config(n.value) and n.attr == "get":
                out.append((f.name, n.lineno))
            elif (isinstance(n, ast.Attribute) and isinstance(n.value, ast.Attribute)
                  and is_config(n.value.value)):
                out.append((f.name, n.lineno))
    return out


def test_config_reader_check_sees_a_configdict_read(tmp_path):
    path = tmp_path / "m.py"
    path.write_text("def f(config):\n    return config.data.buckets\n\n"
                    "def g(config):\n    return config.get('x', 1)\n\n"
                    "def h(config):\n    return config.max_size  # a dataclass field\n")
    assert config_reads(str(path)) == [("f", 2), ("g", 5)]


def test_only_the_modes_read_a_runs_config():
    """The library takes typed arguments; a ConfigDict is read only where a run starts."""
    readers = {}
    for name, path in _modules().items():
        short = name[len(PACKAGE) + 1:]
        if short.split(".")[0] in CONFIG_READERS or short in CONFIG_READERS:
            continue
        if config_reads(path):
            readers[short] = config_reads(path)
    assert readers == {}
