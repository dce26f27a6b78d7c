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
