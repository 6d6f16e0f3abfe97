"""The authors' own `test.py`, run from your clone of their repository, against `vip2clip test` (run by hand).

Both evaluate the same synthetic images (3 classes, named like BTAD's because the release takes its class list
from the dataset name; 3 normal + 3 defective images each, 224 px files), with the same random ViT-L/14@336 CLIP
weights (OpenAI layout) and the same random release-format checkpoint. The release runs end to end: its Dataset,
transforms, forward, SciPy smoothing, metrics.py and table. Prints both tables and the largest difference in points;
`--record` appends them to benchmarks/RESULTS.md. Nothing of the release is copied into this repository.

    git clone https://github.com/kim0806/ViP2-CLIP ~/ViP2-CLIP
    python benchmarks/check_release_test.py --release-dir ~/ViP2-CLIP [--image-size 518] [--workdir DIR] [--record]

Shims, installed only in the process that runs the release (today's libraries, no internet):
- `pkg_resources` and `torch.jit.load`: the stand-ins of `vip2clip.paper.release_clone` (`import_release`,
  `rewinding_jit_load`), shared with `vip2clip study efficiency`.
- `VIP2CLIP_lib.model_load._download`: returns the random weights file instead of downloading ViT-L-14-336px.pt.
- `PIL.Image.fromarray(zeros, mode="L")`: the release's empty mask of a normal image is a float64 array of zeros;
  Pillow 12 refuses a mode that does not match the dtype, older versions read it as 8-bit zeros. The shim passes
  such an all-zero array as uint8 zeros (the same image); any other array goes through unchanged.
- `metrics.image_level_metrics` / `pixel_level_metrics` are wrapped to record the values they return, at full
  precision (the release prints them rounded to 0.1); what they compute is untouched.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import runpy
import subprocess
import sys
import tempfile
from pathlib import Path

from vip2clip.paper.release_clone import import_release, rewinding_jit_load

RELEASE_KEYS = {  # the release's metric names -> ours
    "pixel-auroc": "pixel_auroc",
    "pixel-aupro": "pixel_aupro",
    "pixel-f1": "pixel_f1",
    "image-auroc": "image_auroc",
    "image-ap": "image_ap",
    "image-f1": "image_f1",
}
COLUMNS = list(RELEASE_KEYS.values())
CLASSES = ["01", "02", "03"]  # BTAD's, a class list the release's dataset.py knows
N_CTX, N_DYN = 7, 3  # the random checkpoint's prompt lengths (vip2clip.testing.release_checkpoint)


def install_release_shims(release_dir: Path, clip_weights: Path) -> None:
    """Make the release importable in this process (a child one) with the shims of the module docstring (the
    caller runs the release inside `rewinding_jit_load()`)."""
    import_release(release_dir)
    os.chdir(release_dir)
    import numpy as np
    import PIL.Image
    import VIP2CLIP_lib.model_load as model_load

    model_load._download = lambda url, cache_dir=None: str(clip_weights)
    from_array = PIL.Image.fromarray

    def zero_mask_from_array(array, mode=None):
        if mode == "L" and array.dtype != np.uint8 and not array.any():  # the release's empty mask, float64
            array = array.astype(np.uint8)
        return from_array(array, mode)

    PIL.Image.fromarray = zero_mask_from_array


def run_release(release_dir: Path, clip_weights: Path, record: Path, argv: list[str]) -> None:
    """In a child process: the release's test.py with `argv`, after the shims of the module docstring."""
    install_release_shims(release_dir, clip_weights)
    import numpy as np

    import metrics as release_metrics  # the release's metrics.py

    values: list[tuple[str, str, float]] = []

    def recorded(function):
        def wrapper(results, obj, metric):
            maps_file = record.parent / f"release_maps_{obj}.npz"
            if metric.startswith("pixel") and not maps_file.exists():  # its own maps, for the metrics-only check
                np.savez(maps_file, maps=results[obj]["anomaly_maps"], masks=results[obj]["imgs_masks"])
            value = function(results, obj, metric)
            values.append((obj, metric, float(value[0] if isinstance(value, list) else value)))
            return value

        return wrapper

    release_metrics.image_level_metrics = recorded(release_metrics.image_level_metrics)
    release_metrics.pixel_level_metrics = recorded(release_metrics.pixel_level_metrics)
    sys.argv = ["test.py", *argv]
    with rewinding_jit_load():
        runpy.run_path(str(release_dir / "test.py"), run_name="__main__")
    record.write_text(json.dumps(values))


def make_inputs(workdir: Path) -> tuple[Path, Path, Path]:
    """(dataset root, CLIP weights, release checkpoint) in `workdir`, made once and reused."""
    import open_clip
    import torch
    from open_clip.model import CLIP

    from vip2clip.data.synthetic import generate_benchmark
    from vip2clip.testing.release_checkpoint import random_release_checkpoint

    data, clip_path, checkpoint_path = workdir / "data", workdir / "clip.pt", workdir / "release.pth"
    if not (data / "meta.json").exists():
        generate_benchmark(data, classes=3, seed=0, image_size=224, n_train_good=0, n_test_good=3, n_test_defect=3)
        meta = json.loads((data / "meta.json").read_text())
        renamed = {}
        for new_name, (_, samples) in zip(CLASSES, sorted(meta["test"].items()), strict=True):
            renamed[new_name] = [dict(sample, cls_name=new_name) for sample in samples]
        meta["test"] = renamed
        (data / "meta.json").write_text(json.dumps(meta, indent=1))
    if not checkpoint_path.exists():
        torch.manual_seed(5)
        clip_state = CLIP(**open_clip.get_model_config("ViT-L-14-336"), quick_gelu=True).state_dict()
        torch.save(clip_state, clip_path)
        torch.save(random_release_checkpoint(clip_state["token_embedding.weight"], seed=1), checkpoint_path)
    return data, clip_path, checkpoint_path


def release_table(release_dir: Path, workdir: Path, data: Path, clip: Path, checkpoint: Path, size: int) -> dict:
    """{class: {our metric name: value}} from the release's test.py, run in a child process."""
    record = workdir / "release_values.json"
    argv = ["--data_path", str(data), "--save_path", str(workdir / "release"), "--checkpoint_path", str(checkpoint),
            "--dataset", "btad", "--features_list", "6", "12", "18", "24", "--image_size", str(size),
            "--n_ctx", str(N_CTX), "--n_cls", str(N_DYN), "--seed", "111", "--topk", "50", "--sigma", "8",
            "--metrics", "image-pixel-level"]  # fmt: skip
    command = [sys.executable, __file__, "--run-release", str(release_dir), str(clip), str(record), "--", *argv]
    if not (record.exists() and (workdir / f"release_maps_{CLASSES[-1]}.npz").exists()):  # else: reuse that run
        subprocess.run(command, check=True)
    table: dict[str, dict[str, float]] = {}
    for obj, metric, value in json.loads(record.read_text()):
        table.setdefault(obj, {})[RELEASE_KEYS[metric]] = value
    return table


def our_table(workdir: Path, data: Path, clip: Path, checkpoint: Path, size: int, map_dtype: str | None) -> dict:
    """{class: {metric: value}} from `vip2clip test` with its defaults (or `--map-dtype map_dtype`)."""
    out = workdir / f"ours-{map_dtype or 'default'}"
    command = [sys.executable, "-m", "vip2clip", "test", "--data", str(data), "--out", str(out),
               "--checkpoint", str(checkpoint), "--clip-weights", str(clip), "--backbone", "ViT-L-14-336",
               "--image-size", str(size), "--no-progress"]  # fmt: skip
    if map_dtype:
        command += ["--map-dtype", map_dtype]
    if not (out / "results.json").exists():
        subprocess.run(command, check=True)
    results = json.loads((out / "results.json").read_text())
    return {c["name"]: {key: math.nan if c[key] is None else c[key] for key in COLUMNS} for c in results["classes"]}


def metrics_on_release_maps(workdir: Path, release: dict) -> float:
    """Largest |ours - release| in points of the pixel metrics computed by vip2clip.metrics on the release's own
    maps and masks (saved by the run): the metrics alone, without the two forwards' rounding differences."""
    import numpy as np

    from vip2clip.metrics import PIXEL_KEYS, compute_all

    largest = 0.0
    for cls, values in release.items():
        saved = np.load(workdir / f"release_maps_{cls}.npz")
        ours = compute_all(None, None, masks=saved["masks"] > 0.5, maps=saved["maps"])
        largest = max(largest, *(abs(ours[key] - values[key]) * 100 for key in PIXEL_KEYS))
    return largest


def metrics_only(release_dir: Path) -> str:
    """The release's metrics.py itself (imported from the clone) vs vip2clip.metrics on synthetic float32 maps of
    several spreads, near-flat ones included: seconds, no model."""
    import importlib.util

    import numpy as np

    from float16_effect import synthetic_class
    from vip2clip.metrics import compute_all

    spec = importlib.util.spec_from_file_location("release_metrics", release_dir / "metrics.py")
    release_metrics = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(release_metrics)
    rows = ["| maps | largest \\|vip2clip - release\\| of pixel AUROC, PRO, F1 (points) |", "|---|---|"]
    for spread in (0.2, 0.01, 1e-3, 1e-4):
        masks, maps = synthetic_class(spread, seed=1, n=8, size=96)
        results = {"c": {"imgs_masks": masks.astype(np.float32), "anomaly_maps": maps}}
        theirs = {key: release_metrics.pixel_level_metrics(results, "c", metric)
                  for metric, key in RELEASE_KEYS.items() if metric.startswith("pixel")}  # fmt: skip
        theirs["pixel_f1"] = theirs["pixel_f1"][0]
        ours = compute_all(None, None, masks=masks, maps=maps)
        rows.append(f"| synthetic, spread {spread:g} | {max(abs(ours[k] - v) * 100 for k, v in theirs.items()):.2e} |")
    return "\n".join(rows)


def with_mean(table: dict) -> dict:
    """The table plus the release's 'mean' row (plain mean over the classes)."""
    mean = {key: sum(row[key] for row in table.values()) / len(table) for key in COLUMNS}
    return {**table, "mean": mean}


def _cell(value: float | None) -> str:
    return "-" if value is None or math.isnan(value) else f"{100 * value:.1f}"


def comparison(tables: dict[str, dict]) -> tuple[str, float]:
    """A markdown table (one row per class, the six metrics of each run) and the largest |default - release|."""
    names = list(tables)
    header = "| class | " + " | ".join(f"{name}: pixel AUROC / PRO / F1, image AUROC / AP / F1" for name in names)
    lines = [header + " |", "|---" * (len(names) + 1) + "|"]
    release, default = tables[names[0]], tables[names[1]]
    largest = 0.0
    for cls in release:
        cells = []
        for name in names:
            row = tables[name].get(cls, {})
            values = [_cell(row.get(key)) for key in COLUMNS]
            cells.append(" / ".join(values[:3]) + ", " + " / ".join(values[3:]))
        lines.append(f"| {cls} | " + " | ".join(cells) + " |")
        for key in COLUMNS:
            ours, theirs = default[cls][key], release[cls][key]
            largest = max(largest, math.inf if math.isnan(ours) != math.isnan(theirs) else abs(ours - theirs) * 100)
    return "\n".join(lines), largest


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--run-release":
        split = sys.argv.index("--")
        release_dir, clip, record = sys.argv[2:split]
        run_release(Path(release_dir).resolve(), Path(clip), Path(record), sys.argv[split + 1 :])
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--release-dir", type=Path, required=True, help="your clone of kim0806/ViP2-CLIP")
    parser.add_argument("--image-size", type=int, default=518)
    parser.add_argument("--workdir", type=Path, default=None, help="reused: inputs and finished runs are kept")
    parser.add_argument("--no-float16", action="store_true", help="skip the run with --map-dtype float16")
    parser.add_argument("--record", action="store_true", help="append the result to benchmarks/RESULTS.md")
    parser.add_argument("--metrics-only", action="store_true", help="only the release's metrics.py on synthetic maps")
    args = parser.parse_args()
    if not (args.release_dir / "test.py").is_file() or not (args.release_dir / "VIP2CLIP_lib").is_dir():
        parser.error(f"{args.release_dir}: not a clone of the release (no test.py and VIP2CLIP_lib/)")
    if args.metrics_only:
        print(metrics_only(args.release_dir.resolve()))
        return
    workdir = (args.workdir or Path(tempfile.mkdtemp(prefix="vip2clip_release_test_"))).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    data, clip, checkpoint = make_inputs(workdir)
    release = release_table(args.release_dir.resolve(), workdir, data, clip, checkpoint, args.image_size)
    tables = {"release test.py": with_mean(release)}
    tables["vip2clip default"] = with_mean(our_table(workdir, data, clip, checkpoint, args.image_size, None))
    if not args.no_float16:
        tables["vip2clip --map-dtype float16"] = with_mean(
            our_table(workdir, data, clip, checkpoint, args.image_size, "float16")
        )
    table, largest = comparison(tables)
    summary = f"Largest |vip2clip default - release| over all cells: {largest:.3f} points (full precision)."
    if (workdir / f"release_maps_{CLASSES[0]}.npz").exists():
        alone = metrics_on_release_maps(workdir, release)
        summary += (
            f"\nvip2clip.metrics on the release's own float32 maps and masks: largest |difference| from the "
            f"release's pixel metrics {alone:.2e} points (the rest is the forwards' rounding on these maps)."
        )
    print(table, summary, sep="\n\n")
    if args.record:
        from common import append_results, machine_description

        title = f"check_release_test.py: the release's test.py vs vip2clip test ({args.image_size} px)"
        append_results(title, f"{table}\n\n{summary}", machine_description())


if __name__ == "__main__":
    main()
