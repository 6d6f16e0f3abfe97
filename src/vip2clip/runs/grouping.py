"""Which images of a folder run score each other (mutual scoring, `vip2clip.scoring.mutual_group`), and what
each rank scores. Imports no torch: folder runs on the ONNX engine use it too."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

from PIL import Image

from vip2clip.data.files import InputImage
from vip2clip.scoring.mutual_rule import GROUPS, MIN_IMAGES
from vip2clip.utils.distributed import World

if TYPE_CHECKING:
    from vip2clip.inference.predictor import Predictor
    from vip2clip.outputs import ImageItem
    from vip2clip.scoring.mutual_group import GroupReport


def group_images(images: Sequence[InputImage], by: str) -> list[tuple[str, list[InputImage]]]:
    """The groups of a folder run: by "all" (the default), one group of every image the run is given; by "folder",
    one per folder that holds images (named by its path, in the order of their first image)."""
    if by not in GROUPS:
        raise ValueError(f"mutual group must be one of {GROUPS}, got {by!r}")
    if by == "all":
        return [("all", list(images))] if images else []
    groups: dict[str, list[InputImage]] = {}
    for image in images:
        groups.setdefault(str(image.path.parent), []).append(image)
    return list(groups.items())


def check_groups(groups: Sequence[tuple[str, Sequence[Any]]], by: str) -> None:
    """ValueError naming every group of fewer than 3 images (before any work); `by`: how they were grouped."""
    small = [f"{name} ({len(members)})" for name, members in groups if len(members) < MIN_IMAGES]
    if not small:
        return
    if by == "all":
        advice = "give the run more images of the part (all the images it is given score each other)"
    else:
        advice = "put more images of the part in those folders, or let all the images of the run score each other "
        advice += "(--mutual-group all)"
    raise ValueError(
        f"mutual scoring needs at least {MIN_IMAGES} images per group (with two, a difference between them could be "
        f"in either); too few in: {', '.join(small[:10])}{' ...' if len(small) > 10 else ''}; {advice}"
    )


def whole_groups(todo: Sequence[InputImage], images: Sequence[InputImage], *, by: str) -> list[InputImage]:
    """The images of every group that has an image in `todo` (a group is scored again whole, never in part)."""
    redo = {image.path for image in todo}
    return [image for _, members in group_images(images, by) if redo & {m.path for m in members} for image in members]


def folder_share(
    predictor: Predictor, todo: list[InputImage], *, load: Callable[[InputImage], Image.Image], world: World, by: str
) -> tuple[list[InputImage], Iterator[ImageItem], list[GroupReport]]:
    """What a rank of a folder run scores: (its images, their scored items, the mutual groups' reports). Without
    mutual scoring a share of whole batches; with it whole groups, round-robin over the ranks (a group's images
    must meet each other: one group is never split)."""
    reports: list[GroupReport] = []
    if predictor.mutual is None:
        share = [todo[i] for i in world.share(len(todo), unit=predictor.batch_size)]
        return share, predictor.score(share, load), reports
    from vip2clip.scoring.mutual_group import score_groups  # imports torch: only in mutual mode

    mine = group_images(todo, by)[world.rank :: world.size]
    share = [image for _, members in mine for image in members]
    return share, score_groups(predictor, mine, load=load, reports=reports), reports
