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


@dataclass(frozen=True, kw_only=True)
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
    def of_preset(cls, key: str, label: str, *, preset: str) -> Variant:
        return cls(key=key, label=label, options=dict(get_preset(preset).config), preset=preset)

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


@dataclass(frozen=True, kw_only=True)
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


@dataclass(frozen=True, kw_only=True)
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
            Variant.of_preset("none", "(none): untrained CLIP, hand-written prompts", preset="clip-zero-shot"),
            Variant.of_preset(
                "none-trained", "(none), trained static prompts (ours; = CLIP_DUAL)", preset="ablation-none"
            ),
        )
    label = ", ".join(part.upper() for part in parts)
    return (
        Variant.of_preset(
            "+".join(parts), label, preset="vip2clip" if len(parts) == 3 else "ablation-" + "-".join(parts)
        ),
    )


def _words(normal: str, anomalous: str) -> Variant:
    key = f"{normal}-{anomalous}"
    preset = "vip2clip" if key == "good-damaged" else f"state-{key}"
    return Variant.of_preset(key, f"{normal.title()}/{anomalous.title()}", preset=preset)


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
            name="main",
            reproduces="Tables 1-2",
            title="Zero-shot anomaly detection on the industrial and medical datasets",
            variants=(Variant.of_preset("vip2clip", "ViP²-CLIP", preset="vip2clip"),),
            protocol=MAIN,
            rows="tables",
            partial_data=True,
        ),
        Study(
            name="modules",
            reproduces="Table 4",
            title="Module ablation: the combinations of UTPA, VCA and FGP",
            variants=tuple(
                variant
                for u, v, f in ((0, 0, 0), (0, 1, 0), (0, 0, 1), (0, 1, 1), (1, 1, 0), (1, 0, 1), (1, 1, 1))
                for variant in _modules(u, v, f)
            ),
            protocol=SWAP,
        ),
        Study(
            name="alignment",
            reproduces="Table 5",
            title="UTPA vs the dual-branch alignment (static prompts, no FGP)",
            variants=(
                Variant.of_preset("dual", "CLIP_DUAL", preset="ablation-none"),
                Variant.of_preset("utpa", "CLIP_UTPA", preset="ablation-utpa"),
            ),
            protocol=SWAP,
        ),
        Study(
            name="state-words",
            reproduces="Table 6",
            title="State adjectives of the prompts",
            variants=(
                _words("good", "damaged"),
                _words("normal", "abnormal"),
                _words("perfect", "flawed"),
                _words("flawless", "imperfect"),
            ),
            protocol=SWAP,
        ),
        Study(
            name="static-prompts",
            reproduces="Fig. 5",
            title=(
                "F1 gain of visual-conditioned over static prompts, seven industrial sets (both readings of 'static')"
            ),
            variants=(
                Variant.of_preset(
                    "static",
                    "static prompts, FGP kept (reading: 'without visual cues' = no VCA)",
                    preset="ablation-utpa-fgp",
                ),
                Variant.of_preset(
                    "static-no-fgp",
                    "static prompts, no FGP (reading: no visual feature enters the prompts: no VCA, no FGP)",
                    preset="ablation-utpa",
                ),
                Variant.of_preset("visual", "visual-conditioned prompts (ViP²-CLIP)", preset="vip2clip"),
            ),
            protocol=INDUSTRIAL,
            figure=Figure(
                kind="gain", metrics=("image_f1", "pixel_f1"), x_label="test dataset", y_label="F1 gain (points, x100)"
            ),
        ),
        Study(
            name="top-k",
            reproduces="Fig. 6",
            title=TOP_K_TITLE,
            variants=tuple(Variant(key=f"k{k}", label=f"K = {k}", options={"top_k": k}) for k in TOP_K),
            protocol=SWAP,
            figure=Figure(
                kind="sweep",
                metrics=("image_auroc",),
                x_label="K (patches pooled)",
                y_label="image AUROC (%)",
                x={f"k{k}": k for k in TOP_K},
                log_x=True,
            ),
        ),
        Study(
            name="prompt-length",
            reproduces="Fig. 10",
            title="Prompt length: static tokens M and dynamic tokens J (tested on VisA)",
            variants=tuple(
                Variant(key=f"m{m}-j{j}", label=f"M = {m}, J = {j}", options={"n_context": m, "n_dynamic": j})
                for m, j in PROMPT_LENGTHS
            ),
            protocol=(SWAP[0],),
            figure=Figure(
                kind="sweep",
                metrics=("image_auroc", "pixel_auroc", "image_f1", "pixel_f1"),
                x_label="prompt length M + J (tokens)",
                y_label="metric (%)",
                x={f"m{m}-j{j}": m + j for m, j in PROMPT_LENGTHS},
                series={
                    "M varies, J = 3": tuple(f"m{m}-j3" for m in (3, 5, 7, 9, 11)),
                    "J varies, M = 7": tuple(f"m7-j{j}" for j in (1, 3, 5)),
                },
            ),
        ),
        Study(
            name="medical",
            reproduces="Table 9",
            title="Medical fine-tuning: trained on MVTec AD + CVC-ColonDB (ColonDB: VisA + CVC-ClinicDB)",
            variants=(Variant.of_preset("fine-tuned", "ViP²-CLIP", preset="vip2clip"),),
            protocol=MEDICAL,
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
