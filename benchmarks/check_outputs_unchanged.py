"""Check that a refactoring leaves every output file unchanged: run the commands below on the demo's tiny random
model and synthetic data into a folder, once per source tree, then compare the folders file by file.

Covered (in this order; OUT/logs/NAME.{stdout,rc} per command):
- demo (2 epochs: the data, checkpoint, tables and panels the others use)
- test: --save-maps; --explain on one class; --tile 96; --shots 2 (few-shot, on a `synth` dataset)
- calibrate and predict: plain (--panels --raw-maps); with --reference and --tile; with --mutual (calibrated with
  the same --mutual setting); --explain on two images; export to ONNX, then predict --onnx with ONNX Runtime
- train (1 epoch), benchmark (train 1 epoch, test zero-shot), study alignment (Table 5: 2 variants, 1 epoch
  each), all on --backbone tiny
Not covered: the anomalib integration (no CLI path), serve, OpenVINO, INT8 export, the efficiency study (times).
predict, calibrate and export run at --precision auto (bf16 on CPUs with AVX512-BF16 or AMX, fp32 elsewhere):
compare folders made on the same kind of CPU. About 3-4 minutes on 2 idle cores (longer on a busy machine).

Run by hand (not a test):

    python benchmarks/check_outputs_unchanged.py run --src /tmp/base/src /tmp/outputs-base
    python benchmarks/check_outputs_unchanged.py run --src src /tmp/outputs-new
    python benchmarks/check_outputs_unchanged.py compare /tmp/outputs-base /tmp/outputs-new

`run` checks first that the commands import vip2clip from --src (PYTHONPATH; they run in OUT, so that no
vip2clip/ folder in the working directory comes first) and stops otherwise. Each command's stderr is kept in
OUT/logs/ but not compared (log lines name modules and source lines).

Masked before comparing, as they change from run to run whatever the code: wall-clock times ("finished in N s",
"in N s", JSON keys seconds/elapsed), dates and file times (created, file_mtime_ns), checkpoint_sha256 (the
checkpoint holds its training's times; checkpoints are compared by content, those keys masked), the output
folder's absolute path (replaced by OUT), the feature caches' folder names (a hash of absolute image paths:
<digest-N>), and in ONNX files the exporter's per-node provenance (source files, line numbers, Python class
names: moving code changes them; the graph, weights and vip2clip's own metadata are compared). reference_cache/
is compared through the outputs it produces. Everything else must be byte-identical. The explanation panels draw
their image's absolute path: predict --explain reads copies in /tmp/vip2clip-check-outputs/ (the same path in
every run; concurrent runs take turns there).
Exit code of `compare`: 0 identical, 1 differences (printed).
"""

from __future__ import annotations

import argparse
import contextlib
import difflib
import fcntl
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

# Keys whose values change from run to run whatever the code: wall-clock times, dates, file times, and the hash of
# a checkpoint that holds its training's times (the checkpoints themselves are compared by content, times masked).
MASKED_KEYS = frozenset({"seconds", "elapsed", "created", "file_mtime_ns", "checkpoint_sha256"})
# Cache folders named by a hash of the absolute paths of their images.
PATH_DIGEST = re.compile(r"(?<=feature_cache/)(\.?[^/]*-)([0-9a-f]{16})")
# Where the inputs of outputs that draw absolute paths go (`_shared_copies`): the same for every run.
SHARED_FOLDER = Path("/tmp/vip2clip-check-outputs")
# Cache entries: named by content, compared through the outputs they produce.
SKIPPED_FOLDERS = frozenset({"reference_cache"})
TEXT_SUFFIXES = frozenset({".json", ".jsonl", ".md", ".csv", ".txt", ".stdout", ".rc"})
TIMING_TEXT = re.compile(r"(finished in|in) \d+(\.\d+)? ?s\b")


def _commands(out: Path) -> Iterator[tuple[str, list[str]]]:
    """(log name, vip2clip arguments) of every command, in the order they run (a generator: later ones read the
    earlier ones' outputs)."""
    yield "demo", ["demo", "--out", str(out / "demo"), "--epochs", "2"]
    yield from _evaluation_commands(out)
    yield from _prediction_commands(out)
    yield from _training_commands(out)


def _model_options(out: Path) -> list[str]:
    checkpoint = out / "demo" / "train" / "checkpoint.pt"
    return ["--checkpoint", str(checkpoint), "--no-progress", "--reference-cache", str(out / "reference_cache")]


def _evaluation_commands(out: Path) -> Iterator[tuple[str, list[str]]]:
    """`test` (maps, explanations, tiles, shots), `calibrate` and `predict` (plain, with reference images)."""
    data, model = out / "demo" / "data" / "test_structured", _model_options(out)
    goods = sorted(str(path) for path in data.glob("*/test/good"))
    yield "test", ["test", "--data", str(data), "--out", str(out / "test"), "--save-maps", *model]
    explain = ["--classes", "object_0", "--save-maps", "--max-maps", "2", "--explain"]
    yield "test_explain", ["test", "--data", str(data), "--out", str(out / "test_explain"), *explain, *model]
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


@contextlib.contextmanager
def _shared_copies(images: list[Path]) -> Iterator[list[str]]:
    """Copies of `images` at paths every run shares, held under a lock (a concurrent run waits), for outputs that
    draw their input's absolute path in pixels (the explanation panels). The lock is held until the generator of
    commands resumes, that is until the command has run."""
    folder = SHARED_FOLDER
    folder.mkdir(exist_ok=True)
    with (folder / "lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        copies = [folder / image.parent.name / image.name for image in images]
        for image, copy in zip(images, copies, strict=True):
            copy.parent.mkdir(exist_ok=True)
            shutil.copyfile(image, copy)
        yield [str(copy) for copy in copies]


def _prediction_commands(out: Path) -> Iterator[tuple[str, list[str]]]:
    """`predict` with mutual scoring (calibrated with the same setting), with `--explain` on two images, and with
    the ONNX file `export` writes (ONNX Runtime)."""
    data, model = out / "demo" / "data" / "test_structured", _model_options(out)
    goods = sorted(str(path) for path in data.glob("*/test/good"))
    mutual = ["--mutual", "--mutual-others", "5"]  # fewer others than images: the seeded sample is drawn
    yield "calibrate_mutual", ["calibrate", *goods, "--out", str(out / "calibration_mutual.json"), *mutual, *model]
    calibration = ["--calibration", str(out / "calibration_mutual.json"), *mutual]
    yield "predict_mutual", ["predict", str(data), "--out", str(out / "predict_mutual"), *calibration, *model]
    calibration = ["--calibration", str(out / "calibration.json")]
    explain = ["--out", str(out / "predict_explain"), "--explain", *calibration]
    # Two images of the same file name (their outputs' names are told apart).
    with _shared_copies([data / "object_0" / "test" / kind / "000.png" for kind in ("good", "scratch")]) as images:
        yield "predict_explain", ["predict", *images, *explain, *model]
    onnx = out / "onnx" / "model.onnx"
    yield "export", ["export", "--out", str(onnx), "--checkpoint", str(out / "demo" / "train" / "checkpoint.pt")]
    engine = ["--onnx", str(onnx), "--onnx-backend", "onnxruntime", "--no-progress"]
    yield "predict_onnx", ["predict", str(data), "--out", str(out / "predict_onnx"), *engine, *calibration]


def _training_commands(out: Path) -> Iterator[tuple[str, list[str]]]:
    """`train` (1 epoch), `benchmark` (train 1 epoch, test zero-shot) and the smallest `study` (Table 5's two
    variants, 1 epoch each) on the demo's data and its tiny random backbone."""
    textured, structured = out / "demo" / "data" / "train_textured", out / "demo" / "data" / "test_structured"
    tiny = ["--backbone", "tiny", "--epochs", "1", "--no-progress"]
    yield "train", ["train", "--data", str(textured), "--out", str(out / "train"), *tiny]
    protocol = ["--train", f"textured={textured}", "--test", f"structured={structured}"]
    yield "benchmark", ["benchmark", *protocol, "--out", str(out / "benchmark"), *tiny]
    yield "study", ["study", "alignment", *protocol, "--out", str(out / "study"), *tiny]


def _check_source(src: Path, env: dict[str, str], cwd: Path) -> None:
    """Stop unless the subprocesses import vip2clip from `src` (and not, say, the editable install's tree)."""
    command = [sys.executable, "-c", "import vip2clip; print(vip2clip.__file__)"]
    imported = subprocess.run(command, env=env, cwd=cwd, capture_output=True, text=True, check=True).stdout.strip()
    if not Path(imported).resolve().is_relative_to(src.resolve()):
        raise SystemExit(f"the commands would import vip2clip from {imported}, not from {src}")
    print(f"vip2clip from {imported}")


def run(src: Path, out: Path) -> int:
    if out.exists() and any(out.iterdir()):
        raise SystemExit(f"{out}: not empty; choose a new folder")
    (out / "logs").mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": str(src.resolve()), "PYTHONHASHSEED": "0"}
    # Run in OUT: `python -m` puts the working directory first on sys.path, where a vip2clip/ folder would win.
    _check_source(src, env, out)
    started = time.monotonic()
    for name, arguments in _commands(out):
        began = time.monotonic()
        command = [sys.executable, "-m", "vip2clip", *arguments]
        completed = subprocess.run(command, env=env, cwd=out, capture_output=True, text=True, check=False)
        # The paths are relative to OUT in the logs so that two folders compare equal.
        (out / "logs" / f"{name}.stdout").write_text(completed.stdout.replace(str(out), "OUT"), encoding="utf-8")
        (out / "logs" / f"{name}.stderr").write_text(completed.stderr.replace(str(out), "OUT"), encoding="utf-8")
        (out / "logs" / f"{name}.rc").write_text(f"{completed.returncode}\n", encoding="utf-8")
        print(f"{name}: exit {completed.returncode} ({time.monotonic() - began:.0f} s)")
        if completed.returncode not in (0, 1):
            print(completed.stderr[-2000:], file=sys.stderr)
    print(f"all commands: {time.monotonic() - started:.0f} s")
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


def _normalised_onnx(path: Path, root: Path) -> bytes:
    """An ONNX file without the provenance the exporter attaches to nodes and values (source files, line numbers,
    the Python classes the operations came from: moved code changes them, the computation not), the output
    folder's path replaced by OUT."""
    import onnx

    model = onnx.load(str(path))
    graph = model.graph
    for item in (*graph.node, *graph.value_info, *graph.input, *graph.output):
        del item.metadata_props[:]
    for entry in model.metadata_props:
        try:  # vip2clip.identity: the model's settings, the checkpoint's path and hash (masked as in JSON files)
            entry.value = json.dumps(_mask_json(json.loads(entry.value), str(root)))
        except json.JSONDecodeError:
            entry.value = entry.value.replace(str(root), "OUT")
    return model.SerializeToString()


def _normalised(path: Path, root: Path) -> bytes:
    """The file's bytes, with wall-clock times masked and the output folder's own path replaced by OUT
    (checkpoints and ONNX files are compared by content, the paths they hold replaced there)."""
    if path.suffix == ".pt":
        return _normalised_checkpoint(path, root)
    if path.suffix == ".onnx":
        return _normalised_onnx(path, root)
    data = path.read_bytes()
    if path.suffix not in TEXT_SUFFIXES:
        return data.replace(str(root).encode(), b"OUT")
    if path.suffix in {".json", ".jsonl"}:
        try:
            if path.suffix == ".json":
                return json.dumps(_mask_json(json.loads(data), str(root)), indent=1).encode()
            lines = [json.dumps(_mask_json(json.loads(line), str(root))) for line in data.splitlines() if line]
            return "\n".join(lines).encode()
        except (json.JSONDecodeError, UnicodeDecodeError):
            return data
    return TIMING_TEXT.sub(r"\1 <time>", data.decode("utf-8").replace(str(root), "OUT")).encode()


def _listing(root: Path) -> dict[str, Path]:
    """The compared files under `root` by name, each cache digest (a hash of absolute paths) replaced by
    <digest-N>: N numbers the digests in the order of what their files hold, so that two caches in one folder
    (a study's training and test images) keep apart and pair up across the two trees."""
    files = [
        path
        for path in sorted(root.rglob("*"))
        if path.is_file() and path.suffix != ".stderr" and path.relative_to(root).parts[0] not in SKIPPED_FOLDERS
    ]
    content: dict[str, list[tuple[str, str]]] = {}
    for path in files:
        if match := PATH_DIGEST.search(str(path.relative_to(root))):
            masked = PATH_DIGEST.sub(r"\1<digest>", str(path.relative_to(root)))
            content.setdefault(match[2], []).append((masked, hashlib.sha256(_normalised(path, root)).hexdigest()))
    number = {digest: n for n, digest in enumerate(sorted(content, key=lambda d: sorted(content[d])), start=1)}
    return {PATH_DIGEST.sub(lambda m: f"{m[1]}<digest-{number[m[2]]}>", str(p.relative_to(root))): p for p in files}


def compare(first: Path, second: Path) -> int:
    files_a, files_b = _listing(first), _listing(second)
    a, b = set(files_a), set(files_b)
    problems = [f"only in {first}: {name}" for name in sorted(a - b)]
    problems += [f"only in {second}: {name}" for name in sorted(b - a)]
    same = 0
    for name in sorted(a & b):
        left, right = _normalised(files_a[name], first), _normalised(files_b[name], second)
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
        return run(args.src, args.out.resolve())
    return compare(args.first.resolve(), args.second.resolve())


if __name__ == "__main__":
    sys.exit(main())
