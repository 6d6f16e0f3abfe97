"""Check that a refactoring leaves every output file unchanged: run the demo, `test --save-maps`, `calibrate` and
`predict` (plain, tiled, with reference images) on the demo's data into a folder, once per source tree, then
compare the folders file by file.

Run by hand (not a test: a few minutes on the tiny model):

    python benchmarks/check_outputs_unchanged.py run --src /tmp/base/src /tmp/outputs-base
    python benchmarks/check_outputs_unchanged.py run --src src /tmp/outputs-new
    python benchmarks/check_outputs_unchanged.py compare /tmp/outputs-base /tmp/outputs-new

`run` writes each command's stdout and stderr into OUT/logs/ beside its outputs (stderr is kept but not compared:
it holds warnings with source line numbers). Wall-clock times (the demo's "finished in N s", demo.json's
"seconds", training histories' timings) are masked before comparing; everything else must be byte-identical.
Exit code of `compare`: 0 identical, 1 differences (printed).
"""

from __future__ import annotations

import argparse
import difflib
import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

# Keys whose values change from run to run whatever the code: wall-clock times, dates, file times, and the hash of
# a checkpoint that holds its training's times (the checkpoints themselves are compared by content, times masked).
MASKED_KEYS = frozenset({"seconds", "elapsed", "created", "file_mtime_ns", "checkpoint_sha256"})
# Cache folders named by a hash of the absolute paths of their images.
PATH_DIGEST = re.compile(r"(feature_cache/\.?[^/]*-)[0-9a-f]{16}")
TEXT_SUFFIXES = frozenset({".json", ".jsonl", ".md", ".csv", ".txt", ".stdout", ".rc"})
TIMING_TEXT = re.compile(r"(finished in|in) \d+(\.\d+)? ?s\b")


def _commands(out: Path) -> Iterator[tuple[str, list[str]]]:
    """(log name, vip2clip arguments) of every command, in the order they run (a generator: later ones read the
    earlier ones' outputs)."""
    data, checkpoint = out / "demo" / "data" / "test_structured", out / "demo" / "train" / "checkpoint.pt"
    model = ["--checkpoint", str(checkpoint), "--no-progress", "--reference-cache", str(out / "reference_cache")]
    yield "demo", ["demo", "--out", str(out / "demo"), "--epochs", "2"]
    goods = sorted(str(path) for path in data.glob("*/test/good"))
    yield "test", ["test", "--data", str(data), "--out", str(out / "test"), "--save-maps", *model]
    yield "test_tiled", ["test", "--data", str(data), "--out", str(out / "test_tiled"), "--tile", "96", *model]
    yield "synth", ["synth", "--out", str(out / "fewshot_data"), "--seed", "5", "--style", "structured"]
    fewshot = ["--data", str(out / "fewshot_data"), "--out", str(out / "test_shots"), "--shots", "2"]
    yield "test_shots", ["test", *fewshot, "--save-maps", *model]
    yield "calibrate", ["calibrate", *goods, "--out", str(out / "calibration.json"), *model]
    reference = ["--reference", goods[0], "--tile", "96"]
    yield "calibrate_ref", ["calibrate", *goods, "--out", str(out / "calibration_ref.json"), *reference, *model]
    calibration = ["--calibration", str(out / "calibration.json")]
    yield "predict", ["predict", str(data), "--out", str(out / "predict"), *calibration, "--panels", "--raw-maps",
                      *model]  # fmt: skip
    calibration = ["--calibration", str(out / "calibration_ref.json")]
    yield "predict_ref", ["predict", str(data), "--out", str(out / "predict_ref"), *calibration, *reference, *model]


def run(src: Path, out: Path) -> int:
    if out.exists() and any(out.iterdir()):
        raise SystemExit(f"{out}: not empty; choose a new folder")
    (out / "logs").mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": str(src.resolve()), "PYTHONHASHSEED": "0"}
    for name, arguments in _commands(out):
        # The paths are relative to OUT in the logs so that two folders compare equal.
        completed = subprocess.run(
            [sys.executable, "-m", "vip2clip", *arguments], env=env, capture_output=True, text=True, check=False
        )
        (out / "logs" / f"{name}.stdout").write_text(completed.stdout.replace(str(out), "OUT"), encoding="utf-8")
        (out / "logs" / f"{name}.stderr").write_text(completed.stderr.replace(str(out), "OUT"), encoding="utf-8")
        (out / "logs" / f"{name}.rc").write_text(f"{completed.returncode}\n", encoding="utf-8")
        print(f"{name}: exit {completed.returncode}")
        if completed.returncode not in (0, 1):
            print(completed.stderr[-2000:], file=sys.stderr)
    return 0


def _mask_json(value: object, root: str) -> object:
    if isinstance(value, dict):
        return {k: ("<time>" if k in MASKED_KEYS else _mask_json(v, root)) for k, v in value.items()}
    if isinstance(value, list):
        return [_mask_json(v, root) for v in value]
    if isinstance(value, str):
        return value.replace(root, "OUT")
    return value


def _normalised_checkpoint(path: Path, root: Path) -> bytes:
    """A checkpoint's content (tensors as bytes, the rest as text) with the masked keys masked."""
    import torch

    def flat(value: object, where: str) -> Iterator[str]:
        if isinstance(value, dict):
            for key in sorted(value, key=str):
                yield from (f"{where}/{key}: <masked>",) if key in MASKED_KEYS else flat(value[key], f"{where}/{key}")
        elif isinstance(value, list | tuple):
            for i, item in enumerate(value):
                yield from flat(item, f"{where}[{i}]")
        elif isinstance(value, torch.Tensor):
            yield f"{where}: {value.dtype} {tuple(value.shape)} {value.detach().cpu().numpy().tobytes().hex()}"
        else:
            yield f"{where}: {value!r}".replace(str(root), "OUT")

    return "\n".join(flat(torch.load(path, map_location="cpu", weights_only=False), "")).encode()


def _normalised(path: Path, root: Path) -> bytes:
    """The file's bytes, with wall-clock times masked and the output folder's own path replaced by OUT (in binary
    files, such as checkpoints, by as many X: give the two folders paths of the same length)."""
    if path.suffix == ".pt":
        return _normalised_checkpoint(path, root)
    data = path.read_bytes()
    if path.suffix not in TEXT_SUFFIXES:
        return data.replace(str(root).encode(), b"X" * len(str(root).encode()))
    if path.suffix in {".json", ".jsonl"}:
        try:
            if path.suffix == ".json":
                return json.dumps(_mask_json(json.loads(data), str(root)), indent=1).encode()
            lines = [json.dumps(_mask_json(json.loads(line), str(root))) for line in data.splitlines() if line]
            return "\n".join(lines).encode()
        except (json.JSONDecodeError, UnicodeDecodeError):
            return data
    return TIMING_TEXT.sub(r"\1 <time>", data.decode("utf-8").replace(str(root), "OUT")).encode()
    return data


def _files(root: Path) -> set[str]:
    skipped = {"reference_cache"}  # cache entries: named by content, compared through the outputs they produce
    return {
        PATH_DIGEST.sub(r"\1<digest>", str(p.relative_to(root)))
        for p in root.rglob("*")
        if p.is_file() and p.suffix != ".stderr" and p.relative_to(root).parts[0] not in skipped
    }


def _path(root: Path, name: str) -> Path:
    """The file of `name` (as `_files` lists it) under `root`."""
    if "<digest>" not in name:
        return root / name
    return next(p for p in root.rglob("*") if PATH_DIGEST.sub(r"\1<digest>", str(p.relative_to(root))) == name)


def compare(first: Path, second: Path) -> int:
    if len(str(first)) != len(str(second)):
        raise SystemExit("give the two folders paths of the same length (binary files hold their paths)")
    a, b = _files(first), _files(second)
    problems = [f"only in {first}: {name}" for name in sorted(a - b)]
    problems += [f"only in {second}: {name}" for name in sorted(b - a)]
    same = 0
    for name in sorted(a & b):
        left, right = _normalised(_path(first, name), first), _normalised(_path(second, name), second)
        if left == right:
            same += 1
            continue
        problems.append(f"differs: {name}")
        if Path(name).suffix in TEXT_SUFFIXES:
            diff = difflib.unified_diff(
                left.decode(errors="replace").splitlines(), right.decode(errors="replace").splitlines(), lineterm=""
            )
            problems.extend(f"    {line}" for line in list(diff)[2:22])
    for line in problems:
        print(line)
    print(f"{same} of {len(a | b)} files identical")
    return 1 if problems else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    run_parser = commands.add_parser("run", help="run the commands with one source tree into OUT")
    run_parser.add_argument("out", type=Path)
    run_parser.add_argument("--src", type=Path, default=Path(__file__).resolve().parents[1] / "src")
    compare_parser = commands.add_parser("compare", help="compare two OUT folders file by file")
    compare_parser.add_argument("first", type=Path)
    compare_parser.add_argument("second", type=Path)
    args = parser.parse_args()
    if args.command == "run":
        return run(args.src, args.out)
    return compare(args.first, args.second)


if __name__ == "__main__":
    sys.exit(main())
