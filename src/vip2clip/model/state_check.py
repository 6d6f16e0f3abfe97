"""One readable description of how a state dict fails to fit a module (missing, unexpected, wrong shapes)."""

from __future__ import annotations

from collections.abc import Mapping

import torch

_SHOWN = 5


def _listed(keys: list[str]) -> str:
    return f"{keys[:_SHOWN]}{'...' if len(keys) > _SHOWN else ''}"


def state_mismatch(expected: Mapping[str, torch.Tensor], given: Mapping[str, torch.Tensor]) -> str | None:
    """None when `given` has exactly the keys and shapes of `expected`, else what differs."""
    missing = sorted(set(expected) - set(given))
    unexpected = sorted(set(given) - set(expected))
    wrong = [
        f"{key}: given {tuple(given[key].shape)} vs expected {tuple(expected[key].shape)}"
        for key in sorted(set(expected) & set(given))
        if given[key].shape != expected[key].shape
    ]
    parts = [
        f"missing keys {_listed(missing)}" if missing else "",
        f"unexpected keys {_listed(unexpected)}" if unexpected else "",
        f"wrong shapes {wrong[:_SHOWN]}" if wrong else "",
    ]
    return "; ".join(part for part in parts if part) or None
