"""Published weights: a table kept as data (`pretrained.json` beside this module) of the files vip2clip can
fetch on request, and the rule that turns a tag given as `--checkpoint` / `--clip-weights` (or `checkpoint=` /
`clip_weights=`) into the downloaded file.

Nothing here downloads: `vip2clip download TAG` does, when asked (`vip2clip.cli.model`). A tag whose file is not
downloaded yet is an error that says how to get it. Files live in `weights_dir()`: $VIP2CLIP_WEIGHTS_DIR, else
$XDG_CACHE_HOME/vip2clip/weights (~/.cache/vip2clip/weights).
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from vip2clip.utils.fileio import atomic_copy_stream, atomic_write_json
from vip2clip.utils.hashing import file_sha256, git_blob_sha1

logger = logging.getLogger(__name__)

CLIP, CHECKPOINT = "clip", "checkpoint"
_FLAGS = {CLIP: "--clip-weights / clip_weights=", CHECKPOINT: "--checkpoint / checkpoint="}


class PretrainedError(ValueError):
    """A published-weights tag that cannot be used as asked: not downloaded, of another kind, or a file that does
    not match its published hash."""


@dataclass(frozen=True, kw_only=True)
class PublishedWeights:
    """One published file. sha256 or git_blob_sha1: the hash a download must match (a git repository publishes
    the blob id of each file it holds; the SHA-256 where the publisher gives one)."""

    tag: str
    kind: str
    backbone: str
    image_size: int
    filename: str
    url: str
    description: str
    sha256: str | None = None
    git_blob_sha1: str | None = None

    def __post_init__(self) -> None:
        if self.kind not in _FLAGS:
            raise ValueError(f"published weights {self.tag!r}: kind must be one of {list(_FLAGS)}, got {self.kind!r}")
        if not (self.sha256 or self.git_blob_sha1):
            raise ValueError(f"published weights {self.tag!r} have no hash to verify a download against")

    @property
    def path(self) -> Path:
        """Where `vip2clip download` puts the file."""
        return weights_dir() / self.tag / self.filename

    @property
    def expected_hash(self) -> str:
        return f"sha256 {self.sha256}" if self.sha256 else f"git blob {self.git_blob_sha1}"

    def verify(self, path: str | Path, *, origin: str | None = None, advice: str | None = None) -> None:
        """PretrainedError unless the file at `path` has this entry's published hash. origin: what the message calls
        the file (default: its path; a download's temporary file is no name for the user); advice: what to do."""
        found = file_sha256(path) if self.sha256 else git_blob_sha1(path)
        if found != (self.sha256 or self.git_blob_sha1):
            kind = "sha256" if self.sha256 else "git blob"
            raise PretrainedError(
                f"{origin or path} is not {self.tag}: its {kind} is {found}, the published file's is "
                f"{self.sha256 or self.git_blob_sha1}; {advice or f'fetch it again: `vip2clip download {self.tag}`'}"
            )

    @property
    def _verified_record(self) -> Path:
        return self.path.with_name(self.path.name + ".verified.json")

    def is_verified(self) -> bool:
        """Whether the installed file is the one whose hash was checked (same size and modification time as then)."""
        try:
            record = json.loads(self._verified_record.read_text(encoding="utf-8"))
            stat = self.path.stat()
        except (OSError, ValueError):
            return False
        return record == {"hash": self.expected_hash, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}

    def record_verified(self) -> None:
        """Remember that the installed file passed its hash check (skipped where the folder is read-only: the
        check then runs at every use)."""
        stat = self.path.stat()
        record = {"hash": self.expected_hash, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
        with contextlib.suppress(OSError):
            atomic_write_json(self._verified_record, record)

    def how_to_get(self) -> str:
        return (
            f"run `vip2clip download {self.tag}` (needs internet), or fetch {self.url} by hand and install it with "
            f"`vip2clip download {self.tag} --from FILE` (checks its {self.expected_hash.split()[0]} hash and "
            f"copies it to {self.path})"
        )


def weights_dir() -> Path:
    """$VIP2CLIP_WEIGHTS_DIR, else $XDG_CACHE_HOME/vip2clip/weights (~/.cache/vip2clip/weights)."""
    if os.environ.get("VIP2CLIP_WEIGHTS_DIR"):
        return Path(os.environ["VIP2CLIP_WEIGHTS_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "vip2clip" / "weights"


@functools.cache
def _table() -> dict[str, PublishedWeights]:
    data = json.loads(resources.files("vip2clip.model").joinpath("pretrained.json").read_text(encoding="utf-8"))
    return {tag: PublishedWeights(tag=tag, **entry) for tag, entry in data["weights"].items()}


def list_pretrained(kind: str | None = None) -> list[str]:
    """Tags of the published weights (of one kind: "clip" or "checkpoint", or all)."""
    return [tag for tag, entry in _table().items() if kind is None or entry.kind == kind]


def get_pretrained(tag: str) -> PublishedWeights:
    """The table entry of `tag`. Raises PretrainedError listing the valid tags for any other name."""
    try:
        return _table()[tag]
    except KeyError:
        raise PretrainedError(f"unknown published weights {tag!r}; tags: {', '.join(list_pretrained())}") from None


def resolve_weights(value: str | Path | None, kind: str) -> str | Path | None:
    """The file a `--checkpoint` / `--clip-weights` value names: an existing path as given; a published tag as its
    downloaded file; anything else unchanged (the loaders report it). A tag that is not downloaded, or that names
    weights of the other kind, raises PretrainedError saying what to do."""
    if value is None or Path(value).exists() or str(value) not in _table():
        return value
    entry = _table()[str(value)]
    if entry.kind != kind:
        raise PretrainedError(
            f"{entry.tag} is published {'CLIP weights' if entry.kind == CLIP else 'a ViP²-CLIP checkpoint'}: "
            f"give it as {_FLAGS[entry.kind]}, not {_FLAGS[kind]}"
        )
    if not entry.path.is_file():
        raise PretrainedError(f"{entry.tag} ({entry.description}) is not downloaded yet: {entry.how_to_get()}")
    if not entry.is_verified():  # placed there by hand, or changed since its download: checked before its first use
        logger.info("checking the %s hash of %s (once)", entry.expected_hash.split()[0], entry.path)
        advice = f"it was not installed by `vip2clip download`, or has changed since: {entry.how_to_get()}"
        entry.verify(entry.path, advice=advice)
        entry.record_verified()
    return entry.path


def download_pretrained(tag: str, *, source_file: str | Path | None = None, url: str | None = None) -> Path:
    """Fetch the published file `tag` (from its URL, another `url` such as a mirror, or a `source_file` fetched by
    hand), check its published hash and install it at its `path`; returns the path. Already installed and intact:
    nothing is fetched.

    Raises PretrainedError for an unknown tag or a file with another hash (nothing is installed), and
    `vip2clip.utils.download.DownloadError` when the URL cannot be fetched (the message says how to do it by hand).
    """
    from vip2clip.utils.download import CutOffError, DownloadError, fetch_url

    entry = get_pretrained(tag)
    if source_file is None and entry.path.is_file():
        try:
            entry.verify(entry.path)
            entry.record_verified()
            return entry.path
        except PretrainedError as error:
            logger.warning("%s: fetching it again", error)
    if source_file is not None:
        advice = f"nothing was installed: it is another file than {entry.url}, or a part of it"
        check = functools.partial(entry.verify, origin=str(source_file), advice=advice)
        with Path(source_file).open("rb") as stream:
            atomic_copy_stream(stream, entry.path, check=check)
        entry.record_verified()
        return entry.path
    source = url or entry.url
    advice = "nothing was installed: the server sent another file than the published one"
    try:
        fetch_url(
            source, entry.path, check=functools.partial(entry.verify, origin=f"the file from {source}", advice=advice)
        )
    except CutOffError:
        raise
    except DownloadError as error:
        raise DownloadError(
            f"{error}. Without internet here: fetch {entry.url} on another machine and install it with "
            f"`vip2clip download {tag} --from FILE` (it checks the {entry.expected_hash.split()[0]} hash)"
        ) from error
    entry.record_verified()
    return entry.path
