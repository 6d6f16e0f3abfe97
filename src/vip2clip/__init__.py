"""vip2clip: ViP²-CLIP zero-shot anomaly detection on a frozen CLIP.

Public API: `create_model`, `list_models` (presets), `list_pretrained` / `download_pretrained` (published weights),
`preprocess`, `Predictor`, `ImageItem` / `ImageBatch` (what scoring returns, per image and per batch),
`ModelConfig`, `export_onnx`, `load_onnx`, `metrics`, `MutualRule` and `predict_mutual` (batch zero-shot: the
images of a batch score each other), `__version__`. They load lazily, so that commands which need neither torch
nor open_clip (dataset conversion, validation) start fast, and `load_onnx` + `Predictor` run without torch; type
checkers see them through the stub beside this file (`__init__.pyi`).

The package is a stack of floors (written down in tests/test_layout.py, mapped in docs/development.md):
`model/`, `data/`, `features/` (the frozen-feature cache), `onnx/`, `scoring/` (tiling, references, mutual),
`inference/` (Predictor), `runs/` (folder runs), `training/`, `evaluation/`, `paper/` (the paper's studies),
`integrations/`, `apps/` and `cli/`; `testing/` holds the oracles the tests check against.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_LAZY_ATTRIBUTES = {
    "ModelConfig": "vip2clip.config",
    "create_model": "vip2clip.factory",
    "preprocess": "vip2clip.model.preprocessing",
    "Predictor": "vip2clip.inference.predictor",
    "ImageItem": "vip2clip.outputs",
    "ImageBatch": "vip2clip.outputs",
    "export_onnx": "vip2clip.onnx.export",
    "load_onnx": "vip2clip.onnx.engine",
    "list_models": "vip2clip.model.presets",
    "list_pretrained": "vip2clip.model.pretrained",
    "download_pretrained": "vip2clip.model.pretrained",
    "MutualRule": "vip2clip.scoring.mutual_rule",
    "predict_mutual": "vip2clip.scoring.mutual",
}
_LAZY_MODULES = ("metrics",)
__all__ = [
    "ImageBatch",
    "ImageItem",
    "ModelConfig",
    "MutualRule",
    "Predictor",
    "__version__",
    "create_model",
    "download_pretrained",
    "export_onnx",
    "list_models",
    "list_pretrained",
    "load_onnx",
    "metrics",
    "predict_mutual",
    "preprocess",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY_ATTRIBUTES:
        return getattr(importlib.import_module(_LAZY_ATTRIBUTES[name]), name)
    if name in _LAZY_MODULES:
        return importlib.import_module(f"vip2clip.{name}")
    raise AttributeError(f"module 'vip2clip' has no attribute {name!r}")
