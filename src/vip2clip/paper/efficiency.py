"""Table 3 of the paper, computational efficiency (`vip2clip study efficiency`): trainable parameters, inference
milliseconds per image (batch 1) and peak memory, measured on the device of the run, beside the paper's numbers
(measured on an NVIDIA L20) and, given a clone of the authors' repository, the release's computation
(`paper.release_clone`) measured side by side with ours.

What is timed, for each computation: from a preprocessed image tensor on the device to the image score and the
smoothed anomaly map (our `predict`; the release's test-time code path); image decoding and resizing are left
out of both. The repetitions are interleaved (one of ours, one of the release's, in turn; `utils.measure`).
Peak memory: on CUDA the memory PyTorch allocated (`torch.cuda.max_memory_allocated`), on the CPU the process's
peak resident memory (VmHWM, reset before each phase where Linux allows). Ours is measured before the release is
built; the release's is its peak during an inference (after its loading's transient copies are freed) above the
memory in use before it was built (ours stays loaded), so on the CPU ours includes the Python process and the
release's does not. The paper's text
calls its "GPU Cost" the *training* GPU memory (Sec. 5.2), so ours is measured for inference and for one training
step (the encoder run on the batch, the loss, the backward pass, the optimizer step). The release's training
memory and the training time of 10 epochs are not measured (`vip2clip train` logs its epochs' seconds).
"""

from __future__ import annotations

import gc
import math
import statistics
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from vip2clip.config import TrainConfig
from vip2clip.evaluation.reports import markdown_table
from vip2clip.model.vip2clip import ViP2CLIP
from vip2clip.training.loop import build_optimizer, train_step
from vip2clip.utils.fileio import atomic_write_json, atomic_write_text
from vip2clip.utils.measure import (
    Timing,
    current_rss_mib,
    paired_ratio,
    peak_rss_mib,
    reset_peak_rss,
    synchronizer,
    time_interleaved,
)
from vip2clip.utils.memory import return_freed_memory

GB = 2**30
PAPER_IMAGE_SIZE = 518
NOT_MEASURED = "not measured"


@dataclass(frozen=True, kw_only=True)
class Cost:
    """One computation's measurements (None: not measured)."""

    name: str
    device: str
    trainable_parameters: int | None = None
    milliseconds: tuple[float, ...] = ()
    inference_peak_bytes: int | None = None
    training_peak_bytes: int | None = None

    def mean_std_ms(self) -> tuple[float, float]:
        if not self.milliseconds:
            return math.nan, math.nan
        spread = statistics.stdev(self.milliseconds) if len(self.milliseconds) > 1 else 0.0
        return statistics.fmean(self.milliseconds), spread


class PeakMemory:
    """Peak memory on the device since the last `reset`: PyTorch's CUDA allocator, or the process's resident
    memory on the CPU; `in_use` is the memory in use now, to count a computation above what was there before."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.cuda = device, device.type == "cuda"
        resettable = self.cuda or reset_peak_rss()
        self.kind = (
            "CUDA memory allocated by PyTorch (torch.cuda.max_memory_allocated)"
            if self.cuda
            else "process peak resident memory (VmHWM)"
            + ("" if resettable else "; not resettable here, so a phase includes the earlier ones")
        )

    def in_use(self) -> int:
        synchronizer(self.device)()
        return torch.cuda.memory_allocated(self.device) if self.cuda else int(current_rss_mib() * 2**20)

    def reset(self) -> None:
        """Start a phase; freed memory is returned first, so that a load's transient copies do not count."""
        synchronizer(self.device)()
        gc.collect()
        return_freed_memory()
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            reset_peak_rss()

    def peak(self) -> int:
        synchronizer(self.device)()
        return torch.cuda.max_memory_allocated(self.device) if self.cuda else int(peak_rss_mib() * 2**20)


def _image(size: int, device: torch.device, batch: int = 1) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(0)).to(device)


def measure_ours(model: ViP2CLIP, *, batch_size: int, memory: PeakMemory) -> tuple[int, int]:
    """(inference peak at batch 1, peak of one training step at `batch_size`) of our model, in bytes."""
    device, size = next(model.parameters()).device, model.config.image_size
    image = _image(size, device)
    memory.reset()
    model.predict(image)
    inference = memory.peak()
    images = _image(size, device, batch_size)
    masks = (torch.rand(batch_size, size, size, generator=torch.Generator().manual_seed(1)) > 0.9).float()
    labels = torch.arange(batch_size) % 2
    optimizer = build_optimizer(model, TrainConfig(batch_size=batch_size))
    memory.reset()
    model.train()
    train_step(model, optimizer, batch=(model.encode_image(images), masks.to(device), labels.to(device)))
    training = memory.peak()
    model.eval()
    del optimizer
    return inference, training


def measure(
    model: ViP2CLIP,
    *,
    device_name: str,
    batch_size: int,
    repetitions: int,
    warmup: int,
    release: Callable[[], Any] | None = None,
) -> tuple[list[Cost], PeakMemory]:
    """Ours and, with `release` (a factory of `ReleaseComputation`), the release's costs, timed interleaved."""
    device = next(model.parameters()).device
    memory = PeakMemory(device)
    inference, training = measure_ours(model, batch_size=batch_size, memory=memory)
    image = _image(model.config.image_size, device)
    candidates: dict[str, Callable[[], object]] = {"ours": lambda: model.predict(image)}
    release_cost: dict[str, Any] = {}
    if release is not None:
        before = memory.in_use()
        computation = release()
        memory.reset()
        computation(image)
        release_cost = {"trainable_parameters": computation.trainable_parameters}
        release_cost["inference_peak_bytes"] = memory.peak() - before
        candidates["release"] = lambda: computation(image)
    timings = time_interleaved(candidates, repetitions, warmup=warmup, sync=synchronizer(device), rotate=True)
    costs = [
        Cost(
            name="ours",
            device=device_name,
            trainable_parameters=model.num_trainable_parameters(),
            milliseconds=_ms(timings["ours"].seconds),
            inference_peak_bytes=inference,
            training_peak_bytes=training,
        )
    ]
    if release is not None:
        costs.append(
            Cost(name="release", device=device_name, milliseconds=_ms(timings["release"].seconds), **release_cost)
        )
    return costs, memory


def _ms(seconds: tuple[float, ...]) -> tuple[float, ...]:
    return tuple(1000.0 * value for value in seconds)


def _gb(value: int | None) -> str:
    return NOT_MEASURED if value is None else f"{value / GB:.2f}"


def _ms_cell(cost: Cost) -> str:
    if not cost.milliseconds:
        return NOT_MEASURED
    mean, std = cost.mean_std_ms()
    return f"{mean:.2f} ± {std:.2f} (median {statistics.median(cost.milliseconds):.2f})"


def efficiency_markdown(costs: list[Cost], *, paper: Mapping[str, Any], settings: Mapping[str, Any], note: str) -> str:
    """Table 3's columns: the paper's row, ours, the release's (or why it was not measured)."""
    header = [
        "computation",
        "device",
        "trainable parameters (M)",
        "inference (ms per image, batch 1)",
        "peak memory, inference (GB)",
        f"peak memory, one training step of {settings['batch_size']} (GB)",
        "training time (h)",
    ]
    rows = [
        [
            f"paper: {paper['method']} ({paper['table']})",
            paper["device"],
            f"{paper['trainable_parameters_m']:.2f}",
            f"{paper['inference_ms']:.2f} ± {paper['inference_ms_spread']:.2f}",
            "-",
            f'{paper["gpu_memory_gb"]:.2f} (its "GPU Cost": training GPU memory, batch 8)',
            f"{paper['training_time_h']:.2f}",
        ]
    ]
    for cost in costs:
        parameters = cost.trainable_parameters
        rows.append(
            [
                {"ours": "ours: vip2clip", "release": "the authors' release (your clone)"}[cost.name],
                cost.device,
                NOT_MEASURED if parameters is None else f"{parameters / 1e6:.2f} ({parameters:,})",
                _ms_cell(cost),
                _gb(cost.inference_peak_bytes),
                _gb(cost.training_peak_bytes),
                NOT_MEASURED,
            ]
        )
    if len(costs) == 1:
        rows.append(["the authors' release", "-", NOT_MEASURED, NOT_MEASURED, NOT_MEASURED, NOT_MEASURED, "-"])
    lines = [f"# {paper['table']}: {paper['title']}\n", markdown_table(header, rows) + "\n"]
    if len(costs) == 2:
        ratio = paired_ratio(*(Timing(cost.name, cost.milliseconds) for cost in costs))
        lines.append(f"ours / release, inference time: {ratio:.2f} (median of the per-repetition ratios).")
    lines += [
        f"Setting: {settings['image_size']} px (the paper's {PAPER_IMAGE_SIZE}), batch 1, backbone "
        f"{settings['backbone']}, our precision {settings['precision']}; {settings['repetitions']} repetitions "
        f"after {settings['warmup']} warm-up, interleaved; ms: mean ± sample standard deviation (the paper does not "
        "define its ±). GB = 2^30 bytes.",
        f"Memory: {settings['memory']}.",
        f"Ours against the paper's row: {settings['comparability'] or 'as in the paper'}.",
        note,
        f"The paper measured on {paper['device']} with {paper['framework']}: times and memory on another device do "
        "not compare with its numbers, only ours with the release's on the same device.",
    ]
    return "\n".join(line for line in lines if line) + "\n"


def write_efficiency(
    out_dir: str | Path, costs: list[Cost], *, paper: Mapping[str, Any], settings: Mapping[str, Any], note: str
) -> dict[str, Path]:
    """efficiency.md and efficiency.json (every repetition's milliseconds) in OUT."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    record = {
        "paper": dict(paper),
        "settings": dict(settings),
        "note": note,
        "computations": [asdict(c) for c in costs],
    }
    return {
        "markdown": atomic_write_text(
            out_dir / "efficiency.md", efficiency_markdown(costs, paper=paper, settings=settings, note=note)
        ),
        "json": atomic_write_json(out_dir / "efficiency.json", record),
    }
