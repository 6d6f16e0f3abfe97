"""vip2clip: ViP²-CLIP zero-shot anomaly detection on a frozen CLIP.

Public API: `create_model`, `preprocess`, `ModelConfig`, `__version__`. They load lazily, so that commands
which need neither torch nor open_clip (dataset conversion, validation) start fast.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "ModelConfig": "vip2clip.config",
    "create_model": "vip2clip.factory",
    "preprocess": "vip2clip.data.transforms",
}
__all__ = ["ModelConfig", "__version__", "create_model", "preprocess"]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'vip2clip' has no attribute {name!r}")
