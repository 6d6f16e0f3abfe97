"""Every headline path at the real model's size: ViT-L/14@336 at 518 px, random CLIP weights, a random
release-format checkpoint. For each path: did it complete, its seconds, its peak RSS, and how its outputs agree
with fp32 `predict` on the same images. Appends one table to RESULTS.md with --record.

Paths (one subprocess each, so that a crash or the out-of-memory killer ends one row, not the check, and the peak
RSS is that path's own: the kernel's high-water mark of that process, polled every half second while it runs):
  predict fp32 / bf16 / auto      `create_model(...).predict` on 2 images (fp32 is the reference of every row)
  export fp32                     `vip2clip export` (the whole predict as one ONNX graph)
  onnxruntime fp32, openvino fp32 / auto   `load_onnx(...).predict` on the same images
  export int8 nncf / onnxruntime  `vip2clip export --int8 --calibration-images` (8 normal images), then each file on
                                  ONNX Runtime and on OpenVINO
  anomalib Engine.predict         anomalib's loop on the 2 image files
  study, one variant, 1 epoch     `vip2clip study modules --variants utpa+vca+fgp --epochs 1` on 2 + 2 images
  predict --mutual (8 images)     `vip2clip predict --mutual` (batch zero-shot)
  predict --explain (1 image)     `vip2clip predict --explain`

    python benchmarks/check_scale.py --record                     # ViT-L-14-336, 518 px (30-60 min on 2 cores)
    python benchmarks/check_scale.py --backbone tiny --size 64    # a dry run of every step (a few minutes)
    python benchmarks/check_scale.py --only predict-fp32 export-int8-nncf   # some steps (the reference runs too)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
REFERENCE = "predict-fp32"
IMAGE_PNGS = 8  # normal-looking images: the INT8 calibration set and the mutual group; the first 2 are scored


def _images(work: Path) -> list[Path]:
    return sorted((work / "images").glob("*.png"))


def _model_flags(args: argparse.Namespace) -> list[str]:
    weights = [] if args.backbone == "tiny" else ["--random-init"]
    return ["--backbone", args.backbone, "--image-size", str(args.size), *weights]


def _arrays(args: argparse.Namespace, work: Path) -> np.ndarray:
    """The 2 scored images, preprocessed as `vip2clip predict` does ([2, 3, S, S])."""
    from vip2clip.data.images import load_image
    from vip2clip.data.transforms import preprocess_array

    return np.stack([preprocess_array(load_image(path), args.size) for path in _images(work)[:2]])


def _save(work: Path, step: str, score: np.ndarray, anomaly_map: np.ndarray | None) -> None:
    arrays = {"score": np.asarray(score, np.float32)}
    if anomaly_map is not None:
        arrays["map"] = np.asarray(anomaly_map, np.float32)
    np.savez(work / f"{step}.npz", **arrays)


def step_predict(args: argparse.Namespace, work: Path, precision: str) -> dict:
    import torch

    import vip2clip

    model = vip2clip.create_model(
        args.backbone, checkpoint=work / "release.pth", image_size=args.size, precision=precision, random_init=True
    ).eval()
    images = torch.from_numpy(_arrays(args, work))
    model.predict(images[:1])  # the first call allocates (and, in bf16, copies the weights once)
    started = time.perf_counter()
    outputs = [model.predict(image[None]) for image in images]  # batch 1, as a user's loop
    seconds = (time.perf_counter() - started) / len(images)
    score = torch.cat([out.pred_score for out in outputs]).numpy()
    _save(work, f"predict-{precision}", score, torch.cat([out.anomaly_map for out in outputs]).numpy())
    return {"s_per_image": seconds, "computes": f"torch {model.precision} ({model.precision_reason})"}


def step_cli(argv: list[str]) -> dict:
    from vip2clip.cli import main

    started = time.perf_counter()
    code = main(argv)
    if code != 0:
        raise RuntimeError(f"vip2clip {' '.join(argv[:2])} exited {code}")
    return {"seconds": time.perf_counter() - started}


def step_engine(args: argparse.Namespace, work: Path, step: str, file: str, backend: str, precision: str) -> dict:
    import vip2clip

    engine = vip2clip.load_onnx(work / file, backend=backend, precision=precision)
    images = _arrays(args, work)
    engine.predict(images[:1])  # the first call compiles (OpenVINO) or plans (ONNX Runtime)
    started = time.perf_counter()
    outputs = [engine.predict(image[None]) for image in images]
    seconds = (time.perf_counter() - started) / len(images)
    score = np.concatenate([out.pred_score for out in outputs])
    _save(work, step, score, np.concatenate([out.anomaly_map for out in outputs]))
    return {"s_per_image": seconds, "computes": engine.describe()}


def step_anomalib(args: argparse.Namespace, work: Path) -> dict:
    import logging

    from anomalib.engine import Engine

    from vip2clip.integrations.anomalib import ViP2CLIP

    logging.getLogger("lightning").setLevel(logging.ERROR)
    folder = work / "two-images"
    folder.mkdir(exist_ok=True)
    for path in _images(work)[:2]:
        (folder / path.name).unlink(missing_ok=True)
        os.link(path, folder / path.name)
    model = ViP2CLIP(
        checkpoint=work / "release.pth",
        backbone=args.backbone,
        image_size=args.size,
        visualizer=False,
        random_init=True,
    )
    engine = Engine(
        default_root_dir=work / "engine",
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    started = time.perf_counter()
    batches = engine.predict(model, data_path=folder)
    seconds = (time.perf_counter() - started) / 2
    by_name = {Path(p).name: float(s) for b in batches for p, s in zip(b.image_path, b.pred_score, strict=True)}
    _save(work, "anomalib", np.array([by_name[path.name] for path in _images(work)[:2]]), None)
    return {"s_per_image": seconds, "computes": f"torch {model.network.precision} ({model.network.precision_reason})"}


def steps(args: argparse.Namespace, work: Path) -> dict[str, Callable[[], dict]]:
    """step name -> what it runs (in the subprocess)."""
    model = _model_flags(args)
    checkpoint = ["--checkpoint", str(work / "release.pth")]
    quiet = ["--no-progress"]
    table: dict[str, Callable[[], dict]] = {
        f"predict-{p}": (lambda p=p: step_predict(args, work, p)) for p in ("fp32", "bf16", "auto")
    }
    table["export-fp32"] = lambda: step_cli(["export", *model, *checkpoint, "--out", str(work / "fp32.onnx")])
    for backend, precision in (("onnxruntime", "fp32"), ("openvino", "fp32"), ("openvino", "auto")):
        name = f"{backend}-{precision}"
        table[name] = lambda n=name, b=backend, p=precision: step_engine(args, work, n, "fp32.onnx", b, p)
    for method in ("nncf", "onnxruntime"):
        out = str(work / f"int8-{method}.onnx")
        int8 = ["--int8", "--int8-method", method, "--calibration-images", str(work / "images")]
        table[f"export-int8-{method}"] = lambda out=out, int8=int8: step_cli(
            ["export", *model, *checkpoint, *int8, "--out", out]
        )
        for backend in ("onnxruntime", "openvino"):
            name = f"int8-{method}-{backend}"
            table[name] = lambda n=name, m=method, b=backend: step_engine(args, work, n, f"int8-{m}.onnx", b, "auto")
    table["anomalib"] = lambda: step_anomalib(args, work)
    study = [
        "study",
        "modules",
        "--data",
        f"mvtec={work / 'study-a'}",
        f"visa={work / 'study-b'}",
        "--variants",
        "utpa+vca+fgp",
        "--epochs",
        "1",
        *model,
        *quiet,
        "--out",
        str(work / "study"),
    ]
    table["study-1-variant-1-epoch"] = lambda: step_cli(study)
    predict = ["predict", *model, *checkpoint, *quiet]
    decided = ["--threshold", "0.5", "--pixel-threshold", "0.5"]  # a timing: mutual scores need explicit thresholds
    table["predict-mutual-8"] = lambda: step_cli(
        [*predict, str(work / "images"), "--mutual", *decided, "--overwrite", "--out", str(work / "mutual")]
    )
    table["predict-explain-1"] = lambda: step_cli(
        [*predict, str(_images(work)[0]), "--explain", "--overwrite", "--out", str(work / "explain")]
    )
    return table


def prepare(args: argparse.Namespace, work: Path) -> None:
    """The random release checkpoint, the images (600 px PNGs) and the two small study datasets."""
    import torch
    from PIL import Image

    from vip2clip.data.synthetic import generate_benchmark
    from vip2clip.model.weights import load_clip
    from vip2clip.testing.release_checkpoint import random_release_checkpoint

    work.mkdir(parents=True, exist_ok=True)
    if not (work / "release.pth").is_file():
        clip, _ = load_clip(args.backbone, None)
        torch.save(random_release_checkpoint(clip.token_embedding.weight.detach(), seed=1), work / "release.pth")
    (work / "images").mkdir(exist_ok=True)
    rng = np.random.default_rng(0)
    for index in range(IMAGE_PNGS):  # textured grey-ish parts, each its own tint
        base = rng.integers(60, 200, 3)
        pixels = np.clip(base + rng.normal(0, 25, (600, 600, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(work / "images" / f"part_{index}.png")
    for name, seed in (("study-a", 1), ("study-b", 2)):
        if not (work / name / "meta.json").is_file():
            generate_benchmark(
                work / name, seed=seed, classes=1, image_size=600, n_train_good=0, n_test_good=1, n_test_defect=1
            )


def _high_water_mib(pid: int) -> float:
    """The process's peak resident memory so far (VmHWM), 0 once it is gone. Not wait4's ru_maxrss: that one
    keeps the peak of the forked copy of this process across exec, a floor of this process's own size."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0.0
    line = next((line for line in status.splitlines() if line.startswith("VmHWM:")), "VmHWM: 0 kB")
    return int(line.split()[1]) / 1024


def run_step(args: argparse.Namespace, work: Path, step: str) -> dict:
    """Run `step` in a subprocess: its result, with completed / seconds / peak RSS (the kernel's high-water mark
    of the process, read while it runs)."""
    command = [
        sys.executable,
        __file__,
        "--child",
        step,
        "--backbone",
        args.backbone,
        "--size",
        str(args.size),
        "--workdir",
        str(work),
    ]
    started = time.perf_counter()
    with open(work / f"{step}.log", "w") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        deadline, peak = started + args.timeout, 0.0
        while True:
            peak = max(peak, _high_water_mib(process.pid))
            pid, status = os.waitpid(process.pid, os.WNOHANG)
            if pid:
                break
            if time.perf_counter() > deadline:
                process.kill()
            time.sleep(0.5)
    wall = time.perf_counter() - started
    result_file = work / f"{step}.json"
    result = json.loads(result_file.read_text()) if result_file.is_file() and status == 0 else {}
    result_file.unlink(missing_ok=True)
    if not result:
        tail = (work / f"{step}.log").read_text(errors="replace").strip().splitlines()[-1:] or ["(no output)"]
        why = "timed out" if wall > args.timeout else f"exit status {os.waitstatus_to_exitcode(status)}"
        result = {"error": f"{why}: {tail[0][:160]}"}
    result.update(wall_s=wall, peak_rss_mib=peak)
    return result


def agreement(work: Path, step: str) -> tuple[str, str]:
    """(max |Δ score|, map Spearman) of `step`'s saved outputs against fp32 predict's; '-' where not comparable."""
    from scipy.stats import spearmanr

    mine, reference = work / f"{step}.npz", work / f"{REFERENCE}.npz"
    if not (mine.is_file() and reference.is_file()) or step == REFERENCE:
        return ("0 (the reference)", "1 (the reference)") if step == REFERENCE else ("-", "-")
    got, want = np.load(mine), np.load(reference)
    delta = f"{np.abs(got['score'] - want['score']).max():.1e}"
    if "map" not in got:
        return delta, "-"
    rho = min(spearmanr(a.ravel(), b.ravel()).statistic for a, b in zip(got["map"], want["map"], strict=True))
    return delta, f"{rho:.5f}"


def table(work: Path, results: dict[str, dict]) -> str:
    from common import markdown_table

    rows = []
    for step, result in results.items():
        seconds = result.get("s_per_image")
        timing = f"{seconds:.2f} s/image" if seconds is not None else f"{result.get('seconds', result['wall_s']):.0f} s"
        delta, rho = agreement(work, step) if "error" not in result else ("-", "-")
        done = "yes" if "error" not in result else f"**no**: {result['error']}"
        computes = result.get("computes", "")
        rows.append([step, done, timing, f"{result['peak_rss_mib']:,.0f}", delta, rho, computes])
    headers = ["path", "completed", "time", "peak RSS MiB", "max Δ score", "map Spearman (min)", "computes in"]
    return markdown_table(headers, rows)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="ViT-L-14-336")
    parser.add_argument("--size", type=int, default=518)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/vip2clip-check-scale"))
    parser.add_argument("--only", nargs="+", default=None, help="these steps (the fp32 reference always runs)")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per step before it is killed")
    parser.add_argument("--record", action="store_true", help="append the table to RESULTS.md")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    work = args.workdir
    if args.child:  # inside the subprocess of one step
        result = steps(args, work)[args.child]()
        (work / f"{args.child}.json").write_text(json.dumps(result))
        return 0
    sys.path.insert(0, str(HERE))
    from common import machine_description, publish
    from vip2clip.utils.cpu_features import cpu_features

    info = machine_description()
    prepare(args, work)
    names = list(steps(args, work))
    chosen = [REFERENCE, *[n for n in names if n != REFERENCE and (args.only is None or n in args.only)]]
    results = {}
    for step in chosen:
        results[step] = run_step(args, work, step)
        print(f"{step}: {json.dumps(results[step])}", flush=True)
    body = (
        f"{args.backbone} at {args.size} px, random CLIP weights, a random release-format checkpoint; CPU: "
        f"{cpu_features().describe()}. Each path in its own process (peak RSS: that process's, from the kernel); "
        "time: per image after a first call for the predict paths, the whole command otherwise; agreement: "
        "against `predict` fp32 on the same 2 images (the mutual and study rows compute something else).\n"
        f"Command: `python benchmarks/check_scale.py {' '.join(sys.argv[1:])}`\n\n" + table(work, results)
    )
    publish(f"Scale check: {args.backbone} at {args.size} px", body, info, args.record)
    return 0 if all("error" not in result for result in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
