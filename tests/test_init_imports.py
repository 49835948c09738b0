"""The import structure of eva_bench/init/: no module imports back from the package's ``__init__`` (which imports
every method module, so such an import only works from inside a function, late), and no two modules import each
other, directly or through others. Read from the source with ``ast``, function-level imports included."""

import ast
from pathlib import Path

import eva_bench.init

PACKAGE = "eva_bench.init"
INIT_DIR = Path(eva_bench.init.__file__).parent


def sibling_imports(path: Path, package_dir: Path, package: str) -> set[str]:
    """The modules of the package that ``path`` imports, by name; ``"__init__"`` for a name taken from the package
    itself (``from . import find_targets``, ``from eva_bench.init import X``) rather than one of its modules."""
    modules = {p.stem for p in package_dir.glob("*.py")} - {"__init__"}
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.ImportFrom):
            if node.level == 1:
                target = node.module
            elif node.level == 0 and node.module and (node.module + ".").startswith(package + "."):
                target = node.module.removeprefix(package).removeprefix(".") or None
            else:
                continue  # outside the package (``from .. import distributed``, third-party)
            if target is None:  # from the package itself: each name is a module or something __init__ defines
                found |= {a.name if a.name in modules else "__init__" for a in node.names}
            else:
                found.add(target.split(".")[0])
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name == package:
                    found.add("__init__")
                elif alias.name.startswith(package + "."):
                    found.add(alias.name.removeprefix(package + ".").split(".")[0])
    return found


def import_graph(package_dir: Path, package: str) -> dict[str, set[str]]:
    return {p.stem: sibling_imports(p, package_dir, package) for p in sorted(package_dir.glob("*.py"))}


def find_circle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle (its modules in order, the first repeated at the end), or None."""
    state: dict[str, str] = {}  # "open" while on the DFS path, "done" after

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = "open"
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state:
                circle = visit(nxt, path + [nxt])
                if circle:
                    return circle
        state[node] = "done"
        return None

    for start in sorted(graph):
        if start not in state:
            circle = visit(start, [start])
            if circle:
                return circle
    return None


def test_no_module_imports_from_the_package_init():
    graph = import_graph(INIT_DIR, PACKAGE)
    offenders = sorted(name for name, imported in graph.items() if name != "__init__" and "__init__" in imported)
    assert not offenders, f"these modules import from eva_bench/init/__init__.py: {offenders}"


def test_no_import_circle_among_init_modules():
    graph = import_graph(INIT_DIR, PACKAGE)
    assert set(graph["__init__"]) >= {"eva", "lora_da", "svd", "targets"}  # the graph sees the package's imports
    assert find_circle(graph) is None, f"import circle: {' -> '.join(find_circle(graph))}"


def test_the_checks_see_lazy_imports_and_circles(tmp_path):
    """The checks above on a package that breaks both rules, inside a function where a lazy import would hide."""
    (tmp_path / "__init__.py").write_text("from . import a\nTHING = 1\n")
    (tmp_path / "a.py").write_text("def f():\n    from . import THING\n    from .b import g\n")
    (tmp_path / "b.py").write_text("from pkg.a import f\n")
    graph = import_graph(tmp_path, "pkg")
    assert graph == {"__init__": {"a"}, "a": {"__init__", "b"}, "b": {"a"}}
    assert find_circle(graph) == ["__init__", "a", "__init__"]


def test_the_library_s_tests_import_no_task_module():
    """Tests of eva_bench/init (test_init_*.py) build their models and batches with tests/helpers.py: a recipe's
    test (test_language_eva_is_peft.py) is where a task's data meets the library."""
    tests = sorted(Path(__file__).parent.glob("test_init_*.py"))
    imported = {path.name: {alias.name for node in ast.walk(ast.parse(path.read_text()))
                            for alias in getattr(node, "names", []) if isinstance(node, ast.Import)} |
                {node.module for node in ast.walk(ast.parse(path.read_text()))
                 if isinstance(node, ast.ImportFrom) and node.module}
                for path in tests}
    assert tests and not {name: sorted(m for m in found if m.split(".")[0] == "tasks")
                          for name, found in imported.items() if any(m.split(".")[0] == "tasks" for m in found)}
