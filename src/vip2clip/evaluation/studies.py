"""The paper's studies as data: each study's variants (model options), protocol and what it reproduces.

A variant is a set of `ModelConfig` options for training (`options`) and, for a test-time switch such as Top-K,
options applied only when testing (`test_options`: variants that differ only there share one trained model). A
protocol is a list of directions, each training on one or several datasets' test splits (several form one stream,
`data.sources`) and testing on others: the paper's MVTec AD <-> VisA swap, the seven industrial sets of Fig. 5,
or Table 9's medical fine-tuning. Dataset names are registry names (`data.registry`).

The variant keys and options of the tables (4, 5, 6, 9) are those of `paper_results.json`'s "studies", which
holds the paper's numbers for them (a test checks that the two agree). The figures (5, 6, 10) print no numbers:
their studies show ours only.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from vip2clip.model.presets import get_preset


@dataclass(frozen=True)
class Variant:
    """One row (or point) of a study: its key, the label printed in our table, the training options and the
    test-time options. A variant of the paper's tables is a model preset (`vip2clip.list_models()`): its options
    are the preset's (`Variant.of_preset`), kept in one place."""

    key: str
    label: str
    options: Mapping[str, Any] = field(default_factory=dict)
    test_options: Mapping[str, Any] = field(default_factory=dict)
    preset: str | None = None

    @classmethod
    def of_preset(cls, key: str, label: str, preset: str) -> Variant:
        return cls(key, label, dict(get_preset(preset).config), preset=preset)

    @property
    def trained(self) -> bool:
        """False for untrained CLIP (hand-written prompts): the study tests it without training."""
        return self.options.get("text_prompts") != "handcrafted"


@dataclass(frozen=True)
class Direction:
    """Train on the test splits of `train` (one stream), test zero-shot on `tests`."""

    train: tuple[str, ...]
    tests: tuple[str, ...]

    @property
    def name(self) -> str:
        return "+".join(self.train)


@dataclass(frozen=True)
class Figure:
    """How a study is plotted. kind "gain": per test dataset, `metrics` of the second variant minus the first
    (bars); kind "sweep": `metrics` against the variants' `x` values, one line per series, test dataset and
    metric (`series`: name -> variant keys in x order; empty: one series of all variants)."""

    kind: str
    metrics: tuple[str, ...]
    x_label: str
    y_label: str
    x: Mapping[str, float] = field(default_factory=dict)  # variant key -> x value (sweep)
    series: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    log_x: bool = False


@dataclass(frozen=True)
class Study:
    name: str
    reproduces: str
    title: str
    variants: tuple[Variant, ...]
    protocol: tuple[Direction, ...]
    figure: Figure | None = None
    rows: str = "variants"  # "datasets": one row per test dataset (Table 9's layout, one variant); "tables":
    # the same, once per table of Tables 1-2 (`PaperNumbers.main_tables`)
    partial_data: bool = False  # runs on the datasets given; the protocol's others are listed as missing
    missing: tuple[str, ...] = ()  # the protocol's test sets left out (`restricted`)

    @property
    def datasets(self) -> list[str]:
        """Every dataset the protocol reads, in first-use order."""
        names: list[str] = []
        for direction in self.protocol:
            names += [name for name in (*direction.train, *direction.tests) if name not in names]
        return names

    def variant(self, key: str) -> Variant:
        for variant in self.variants:
            if variant.key == key:
                return variant
        raise ValueError(f"study {self.name} has no variant {key!r}; its variants: {self.variant_keys()}")

    def variant_keys(self) -> str:
        return ", ".join(variant.key for variant in self.variants)

    def restricted(self, given: Collection[str]) -> Study:
        """This study with only the directions and tests whose datasets are `given`, and the test sets left out
        as `missing` (protocol order); ValueError when no direction can run. A direction whose training set is
        missing leaves out all its tests."""
        protocol = []
        for direction in self.protocol:
            tests = tuple(test for test in direction.tests if test in given)
            if tests and all(name in given for name in direction.train):
                protocol.append(Direction(direction.train, tests))
        if not protocol:
            needed = "; ".join(f"{'+'.join(d.train)} with one of {', '.join(d.tests)}" for d in self.protocol)
            raise ValueError(f"study {self.name} runs nothing with these datasets: it needs {needed}")
        ran = {name for direction in protocol for name in direction.tests}
        missing = [name for d in self.protocol for name in d.tests if name not in ran]
        return replace(self, protocol=tuple(protocol), missing=tuple(missing))

    def select(self, keys: Sequence[str] | None) -> tuple[Variant, ...]:
        """The variants named in `keys` (all for None), in the study's order; unknown keys list the valid ones."""
        if not keys:
            return self.variants
        chosen = {self.variant(key).key for key in keys}
        return tuple(variant for variant in self.variants if variant.key in chosen)


SWAP = (Direction(("mvtec",), ("visa",)), Direction(("visa",), ("mvtec",)))
INDUSTRIAL = (
    Direction(("mvtec",), ("visa", "mpdd", "btad", "ksdd", "dagm", "dtd-synthetic")),
    Direction(("visa",), ("mvtec",)),
)
# Tables 1-2: trained on MVTec AD for the 13 other datasets, on VisA for MVTec AD (Sec. 5.1)
INDUSTRIAL_TESTS = ("visa", "mpdd", "ksdd", "btad", "dagm", "dtd-synthetic")
MEDICAL_TESTS = ("headct", "brainmri", "br35h", "isic", "colondb", "clinicdb", "kvasir")
MAIN = (Direction(("mvtec",), (*INDUSTRIAL_TESTS, *MEDICAL_TESTS)), Direction(("visa",), ("mvtec",)))
MEDICAL = (
    Direction(("mvtec", "colondb"), ("headct", "brainmri", "br35h", "isic", "clinicdb", "endo", "kvasir")),
    Direction(("visa", "clinicdb"), ("colondb",)),
)


def _modules(utpa: bool, vca: bool, fgp: bool) -> tuple[Variant, ...]:
    """Table 4's row(s) of one module combination. Without any module, the paper's numbers are those of untrained
    CLIP (they nearly equal the CLIP column of Tables 10-21 and differ from Table 5's CLIP_DUAL, the same options
    trained): the row `none` is untrained CLIP; `none-trained`, the static prompts trained, follows as our row."""
    parts = [name for name, on in (("utpa", utpa), ("vca", vca), ("fgp", fgp)) if on]
    if not parts:
        return (
            Variant.of_preset("none", "(none): untrained CLIP, hand-written prompts", "clip-zero-shot"),
            Variant.of_preset("none-trained", "(none), trained static prompts (ours; = CLIP_DUAL)", "ablation-none"),
        )
    label = ", ".join(part.upper() for part in parts)
    return (
        Variant.of_preset("+".join(parts), label, "vip2clip" if len(parts) == 3 else "ablation-" + "-".join(parts)),
    )


def _words(normal: str, anomalous: str) -> Variant:
    key = f"{normal}-{anomalous}"
    preset = "vip2clip" if key == "good-damaged" else f"state-{key}"
    return Variant.of_preset(key, f"{normal.title()}/{anomalous.title()}", preset)


TOP_K = (1, 10, 20, 50, 100, 200)
# K also shapes training (the image loss pools the top-K patches) and the paper does not say the model was trained
# once: one training per K by default; `top_k_at_test_time` gives the cheaper sweep of one model trained at K = 50.
TOP_K_TITLE = "Top-K patches pooled for the image score (one model trained per K)"
# Fig. 10 plots prompt lengths whose values the text does not print: static tokens M with J = 3, and dynamic
# tokens J with M = 7 (the default 7 + 3 = 10 in both).
PROMPT_LENGTHS = ((3, 3), (5, 3), (7, 3), (9, 3), (11, 3), (7, 1), (7, 5))

STUDIES: dict[str, Study] = {
    study.name: study
    for study in (
        Study(
            "main",
            "Tables 1-2",
            "Zero-shot anomaly detection on the industrial and medical datasets",
            (Variant.of_preset("vip2clip", "ViP²-CLIP", "vip2clip"),),
            MAIN,
            rows="tables",
            partial_data=True,
        ),
        Study(
            "modules",
            "Table 4",
            "Module ablation: the combinations of UTPA, VCA and FGP",
            tuple(
                variant
                for u, v, f in ((0, 0, 0), (0, 1, 0), (0, 0, 1), (0, 1, 1), (1, 1, 0), (1, 0, 1), (1, 1, 1))
                for variant in _modules(u, v, f)
            ),
            SWAP,
        ),
        Study(
            "alignment",
            "Table 5",
            "UTPA vs the dual-branch alignment (static prompts, no FGP)",
            (
                Variant.of_preset("dual", "CLIP_DUAL", "ablation-none"),
                Variant.of_preset("utpa", "CLIP_UTPA", "ablation-utpa"),
            ),
            SWAP,
        ),
        Study(
            "state-words",
            "Table 6",
            "State adjectives of the prompts",
            (
                _words("good", "damaged"),
                _words("normal", "abnormal"),
                _words("perfect", "flawed"),
                _words("flawless", "imperfect"),
            ),
            SWAP,
        ),
        Study(
            "static-prompts",
            "Fig. 5",
            "F1 gain of visual-conditioned over static prompts, seven industrial sets (both readings of 'static')",
            (
                Variant.of_preset(
                    "static", "static prompts, FGP kept (reading: 'without visual cues' = no VCA)", "ablation-utpa-fgp"
                ),
                Variant.of_preset(
                    "static-no-fgp",
                    "static prompts, no FGP (reading: no visual feature enters the prompts: no VCA, no FGP)",
                    "ablation-utpa",
                ),
                Variant.of_preset("visual", "visual-conditioned prompts (ViP²-CLIP)", "vip2clip"),
            ),
            INDUSTRIAL,
            Figure("gain", ("image_f1", "pixel_f1"), "test dataset", "F1 gain (points, x100)"),
        ),
        Study(
            "top-k",
            "Fig. 6",
            TOP_K_TITLE,
            tuple(Variant(f"k{k}", f"K = {k}", {"top_k": k}) for k in TOP_K),
            SWAP,
            Figure(
                "sweep",
                ("image_auroc",),
                "K (patches pooled)",
                "image AUROC (%)",
                {f"k{k}": k for k in TOP_K},
                log_x=True,
            ),
        ),
        Study(
            "prompt-length",
            "Fig. 10",
            "Prompt length: static tokens M and dynamic tokens J (tested on VisA)",
            tuple(
                Variant(f"m{m}-j{j}", f"M = {m}, J = {j}", {"n_context": m, "n_dynamic": j}) for m, j in PROMPT_LENGTHS
            ),
            (SWAP[0],),
            Figure(
                "sweep",
                ("image_auroc", "pixel_auroc", "image_f1", "pixel_f1"),
                "prompt length M + J (tokens)",
                "metric (%)",
                {f"m{m}-j{j}": m + j for m, j in PROMPT_LENGTHS},
                {
                    "M varies, J = 3": tuple(f"m{m}-j3" for m in (3, 5, 7, 9, 11)),
                    "J varies, M = 7": tuple(f"m7-j{j}" for j in (1, 3, 5)),
                },
            ),
        ),
        Study(
            "medical",
            "Table 9",
            "Medical fine-tuning: trained on MVTec AD + CVC-ColonDB (ColonDB: VisA + CVC-ClinicDB)",
            (Variant.of_preset("fine-tuned", "ViP²-CLIP", "vip2clip"),),
            MEDICAL,
            rows="datasets",
        ),
    )
}


def top_k_at_test_time(study: Study) -> Study:
    """The Top-K study as a test-time sweep: one model trained at the default K = 50, tested at every K."""
    variants = tuple(replace(variant, options={}, test_options=dict(variant.options)) for variant in study.variants)
    title = "Top-K patches pooled for the image score (a test-time sweep of one model trained at K = 50)"
    return replace(study, title=title, variants=variants)


@dataclass(frozen=True)
class Measurement:
    """A study that trains nothing (`cli.efficiency`): its name, what it reproduces and what it measures."""

    name: str
    reproduces: str
    title: str
    measures: str


EFFICIENCY = Measurement(
    "efficiency",
    "Table 3",
    "Computational efficiency, beside the paper's (NVIDIA L20) and, with --release-dir, the authors' release",
    "trainable parameters, ms per image (batch 1, --image-size, the paper's 518), peak memory of inference and of one "
    "training step (GPU memory on CUDA, process RSS on the CPU); no datasets",
)


def get_study(name: str) -> Study:
    """The named study; ValueError listing the studies for an unknown name."""
    if name not in STUDIES:
        names = ", ".join([*STUDIES, EFFICIENCY.name])
        raise ValueError(f"unknown study {name!r}; studies: {names} (`vip2clip study --list`)")
    return STUDIES[name]


def describe_studies() -> str:
    """`vip2clip study --list`: each study, what it reproduces, its protocol and its variants."""
    lines = []
    for study in STUDIES.values():
        protocol = "; ".join(f"train {'+'.join(d.train)} -> test {', '.join(d.tests)}" for d in study.protocol)
        lines.append(f"{study.name}  ({study.reproduces}) {study.title}")
        lines.append(f"    protocol: {protocol}")
        lines.append(f"    variants: {study.variant_keys()}")
    lines.append(f"{EFFICIENCY.name}  ({EFFICIENCY.reproduces}) {EFFICIENCY.title}")
    lines.append(f"    measures: {EFFICIENCY.measures}")
    return "\n".join(lines)
