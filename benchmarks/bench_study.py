"""What a study costs (run by hand): `vip2clip study modules` (all its variants) against one variant, and against
what a user would run instead (one `vip2clip benchmark` per trained variant and direction, each encoding its images
again).

Every candidate runs in this process through the command line's `main`, from a fresh output folder, in
interleaved rounds; the image encoder (`ViP2CLIP.encode_image`) is timed inside each run, so the table gives the
share of the wall time spent in the backbone and the number of images it encoded. The study's variants share one
feature cache for training and testing, so its encoder cost is one pass per image whatever the number of variants,
and one frozen CLIP (built once per run). Model builds, training, testing and the text encoder are timed too.

    python benchmarks/bench_study.py --record          # the demo's data (tiny backbone, 128 px), 5 epochs
    python benchmarks/bench_study.py --backbone ViT-L-14-336 --image-size 518 --images 1 --epochs 1 \
        --candidates study --repeats 1 --record     # the study vs one variant at full size, random weights
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
from pathlib import Path

from common import add_common_arguments, apply_common_arguments, machine_description, markdown_table, publish
from vip2clip.apps.demo import DemoConfig, _generate_data
from vip2clip.cli import main as cli_main
from vip2clip.inference import assembly
from vip2clip.model.vip2clip import ViP2CLIP
from vip2clip.paper import study as study_module
from vip2clip.paper.studies import get_study

FULL = "utpa+vca+fgp"


# (label, module or class, attribute): what the table times, each inclusive of what it calls (training and testing
# include their image encoding; the text encoder runs inside both).
PHASES = (
    ("encoder", ViP2CLIP, "encode_image"),
    ("text encoder", ViP2CLIP, "encode_text"),
    ("model builds", assembly, "build_model"),
    ("training", study_module, "train"),
    ("testing", study_module, "evaluate_dataset"),
)


class PhaseClock:
    """Wraps the functions of PHASES to add up their seconds, and the images `encode_image` encoded (single
    process, CPU: no sync needed)."""

    def __init__(self) -> None:
        self.seconds = {label: 0.0 for label, _, _ in PHASES}
        self.images = 0
        self._originals = [(owner, name, getattr(owner, name)) for _, owner, name in PHASES]

    def __enter__(self) -> PhaseClock:
        for (label, owner, name), (_, _, original) in zip(PHASES, self._originals, strict=True):
            setattr(owner, name, self._timed(label, original))
        return self

    def _timed(self, label: str, original):
        clock = self

        def timed(*args, **kwargs):
            started = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                clock.seconds[label] += time.perf_counter() - started
                if label == "encoder":
                    clock.images += int(args[1].shape[0])

        return timed

    def __exit__(self, *exc) -> None:
        for owner, name, original in self._originals:
            setattr(owner, name, original)


def _model_args(args: argparse.Namespace) -> list[str]:
    weights = [] if args.backbone == "tiny" else ["--random-init"]
    return [
        "--backbone",
        args.backbone,
        "--image-size",
        str(args.image_size),
        *weights,
        "--no-progress",
        "--epochs",
        str(args.epochs),
        "--train-batch-size",
        "8",
    ]


def candidates(args: argparse.Namespace, data: dict[str, Path], work: Path) -> dict[str, list[list[str]]]:
    """name -> the command lines it runs (each into a fresh folder under `work`, made unique per call)."""
    model = _model_args(args)
    protocol = ["--data", f"mvtec={data['mvtec']}", f"visa={data['visa']}"]
    variants = get_study("modules").variants
    trained = [variant for variant in variants if variant.trained]
    whole = f"study modules ({len(variants)} variants, shared cache and backbone)"
    runs = {
        "one variant (study --variants utpa+vca+fgp)": [["study", "modules", *protocol, "--variants", FULL, *model]],
        whole: [["study", "modules", *protocol, *model]],
    }
    loop = []
    for variant in trained:  # untrained CLIP has no `benchmark` flags
        flags = [f"--no-{name[4:]}" for name, on in variant.options.items() if not on]
        for train, test in (("mvtec", "visa"), ("visa", "mvtec")):
            loop.append(
                ["benchmark", "--train", f"{train}={data[train]}", "--test", f"{test}={data[test]}", *flags, *model]
            )
    runs[f"{len(trained)} trained variants as {len(loop)} `benchmark` runs (what a user runs instead)"] = loop
    wanted = {"all": ("one", "study", f"{len(trained)} "), "study": ("one", "study"), "one": ("one",)}[args.candidates]
    return {name: commands for name, commands in runs.items() if name.startswith(wanted)}


def run_commands(commands: list[list[str]], work: Path) -> tuple[float, dict[str, float], int]:
    """(wall seconds, seconds per phase of PHASES, encoded images) of the commands, each into a fresh folder."""
    with PhaseClock() as clock:
        started = time.perf_counter()
        for command in commands:
            out = Path(tempfile.mkdtemp(dir=work))
            if cli_main([*command, "--out", str(out / "run")]) != 0:
                raise RuntimeError(f"failed: vip2clip {' '.join(command)}")
        wall = time.perf_counter() - started
    return wall, clock.seconds, clock.images


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="tiny")
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--images", type=int, default=None, help="images per class and split (default: the demo's)")
    parser.add_argument("--epochs", type=int, default=5, help="training epochs per variant (the demo's 5)")
    parser.add_argument(
        "--candidates", choices=("all", "study", "one"), default="all", help="study: without the benchmark loop"
    )
    parser.add_argument("--output", default=None, help="also append the section to this file")
    add_common_arguments(parser, repeats=2)
    args = parser.parse_args()
    apply_common_arguments(args)
    logging.basicConfig(level=logging.ERROR)
    info = machine_description()
    with tempfile.TemporaryDirectory() as folder:
        work = Path(folder)
        n = args.images
        demo = (
            DemoConfig()
            if n is None
            else DemoConfig(train_good=n, train_defect=n, test_good=n, test_defect=n, classes=1)
        )
        train_index, test_index = _generate_data(work / "data", demo)
        data = {"mvtec": train_index.root, "visa": test_index.root}
        runs = candidates(args, data, work)
        timings: dict[str, list[tuple[float, dict[str, float], int]]] = {name: [] for name in runs}
        for _ in range(args.repeats):
            for name, commands in runs.items():
                timings[name].append(run_commands(commands, work))
                wall, phases, images = timings[name][-1]
                spent = ", ".join(f"{label} {seconds:.1f} s" for label, seconds in phases.items())
                print(f"RESULT {name}: {wall:.1f} s ({spent}), {images} images", flush=True)
    rows, first = [], next(iter(timings.values()))
    for name, values in timings.items():
        walls = sorted(v[0] for v in values)
        wall = walls[len(walls) // 2]
        chosen = next(v for v in values if v[0] == wall)
        ratios = sorted(v[0] / base[0] for v, base in zip(values, first, strict=True))
        ratio = ratios[len(ratios) // 2] if len(ratios) % 2 else sum(ratios[len(ratios) // 2 - 1 :][:2]) / 2
        phases = [f"{chosen[1][label]:.1f}" for label, _, _ in PHASES[1:]]
        share = f"{100 * chosen[1]['encoder'] / chosen[0]:.0f} %"
        rows.append([name, f"{wall:.1f}", f"{min(walls):.1f}", share, chosen[2], *phases, f"{ratio:.2f}x"])
    images = (len(train_index.samples("test")), len(test_index.samples("test")))
    body = (
        f"{args.backbone} backbone (random weights), {args.image_size} px, {args.epochs} epoch(s) per variant, "
        "batch 8; "
        f"the demo's synthetic data as MVTec AD ({images[0]} images) <-> VisA ({images[1]} images), both directions; "
        f"{args.repeats} interleaved round(s), median (and fastest) wall time. Encoder: time inside "
        "`ViP2CLIP.encode_image` and the images it encoded; text encoder, model builds, training and testing: seconds "
        "inside `ViP2CLIP.encode_text`, `build_model`, and the study's `train` and `evaluate_dataset` (training and "
        "testing include their image and text encoding).\n"
        f"Command: `python benchmarks/bench_study.py {' '.join(_argv())}`\n\n"
        + markdown_table(
            [
                "candidate",
                "wall s (median)",
                "wall s (min)",
                "encoder share",
                "images encoded",
                *(f"{label} s" for label, _, _ in PHASES[1:]),
                "vs one variant (median of per-round ratios)",
            ],
            rows,
        )
    )
    publish(f"Studies: {args.backbone} at {args.image_size} px", body, info, args.record, args.output)


def _argv() -> list[str]:
    import sys

    return sys.argv[1:]


if __name__ == "__main__":
    main()
