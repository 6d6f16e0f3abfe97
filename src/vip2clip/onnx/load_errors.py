"""What an ONNX runtime's failure to load a file means, in one line naming the file: not a model or truncated, its
external data (the weights' side file) missing or damaged, else the runtime's first line of substance."""

from __future__ import annotations

import re
from pathlib import Path


class OnnxLoadError(ValueError):
    """An ONNX file (or its external data) that the runtime cannot load; one line naming the file and the problem."""


# How ONNX Runtime and OpenVINO name an external-data file in their load errors, and say a model is no protobuf.
_EXTERNAL_DATA = re.compile(r'External data path does not exist: "?([^"\n]+)|externally stored data in file \(([^,]+),')
_EXTERNAL_DATA_SHORT = ("out of bounds or can not be read in full", "External initializer")
_NOT_A_MODEL = (
    "Protobuf parsing failed",
    "No graph was found",
    "INVALID_PROTOBUF",
    "can't be parsed",
    "Unable to read the model",
)
_CONTEXT_LINES = ("Exception from", "Check '", "[ONNXRuntimeError]", "FrontEnd API failed", "Loading input model")


def load_problem(path: Path, error: Exception) -> str:
    """One sentence for a runtime's load failure of `path`: not a protobuf / truncated, external data missing
    or truncated, else the runtime's first line of substance (its messages lead with C++ source files)."""
    message = str(error)
    named = _EXTERNAL_DATA.search(message)
    if named or any(marker in message for marker in _EXTERNAL_DATA_SHORT):
        data = Path(next(filter(None, named.groups()))) if named else Path(path.name + ".data")
        data = data if data.is_absolute() else path.parent / data
        if not data.is_file():
            return (
                f"{path}: its external data (the weights) is missing at {data}: copy that file along with the "
                "model (the export wrote it beside the model)"
            )
        return f"{path}: its external data file {data} is truncated or damaged (copy it again, or export again)"
    if any(marker in message for marker in _NOT_A_MODEL):
        return (
            f"{path} is not a readable ONNX model ({path.stat().st_size:,} bytes): not a protobuf, or truncated "
            "(copy it again, or export again with `vip2clip export`)"
        )
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    substance = [line for line in lines if not line.startswith(_CONTEXT_LINES)] or lines or [type(error).__name__]
    return f"{path}: the ONNX runtime cannot load it: {substance[0]}"
