"""A type checker sees the public API: `src/vip2clip/__init__.pyi` names every attribute that `vip2clip/__init__.py`
loads lazily, and mypy, run over a small user script, shows `create_model`'s signature and reports misuse."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

import vip2clip

PACKAGE = Path(vip2clip.__file__).parent
USER_SCRIPT = """\
import vip2clip

reveal_type(vip2clip.create_model)
model = vip2clip.create_model("tiny", image_size="large")
reveal_type(model.preprocess)
reveal_type(vip2clip.Predictor.from_checkpoint)
vip2clip.create_modle("tiny")
"""
# Third-party packages (torch, open_clip, PIL, ...) are not followed: they become Any, and the check takes seconds.
MYPY_CONFIG = """\
[mypy]
follow_imports = skip
ignore_missing_imports = True

[mypy-vip2clip,vip2clip.*]
follow_imports = silent
"""


def test_the_stub_names_what_the_package_loads_lazily() -> None:
    stub = ast.parse((PACKAGE / "__init__.pyi").read_text(encoding="utf-8"))
    imported = {
        alias.asname: node.module for node in stub.body if isinstance(node, ast.ImportFrom) for alias in node.names
    }
    lazy = {**vip2clip._LAZY_ATTRIBUTES, **{name: "vip2clip" for name in vip2clip._LAZY_MODULES}}
    assert imported == lazy
    assert sorted([*imported, "__version__"]) == sorted(vip2clip.__all__)


def test_mypy_sees_the_signatures_of_the_top_level(tmp_path: Path) -> None:
    pytest.importorskip("mypy", reason="mypy is in the dev extra")
    (tmp_path / "user.py").write_text(USER_SCRIPT, encoding="utf-8")
    (tmp_path / "mypy.ini").write_text(MYPY_CONFIG, encoding="utf-8")
    command = [sys.executable, "-m", "mypy", "--config-file", "mypy.ini", "--cache-dir", ".cache", "user.py"]
    env = {**os.environ, "MYPYPATH": str(PACKAGE.parent)}
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    lines = result.stdout.splitlines()
    assert result.returncode == 1, result.stdout + result.stderr  # the two mistakes of the script, nothing else
    assert lines[-1] == "Found 2 errors in 1 file (checked 1 source file)"
    create_model, preprocess, from_checkpoint = [line for line in lines if "Revealed type" in line]
    assert "def (backbone: str | None =, *, clip_weights: str | pathlib.Path | None =" in create_model
    assert "random_init: bool =" in create_model and create_model.endswith('-> vip2clip.model.vip2clip.ViP2CLIP"')
    assert "def (image:" in preprocess
    assert from_checkpoint.endswith('-> vip2clip.inference.predictor.Predictor"')
    assert any('Argument "image_size" to "create_model" has incompatible type "str"' in line for line in lines)
    assert any('Module has no attribute "create_modle"' in line for line in lines)
