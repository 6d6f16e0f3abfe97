"""Which anomalib the integration runs on: checked before anything of anomalib is imported.

The range is the one the integration is tested with (CI installs it through the `anomalib` extra); anomalib's
model API (pre-/post-processor hooks, the export mixin, learning types) changed within 2.x, so versions outside
it are refused with the range instead of failing somewhere inside anomalib.
"""

from __future__ import annotations

import importlib

MINIMUM = (2, 7)  # inclusive
BELOW = (2, 8)  # exclusive
SUPPORTED_RANGE = f">={MINIMUM[0]}.{MINIMUM[1]},<{BELOW[0]}.{BELOW[1]}"
INSTALL_HINT = 'pip install "vip2clip[anomalib]"'


def check_version(version: str) -> None:
    """ImportError naming the supported range when `version` (anomalib's `__version__`) lies outside it."""
    numbers = []
    for part in version.split(".")[:2]:
        digits = "".join(c for c in part if c.isdigit())
        numbers.append(int(digits) if digits else -1)
    if len(numbers) < 2 or not MINIMUM <= tuple(numbers) < BELOW:
        raise ImportError(
            f"vip2clip's anomalib integration supports anomalib {SUPPORTED_RANGE}, but anomalib {version} is "
            f"installed; install a supported one: {INSTALL_HINT}"
        )


def require_anomalib() -> None:
    """ImportError naming the extra when anomalib is missing, or the range when its version is outside it."""
    try:
        anomalib = importlib.import_module("anomalib")
    except ImportError as error:
        raise ImportError(
            f"vip2clip.integrations.anomalib needs anomalib {SUPPORTED_RANGE}, which is not installed "
            f"({error}); install the extra: {INSTALL_HINT}"
        ) from None
    check_version(str(getattr(anomalib, "__version__", "unknown")))
