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
# The architecture: the package's floors, bottom first. A module may import the package's modules on lower floors
# and its own package only, never a sibling on its floor or anything above; the root `vip2clip` (lazy exports) only
# for `__version__`. A new package or top-level module takes its place here. `vip2clip.testing` (the oracles) stands
# apart: it imports nothing of the package and nothing imports it.
FLOORS: tuple[tuple[str, ...], ...] = (
    ("outputs", "metrics", "utils"),  # result types; metrics as pure functions; files, hashing, CPU, progress
    ("config",),  # the model's settings
    ("model",),  # backbone wrapper, prompt learner, FGP, UTPA, checkpoints, weights: no files but its own
    ("data",),  # datasets, images, converters, transforms
    ("visualization",),  # heat maps and panels
    ("factory",),  # one assembly path for the model
    ("features", "onnx"),  # the frozen-feature cache; ONNX export, engines and INT8
    ("scoring",),  # beyond one image: tiling, reference images, mutual scoring
    ("inference",),  # Predictor: engine, thresholds, calibration, identity
    ("runs", "training"),  # folder runs (predict, calibrate, explain); the training loop and losses
    ("evaluation",),  # the evaluator: metrics per class and dataset, reports, the paper's printed numbers
    ("paper",),  # the paper's harness: studies, seeds, figures, efficiency
    ("integrations", "apps"),  # anomalib; demo and serve
    ("cli",),  # the command line
    ("__main__",),
)
FLOOR_OF = {name: level for level, names in enumerate(FLOORS) for name in names}


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


def _part(module: str) -> str:
    """vip2clip.inference.predictor -> inference; vip2clip.config -> config; vip2clip -> ''."""
    return module.split(".")[1] if "." in module else ""


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_go_down_the_floors_only(path: Path) -> None:
    part = _part(_module_name(path))
    if part in ("", "testing"):
        return
    assert part in FLOOR_OF, f"{path}: vip2clip.{part} has no floor in FLOORS: give it its place"
    tree = ast.parse(path.read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module == "vip2clip" and node.level == 0:
            assert [a.name for a in node.names] == ["__version__"], f"{path}: from the root only __version__"
    for name in _imports(path):
        if not name.startswith("vip2clip.") or _part(name) == part:
            continue
        target = _part(name)
        assert target != "testing", f"{path} imports the test oracles ({name})"
        assert FLOOR_OF.get(target, len(FLOORS)) < FLOOR_OF[part], (
            f"{path} imports {name}: vip2clip.{target} is not below vip2clip.{part} (tests/test_layout.py FLOORS)"
        )


def test_every_package_has_a_floor() -> None:
    parts = {_part(_module_name(path)) for path in MODULES} - {"", "testing"}
    assert parts == set(FLOOR_OF)


def test_the_oracles_import_nothing_of_the_package() -> None:
    for path in sorted((PACKAGE / "testing").glob("*.py")):
        assert not {name for name in _imports(path) if name.startswith("vip2clip")}, path


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


# Keyword-only parameters: a function takes at most two positional parameters (besides self/cls) when it is public
# (dunder methods included) or has more than four parameters; the rest come after `*`, so that a call names its
# options and a new option does not shift the others. Exempt: signatures that a framework calls positionally,
# listed here with the framework ("module path::qualified name": why).
MAX_POSITIONAL = 2
DICTATED_SIGNATURES: dict[str, str] = {
    "integrations/anomalib_processing.py::ReleasePreProcessor.on_validation_batch_start": "Lightning Callback hook",
    "integrations/anomalib_processing.py::ReleasePreProcessor.on_test_batch_start": "Lightning Callback hook",
    "integrations/anomalib_processing.py::ReleasePreProcessor.on_predict_batch_start": "Lightning Callback hook",
    "cli/train.py::_OldTrainingBatchFlag.__call__": "argparse.Action.__call__ (argparse calls it positionally)",
}


def _signature_problems(source: str, where: str) -> list[str]:
    """The functions of `source` (module path `where`, the key of DICTATED_SIGNATURES) that break the rule."""
    tree = ast.parse(source)
    problems = []

    def visit(node: ast.AST, owner: str, in_class: bool, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.ClassDef):
                visit(child, f"{owner}{child.name}.", True, in_function)
            elif isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef):
                name = f"{owner}{child.name}"
                positional = [a.arg for a in child.args.posonlyargs + child.args.args]
                if in_class and positional and positional[0] in ("self", "cls"):
                    positional = positional[1:]
                total = len(positional) + len(child.args.kwonlyargs)
                dunder = child.name.startswith("__") and child.name.endswith("__")
                public = (not child.name.startswith("_") or dunder) and not in_function
                key = f"{where}::{name}"
                if (public or total > 4) and len(positional) > MAX_POSITIONAL and key not in DICTATED_SIGNATURES:
                    problems.append(f"{name} ({len(positional)} positional: {', '.join(positional)})")
                visit(child, f"{name}.", False, True)

    visit(tree, "", False, False)
    return problems


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_options_are_keyword_only(path: Path) -> None:
    problems = _signature_problems(path.read_text(encoding="utf-8"), path.relative_to(PACKAGE).as_posix())
    assert not problems, f"{path}: put the parameters after the first {MAX_POSITIONAL} behind `*`: {problems}"


def _dataclass_problems(source: str) -> list[str]:
    problems = []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.ClassDef):
            continue
        fields = [item for item in node.body if isinstance(item, ast.AnnAssign)]
        marker = [i for i, item in enumerate(fields) if ast.unparse(item.annotation).endswith("KW_ONLY")]
        positional = marker[0] if marker else len(fields)
        for decorator in node.decorator_list:
            text = ast.unparse(decorator)
            is_dataclass = text.startswith(("dataclass", "dataclasses.dataclass"))
            if is_dataclass and "kw_only" not in text and len(fields) > 4 and positional > MAX_POSITIONAL:
                problems.append(f"{node.name} ({len(fields)} fields)")
    return problems


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_records_of_more_than_four_fields_are_built_by_name(path: Path) -> None:
    """A dataclass with more than four fields is `kw_only=True`, or keeps at most two positional fields before a
    `_: KW_ONLY` marker: `Spec(a, None, True, ...)` cannot be read."""
    problems = _dataclass_problems(path.read_text(encoding="utf-8"))
    assert not problems, f"{path}: make these @dataclass(kw_only=True): {problems}"


def test_the_signature_rules_find_long_positional_signatures() -> None:
    source = """
def public(a, b, c): ...
def fine(a, b, *, c, d, e): ...
def _private(a, b, c, d): ...
def _long(a, b, c, d, e): ...
class K:
    def method(self, a, b): ...
    def __init__(self, a, b, c): ...
@dataclass(frozen=True)
class R:
    a: int
    b: int
    c: int
    d: int
    e: int
@dataclass(frozen=True)
class Marked:
    a: int
    b: int
    _: KW_ONLY
    c: int
    d: int
    e: int
@dataclass(frozen=True)
class Late:
    a: int
    b: int
    c: int
    _: KW_ONLY
    d: int
    e: int
"""
    found = [problem.split(" ")[0] for problem in _signature_problems(source, "x.py")]
    assert found == ["public", "_long", "K.__init__"]
    assert _dataclass_problems(source) == ["R (5 fields)", "Late (6 fields)"]
