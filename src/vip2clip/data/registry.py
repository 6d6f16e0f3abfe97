"""The dataset registry: benchmark name -> converter, and resolving `--dataset NAME --root DIR` to an index.

`resolve_index` accepts a meta.json, a folder holding one, or (with a dataset name) a native-layout root that
has no index yet: it is converted on the fly and the index written beside the data for next time.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

from vip2clip.data.converters.common import Conversion, ConvertOptions, single_wrapper
from vip2clip.data.converters.dagm import convert_dagm
from vip2clip.data.converters.folder import convert_folder
from vip2clip.data.converters.ksdd import convert_ksdd
from vip2clip.data.converters.medical import (
    convert_br35h,
    convert_brainmri,
    convert_clinicdb,
    convert_colondb,
    convert_endo,
    convert_headct,
    convert_isic,
    convert_kvasir,
)
from vip2clip.data.converters.mvtec import convert_btad, convert_dtd, convert_mpdd, convert_mvtec
from vip2clip.data.converters.visa import convert_visa
from vip2clip.data.index import INDEX_NAME, DatasetIndex, read_index, write_index
from vip2clip.data.validate import check_index

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ConverterInfo:
    """One benchmark: its converter and the paper's test counts (Table 7), None for the generic `folder`."""

    name: str
    title: str
    convert: Callable[[Path, ConvertOptions], Conversion]
    paper_counts: tuple[int, int] | None = None  # (normal, anomalous) test images


DATASETS: dict[str, ConverterInfo] = {
    info.name: info
    for info in (
        ConverterInfo("mvtec", "MVTec AD", convert_mvtec, (467, 1258)),
        ConverterInfo("visa", "VisA", convert_visa, (962, 1200)),
        ConverterInfo("mpdd", "MPDD", convert_mpdd, (176, 282)),
        ConverterInfo("btad", "BTAD", convert_btad, (451, 290)),
        ConverterInfo("ksdd", "KolektorSDD", convert_ksdd, (286, 54)),
        ConverterInfo("dagm", "DAGM 2007", convert_dagm, (6996, 1054)),
        ConverterInfo("dtd-synthetic", "DTD-Synthetic", convert_dtd, (357, 947)),
        ConverterInfo("headct", "HeadCT", convert_headct, (100, 100)),
        ConverterInfo("brainmri", "BrainMRI", convert_brainmri, (98, 155)),
        ConverterInfo("br35h", "Br35H", convert_br35h, (1500, 1500)),
        ConverterInfo("isic", "ISIC 2016", convert_isic, (0, 379)),
        ConverterInfo("clinicdb", "CVC-ClinicDB", convert_clinicdb, (0, 612)),
        ConverterInfo("colondb", "CVC-ColonDB", convert_colondb, (0, 380)),
        ConverterInfo("kvasir", "Kvasir-SEG", convert_kvasir, (0, 1000)),
        ConverterInfo("endo", "Endo", convert_endo),  # EndoTect 2020; Table 9 only: Table 7 gives no counts
        ConverterInfo("folder", "generic folder layout (good/ + defect folders)", convert_folder),
    )
}
_ALIASES = {
    "mvtec_ad": "mvtec", "mvtec-ad": "mvtec", "dtd": "dtd-synthetic", "dtd_synthetic": "dtd-synthetic",
    "head_ct": "headct", "brain_mri": "brainmri", "kolektorsdd": "ksdd", "cvc-clinicdb": "clinicdb",
    "cvc-colondb": "colondb", "kvasir-seg": "kvasir", "isic2016": "isic", "endotect": "endo",
}  # fmt: skip


@dataclass
class ConversionResult:
    index: DatasetIndex
    warnings: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def dataset_info(name: str) -> ConverterInfo:
    """The registry entry for a benchmark name, alias or title ("visa", "dtd", "VisA"; case-insensitive);
    unknown -> ValueError."""
    key = name.strip().lower()
    key = _ALIASES.get(key, key)
    key = next((info.name for info in DATASETS.values() if info.title.lower() == key), key)
    if key not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; valid: {', '.join(DATASETS)}")
    return DATASETS[key]


def _convert_or_descend(info: ConverterInfo, root: Path, options: ConvertOptions) -> Conversion:
    """Convert `root`; when nothing is found there and root holds a single folder (an unpacked archive's wrapper),
    convert that folder instead, with paths still relative to `root` and a note saying so."""
    try:
        conversion = info.convert(root, options)
        failure = None if conversion.test else ValueError(f"{root}: no test images found")
    except ValueError as error:
        conversion, failure = None, error
    wrapper = single_wrapper(root) if failure is not None else None
    if wrapper is None:
        if failure is not None and conversion is None:
            raise failure
        return conversion
    try:
        inner = info.convert(wrapper, options)
    except ValueError:
        raise failure from None  # the wrapper holds no dataset either: the error about the root the user gave
    rebased = Conversion(root=root, warnings=inner.warnings, notes=inner.notes)
    prefix = wrapper.name
    for split, samples in (("train", inner.train), ("test", inner.test)):
        getattr(rebased, split).extend(
            replace(s, img_path=f"{prefix}/{s.img_path}", mask_path=f"{prefix}/{s.mask_path}" if s.mask_path else "")
            for s in samples
        )
    rebased.notes.insert(0, f"{root} holds only the folder {prefix}/ (as archives unpack): converted {wrapper}")
    return rebased


def convert_dataset(name: str, root: str | Path, *, options: ConvertOptions | None = None) -> ConversionResult:
    """Run a converter on a native-layout root. With `options.strict`, any warning is an error (ValueError)."""
    options = options or ConvertOptions()
    info = dataset_info(name)
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: dataset root not found (or not a folder)")
    conversion = _convert_or_descend(info, root, options)
    if options.strict and conversion.warnings:
        listed = "\n  ".join(conversion.warnings)
        raise ValueError(f"{root}: {len(conversion.warnings)} problem(s) with --strict:\n  {listed}")
    return ConversionResult(conversion.index(), conversion.warnings, conversion.notes)


def resolve_index(data: str | Path, dataset: str | None = None) -> DatasetIndex:
    """A meta.json, a folder with one, or a native root + dataset name (converted and indexed on the fly).

    An index with problems (duplicate rows, paths leaving the root, contradicting classes or labels) is refused
    by `vip2clip.data.validate.check_index`: the checks `vip2clip validate` makes, for every command that counts."""
    path = Path(data)
    if path.is_file() or (path / INDEX_NAME).is_file():
        index = read_index(path)
        check_index(index)
        return index
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or folder")
    if dataset is None:
        raise FileNotFoundError(
            f"{path}: no {INDEX_NAME} here; pass --dataset NAME to convert it (one of: {', '.join(DATASETS)})"
        )
    result = convert_dataset(dataset, path)
    for note in result.notes:
        logger.info("%s", note)
    for warning in result.warnings:
        logger.warning("%s", warning)
    try:
        written = write_index(result.index)
        logger.info("converted %s at %s and wrote %s", dataset, path, written)
    except OSError as error:  # a read-only dataset folder: use the index without saving it
        logger.warning("%s: could not write the index (%s); using it without saving", path / INDEX_NAME, error)
    return result.index
