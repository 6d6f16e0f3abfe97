"""Progress reporting without terminals in library code.

Library functions take a `progress` callable that wraps an iterable (`progress(items, total=N, desc="...")`) and
yields the same items; the default, `silent`, shows nothing. The command line passes a tqdm-based one when stderr
is a terminal (`vip2clip.cli.common.progress_for`), so the library never looks at terminals or argv.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Protocol, TypeVar

T = TypeVar("T")


class Progress(Protocol):
    def __call__(self, items: Iterable[T], *, total: int | None = None, desc: str = "") -> Iterable[T]: ...


def silent(items: Iterable[T], *, total: int | None = None, desc: str = "") -> Iterable[T]:
    """A `Progress` that shows nothing."""
    return items
