"""Fetching one URL to a file, only when a user asks (`vip2clip download`): streamed into a temporary file beside
the destination, checked, then renamed into place, so an interrupted or corrupted download never takes the name
of a good file."""

from __future__ import annotations

import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

from vip2clip.utils.fileio import atomic_copy_stream


class DownloadError(OSError):
    """The URL could not be fetched (offline, refused, not found, cut off)."""


class CutOffError(DownloadError):
    """The server announced more bytes (Content-Length) than arrived: the connection was cut."""


def fetch_url(
    url: str, destination: str | Path, *, check: Callable[[Path], None] | None = None, timeout: float = 60.0
) -> Path:
    """Download `url` to `destination` atomically, running `check` on the complete file first.

    Raises DownloadError naming the URL and the reason (no network, HTTP status), CutOffError when fewer bytes
    arrived than the server announced (a stream that just ends reads as complete otherwise), and whatever `check`
    raises for a file that arrived whole but is wrong.
    """
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            announced = response.headers.get("Content-Length")

            def complete_then_check(path: Path) -> None:
                received = path.stat().st_size
                if announced is not None and announced.isdigit() and received != int(announced):
                    raise CutOffError(
                        f"the download of {url} was cut off: {received:,} of {int(announced):,} bytes arrived; "
                        "nothing was installed: run the command again"
                    )
                if check is not None:
                    check(path)

            return atomic_copy_stream(response, destination, check=complete_then_check)
    except urllib.error.HTTPError as error:
        raise DownloadError(f"cannot download {url}: HTTP {error.code} {error.reason}") from error
    except (urllib.error.URLError, TimeoutError, ConnectionError) as error:
        reason = getattr(error, "reason", None) or error
        raise DownloadError(f"cannot download {url}: {reason}") from error
