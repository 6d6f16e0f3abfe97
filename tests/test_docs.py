"""The public API's docstring examples run (those that need files or downloads are marked +SKIP)."""

from __future__ import annotations

import doctest
import importlib

import pytest

DOCUMENTED = (
    "vip2clip.factory",
    "vip2clip.inference.predictor",
    "vip2clip.evaluation.evaluate",
    "vip2clip.onnx.export",
    "vip2clip.onnx.engine",
    "vip2clip.model.presets",
    "vip2clip.metrics",
    "vip2clip.outputs",
)


@pytest.mark.parametrize("name", DOCUMENTED)
def test_docstring_examples_run(name: str) -> None:
    module = importlib.import_module(name)
    failures, _ = doctest.testmod(module, optionflags=doctest.ELLIPSIS, raise_on_error=False)
    assert failures == 0


@pytest.mark.parametrize(
    ("name", "function"),
    [("vip2clip.factory", "create_model"), ("vip2clip.inference.predictor", "Predictor"),
     ("vip2clip.evaluation.evaluate", "evaluate"), ("vip2clip.onnx.export", "export_onnx"),
     ("vip2clip.onnx.engine", "load_onnx"), ("vip2clip.outputs", "ImageItem"),
     ("vip2clip.outputs", "ImageBatch")],
)  # fmt: skip
def test_public_api_documents_args_returns_raises_example(name: str, function: str) -> None:
    documented = getattr(importlib.import_module(name), function)
    text = documented.__doc__
    sections = (
        ("Args:", "Raises:", "Example:")
        if isinstance(documented, type)
        else ("Args:", "Returns:", "Raises:", "Example:")
    )
    assert all(section in text for section in sections)
