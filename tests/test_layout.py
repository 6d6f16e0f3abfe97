"""The package layout's rules, checked on the source: small modules, a model that knows nothing about files or
the command line, library code that never looks at terminals."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import vip2clip

PACKAGE = Path(vip2clip.__file__).parent
MODULES = sorted(PACKAGE.rglob("*.py"))
MAX_LINES = 400
# What each layer may import from the package (besides itself): the model and the metrics sit at the bottom.
ALLOWED = {
    "model": {"vip2clip", "vip2clip.config", "vip2clip.utils"},
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


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_modules_stay_small(path: Path) -> None:
    assert len(path.read_text(encoding="utf-8").splitlines()) <= MAX_LINES


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
            assert any(name == a or name.startswith(a + ".") for a in allowed), f"{path} imports {name}"


def test_public_entry_points() -> None:
    assert callable(vip2clip.create_model) and callable(vip2clip.preprocess)
    assert vip2clip.Predictor.__module__ == "vip2clip.inference.predictor"
    assert callable(vip2clip.metrics.compute_all) and callable(vip2clip.metrics.aupro)
    with pytest.raises(AttributeError):
        vip2clip.does_not_exist  # noqa: B018
