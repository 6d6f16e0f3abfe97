"""Images per second of `vip2clip test` in one process and under `torchrun --nproc-per-node N` (run by hand).

    python benchmarks/bench_distributed.py                                   # CPU: 1 process vs 2 ranks, ViT-B-16
    python benchmarks/bench_distributed.py --ranks 8 --device cuda --backbone ViT-L-14-336 --image-size 518 \\
        --images 64 512 --batch-size 16 --record                            # a node with 8 GPUs

The same command line runs both ways, as a user would run it. Fair on the CPU: the one process uses every core as
a thread, each of N ranks its share (vip2clip's default under torchrun: cores / N). Start-up (imports, building the
model, torchrun's rendezvous) is the same whatever the data, so each configuration evaluates a small and a large
synthetic benchmark and the throughput is (extra images) / (extra seconds). Rounds are interleaved (one run of
each configuration and size per round) and the median over rounds is reported. Random weights: speed does not
depend on weight values.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import vip2clip
from common import machine_description, markdown_table, publish
from vip2clip.data.synthetic import generate_benchmark
from vip2clip.model.checkpoint import save_checkpoint

SOURCE = str(Path(vip2clip.__file__).resolve().parents[1])


def command(ranks: int, data: Path, out: Path, args: argparse.Namespace) -> list[str]:
    vip2clip_args = ["test", "--data", str(data), "--out", str(out), "--checkpoint", str(data.parent / "model.pt"),
                     "--backbone", args.backbone, "--random-init",
                     "--image-size", str(args.image_size), "--batch-size", str(args.batch_size), "--device",
                     args.device, "--no-progress"]  # fmt: skip
    if ranks == 1:
        return [sys.executable, "-m", "vip2clip", *vip2clip_args]
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(ranks)]
    return [*launcher, "-m", "vip2clip", *vip2clip_args]


def timed(cmd: list[str], ranks: int, args: argparse.Namespace) -> float:
    env = {key: value for key, value in os.environ.items() if key != "OMP_NUM_THREADS"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [SOURCE, os.environ.get("PYTHONPATH")]))
    if ranks == 1 and args.device == "cpu":
        env["OMP_NUM_THREADS"] = str(len(os.sched_getaffinity(0)))
    started = time.perf_counter()
    result = subprocess.run(cmd, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{result.stderr[-3000:]}")
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, default=2, help="ranks to compare with one process")
    parser.add_argument("--backbone", default="ViT-B-16")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--images", type=int, nargs=2, default=(8, 40), metavar=("SMALL", "LARGE"),
                        help="test images of the small and the large benchmark (two classes each)")  # fmt: skip
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--record", action="store_true", help="append the results to RESULTS.md")
    args = parser.parse_args()
    info = machine_description(args.device)
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        model = vip2clip.create_model(args.backbone, image_size=args.image_size, seed=0, random_init=True)
        save_checkpoint(root / "model.pt", model.config, state=model.trainable_state_dict())
        benches = {}
        for n in args.images:
            half = n // 4  # per class: half normal, half anomalous
            generate_benchmark(root / f"b{n}", classes=2, image_size=args.image_size, n_train_good=0,
                               n_test_good=half, n_test_defect=n // 2 - half)  # fmt: skip
            benches[n] = root / f"b{n}"
        seconds: dict[tuple[int, int], list[float]] = {(r, n): [] for r in (1, args.ranks) for n in args.images}
        for round_ in range(args.repeats + 1):  # the first round warms the file cache and is not counted
            for ranks in (1, args.ranks):
                for n in args.images:
                    took = timed(command(ranks, benches[n], root / f"out{ranks}-{n}", args), ranks, args)
                    if round_:
                        seconds[(ranks, n)].append(took)
                    print(f"round {round_}: {ranks} rank(s), {n} images: {took:.1f} s", flush=True)
    small, large = args.images
    rows, rates = [], {}
    for ranks in (1, args.ranks):
        extra = [b - a for a, b in zip(seconds[(ranks, small)], seconds[(ranks, large)], strict=True)]
        rates[ranks] = (large - small) / statistics.median(extra)
        threads = "all cores" if ranks == 1 else "cores / ranks"
        rows.append([str(ranks), threads, f"{statistics.median(seconds[(ranks, small)]):.1f}",
                     f"{statistics.median(seconds[(ranks, large)]):.1f}", f"{rates[ranks]:.2f}"])  # fmt: skip
    headers = ["ranks", "threads per rank", f"{small} images (s)", f"{large} images (s)", "images/s (marginal)"]
    body = (
        f"`vip2clip test`, {args.backbone} (random weights), {args.image_size} px, batch {args.batch_size}, "
        f"{args.device}, {args.repeats} interleaved rounds (medians).\n\n{markdown_table(headers, rows)}\n\n"
        f"{args.ranks} ranks / 1 process: **{rates[args.ranks] / rates[1]:.2f}x** images/s. On a shared machine a "
        "multi-threaded process suffers most from other processes' load: compare runs made while it was quiet."
    )
    publish(f"bench_distributed.py: 1 process vs {args.ranks} ranks ({args.device})", body, info, args.record)


if __name__ == "__main__":
    main()
