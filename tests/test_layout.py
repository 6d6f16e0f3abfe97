"""The package layout's rules, checked on the source: small modules and functions, a model that knows nothing about
files or the command line, library code that never looks at terminals, no import cycles (imports inside functions
and under TYPE_CHECKING count: they are knowledge of the other module too), no underscore names taken from another
module."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import vip2clip

PACKAGE = Path(vip2clip.__file__).parent
MODULES = sorted(PACKAGE.rglob("*.py"))
MAX_LINES = 400
MAX_FUNCTION_LINES = 70
# Functions still over the limit (to split; nothing may join this list).
KNOWN_LONG_FUNCTIONS: dict[str, set[str]] = {}
# What each layer may import from the package (besides itself): the model and the metrics sit at the bottom.
ALLOWED = {
    "model": {"vip2clip", "vip2clip.config", "vip2clip.outputs", "vip2clip.utils"},
    "metrics": set(),
    "utils": set(),
}


def _package_of(path: Path) -> str:
    return path.relative_to(PACKAGE).parts[0] if len(path.relative_to(PACKAGE).parts) > 1 else ""


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _module_graph() -> dict[str, set[str]]:
    """Each package module -> the package modules it imports anywhere (top level, functions, TYPE_CHECKING);
    `from vip2clip.x import y` counts as importing vip2clip.x.y when that is a module."""
    modules = {_module_name(path): path for path in MODULES}
    graph = {}
    for name, path in modules.items():
        targets = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                targets.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets.add(node.module)
                targets.update(f"{node.module}.{alias.name}" for alias in node.names)
        graph[name] = (targets & set(modules)) - {name}
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_modules_stay_small(path: Path) -> None:
    assert len(path.read_text(encoding="utf-8").splitlines()) <= MAX_LINES


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_functions_stay_small(path: Path) -> None:
    """No function (or method) longer than MAX_FUNCTION_LINES, its signature and docstring included."""
    known = KNOWN_LONG_FUNCTIONS.get(path.relative_to(PACKAGE).as_posix(), set())
    long = [
        f"{node.name} ({node.end_lineno - node.lineno + 1} lines)"
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8")))
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
        and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES
        and node.name not in known
    ]
    assert not long, f"{path}: {', '.join(long)}"


def _is_data_table(node: ast.AST) -> bool:
    """A literal tuple, list, set or dict of constants (names of classes, aliases): laid out as a table."""
    if isinstance(node, ast.Constant):
        return True
    if isinstance(node, ast.Tuple | ast.List | ast.Set):
        return all(_is_data_table(item) for item in node.elts)
    if isinstance(node, ast.Dict):
        return all(key is not None and _is_data_table(key) for key in node.keys) and all(
            _is_data_table(value) for value in node.values
        )
    return False


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_formatter_is_switched_off_for_data_tables_only(path: Path) -> None:
    """`# fmt: skip` keeps a table of names on few lines; code is laid out by the formatter (a module that only
    fits its size limit when squeezed is split by responsibility instead)."""
    source = path.read_text(encoding="utf-8")
    tables = {
        node.end_lineno
        for node in ast.walk(ast.parse(source))
        if isinstance(node, ast.Assign | ast.AnnAssign) and node.value is not None and _is_data_table(node.value)
    }
    skipped = [number for number, line in enumerate(source.splitlines(), 1) if line.endswith("# fmt: skip")]
    assert set(skipped) <= tables, f"{path}: fmt: skip on code at lines {sorted(set(skipped) - tables)}"


def test_the_table_rule_tells_tables_from_code() -> None:
    assert _is_data_table(ast.parse("x = ('a', 'b', {'c': 1})").body[0].value)
    assert not _is_data_table(ast.parse("x = (f(a), 'b')").body[0].value)


@pytest.mark.parametrize("path", [p for p in MODULES if _package_of(p) != "cli"], ids=lambda p: p.name)
def test_library_code_leaves_terminals_and_argv_to_the_cli(path: Path) -> None:
    imports = _imports(path)
    assert not imports & {"tqdm", "argparse"}, f"{path}: progress bars and arguments belong to vip2clip.cli"
    source = path.read_text(encoding="utf-8")
    assert "isatty" not in source and "sys.argv" not in source


@pytest.mark.parametrize("path", [p for p in MODULES if _package_of(p) in ALLOWED], ids=lambda p: p.name)
def test_lower_layers_do_not_import_upper_ones(path: Path) -> None:
    layer = _package_of(path)
    allowed = ALLOWED[layer] | {f"vip2clip.{layer}"}
    for name in _imports(path):
        if name == "vip2clip" or name.startswith("vip2clip."):
            # "vip2clip" itself (the version) is allowed, not everything under it
            assert any(name == a or (a != "vip2clip" and name.startswith(a + ".")) for a in allowed), (
                f"{path} imports {name}"
            )


def test_no_import_cycles() -> None:
    assert _cycles(_module_graph()) == []


def test_the_cycle_finder_finds_cycles() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": {"e"}}
    assert _cycles(graph) == [["a", "b", "c"]]


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_underscore_names_from_other_modules(path: Path) -> None:
    """A name with a leading underscore is private to its module: shared ones get a public name (or a core module
    names them without one)."""
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("vip2clip"):
            private = [a.name for a in node.names if a.name.startswith("_") and not a.name.startswith("__")]
            assert not private, f"{path} imports {private} from {node.module}"


def test_the_output_types_sit_below_everything() -> None:
    """`vip2clip.outputs` is read by the model, the ONNX engine, inference and evaluation: it imports nothing of
    the package (and no torch, checked in tests/test_outputs.py)."""
    assert not {name for name in _imports(PACKAGE / "outputs.py") if name.startswith("vip2clip")}


def test_public_entry_points() -> None:
    assert callable(vip2clip.create_model) and callable(vip2clip.preprocess)
    assert vip2clip.Predictor.__module__ == "vip2clip.inference.predictor"
    assert callable(vip2clip.metrics.compute_all) and callable(vip2clip.metrics.aupro)
    with pytest.raises(AttributeError):
        vip2clip.does_not_exist  # noqa: B018
