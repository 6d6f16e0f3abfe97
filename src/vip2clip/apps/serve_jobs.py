"""The work behind `vip2clip serve`, without the web framework: limits, the bounded job queue, the bundled examples
and the JSON payload of one prediction (the HTTP side is `vip2clip.apps.serve`).

Memory is bounded by admission: a request takes a slot of the `JobQueue` *before* its body is read, so at most
`max_queue` uploads (each at most `max_upload_bytes`) are in memory at once, and decoding and predicting run one
job at a time on a single worker thread, so only one image (at most `max_pixels`) is decoded at a time.
"""

from __future__ import annotations

import asyncio
import base64
import io
import logging
import math
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
from PIL import Image

from vip2clip.data.images import decode_image_bytes
from vip2clip.data.transforms import resize_map
from vip2clip.inference.predictor import Predictor
from vip2clip.utils.memory import return_freed_memory
from vip2clip.visualization.heatmap import heatmap_overlay
from vip2clip.visualization.panel import colour_bar

logger = logging.getLogger(__name__)

DISPLAY_SIDE = 768  # images are shown (not scored) at most this large
T = TypeVar("T")


@dataclass(frozen=True, kw_only=True)
class ServeLimits:
    """max_upload_bytes: largest request body; max_pixels: largest image (checked from its header, before decoding);
    max_queue: requests admitted at once (uploading, waiting or running); header_timeout: seconds a connection may
    take to send a request's headers; body_timeout: seconds a request body may take to arrive; keep_alive_timeout:
    seconds an idle kept-alive connection stays open."""

    max_upload_bytes: int = 10 << 20
    max_pixels: int = 40_000_000  # ~ 7700 x 5200
    max_queue: int = 8
    header_timeout: float = 10.0
    body_timeout: float = 60.0
    keep_alive_timeout: float = 5.0

    def __post_init__(self) -> None:
        for name in (
            "max_upload_bytes",
            "max_pixels",
            "max_queue",
            "header_timeout",
            "body_timeout",
            "keep_alive_timeout",
        ):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and value > 0):
                raise ValueError(f"{name} must be > 0, got {value!r}")


class QueueFull(Exception):
    """Every slot of the queue is taken; `retry_after`: seconds after which a slot is likely free."""

    def __init__(self, capacity: int, retry_after: int) -> None:
        super().__init__(f"the server is busy ({capacity} requests in progress); retry in {retry_after} s")
        self.retry_after = retry_after


class Slot:
    """One admitted request; `upload_deadline` (time.monotonic) while it reads its upload, else None."""

    def __init__(self) -> None:
        self.upload_deadline: float | None = None

    @contextmanager
    def uploading(self, timeout: float) -> Iterator[None]:
        self.upload_deadline = time.monotonic() + timeout
        try:
            yield
        finally:
            self.upload_deadline = None


class ModelOutputError(RuntimeError):
    """The model gave a NaN or infinite score or map: no decision can be made (fail closed, never "normal")."""


class JobQueue:
    """At most `capacity` admitted requests; their jobs run one at a time on one worker thread (the Predictor is not
    thread-safe, and one decoded image at a time bounds memory).

    A request holds a `slot()` from before it reads its upload until its job has left the worker, so `capacity`
    bounds the uploads held in memory as well as the jobs waiting. Retry-After (`retry_after`) is computed from what
    holds the slots: a job frees its slot after about a job's time, an upload at the latest at its deadline (the body
    timeout), so slow uploads that hold every slot are not answered "retry in 1 s". After each job the memory freed
    is given back to the system (`return_freed_memory`): a 40 MP upload's buffers no longer stay in the process.
    """

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        self.capacity = capacity
        self.in_use = 0
        self.done = 0
        self.skipped = 0  # jobs whose client left before they started: never run
        self._mean_seconds = 1.0  # running mean of job durations, for Retry-After
        self._slots: set[Slot] = set()
        self._lock = threading.Lock()
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="vip2clip-predict")

    def retry_after(self) -> int:
        """Whole seconds until a slot is likely free (at least 1): a job's mean time when a slot holds a job, else
        the time to the earliest upload deadline (an upload that stalls is refused then, and its slot freed)."""
        now = time.monotonic()
        deadlines = [slot.upload_deadline - now for slot in self._slots if slot.upload_deadline is not None]
        jobs = len(self._slots) - len(deadlines)
        soonest = min([self._mean_seconds] * bool(jobs) + [max(0.0, d) for d in deadlines], default=self._mean_seconds)
        return max(1, math.ceil(soonest))

    @contextmanager
    def slot(self) -> Iterator[Slot]:
        """Hold one of the `capacity` slots; QueueFull at once when none is free. The caller marks the slot's upload
        (`Slot.uploading`) while it reads one."""
        held = Slot()
        with self._lock:
            if self.in_use >= self.capacity:
                raise QueueFull(self.capacity, self.retry_after())
            self.in_use += 1
            self._slots.add(held)
        try:
            yield held
        finally:
            with self._lock:
                self.in_use -= 1
                self._slots.discard(held)

    async def run(self, job: Callable[[], T], client_gone: Callable[[], Awaitable[Any]]) -> T | None:
        """Run `job` on the worker thread and return its result (its exception is raised here).

        `client_gone` completes when the client disconnects: a job still waiting then is dropped (None is returned),
        one already running is waited for, so that the caller's slot stays taken while the worker is busy with it.
        """
        future = self._worker.submit(self._timed, job)
        result = asyncio.wrap_future(future)
        gone = asyncio.ensure_future(client_gone())
        try:
            await asyncio.wait({result, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
        if not result.done() and future.cancel():
            self.skipped += 1
            return None
        return await result

    def _timed(self, job: Callable[[], T]) -> T:
        start = time.perf_counter()
        try:
            return job()
        finally:
            self._mean_seconds = 0.8 * self._mean_seconds + 0.2 * (time.perf_counter() - start)
            self.done += 1
            return_freed_memory()  # the job's image buffers, before the next job

    def close(self) -> None:
        """Drop waiting jobs; the running one finishes on its thread."""
        self._worker.shutdown(wait=False, cancel_futures=True)


@dataclass(frozen=True)
class Example:
    name: str
    label: str
    png: bytes


def synthetic_examples(size: int = 128, seed: int = 7) -> list[Example]:
    """A normal image and two defective ones from the synthetic benchmark, generated in a temporary folder."""
    from vip2clip.data.synthetic import generate_benchmark

    with tempfile.TemporaryDirectory(prefix="vip2clip-serve-") as folder:
        index = generate_benchmark(folder, classes=1, seed=seed, image_size=size, n_test_good=1, n_test_defect=2)
        examples = []
        samples = [sample for class_samples in index.splits["test"].values() for sample in class_samples]
        for sample in samples:
            label = "normal" if sample.anomaly == 0 else f"defect ({sample.specie_name})"
            png = (index.root / sample.img_path).read_bytes()
            examples.append(Example(f"example-{len(examples) + 1}", label, png))
    return examples


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def data_url(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def colour_bar_png(width: int = 256) -> bytes:
    """The overlays' fixed colour scale as a width x 1 PNG, horizontal: MAP_LOW (left) to MAP_HIGH (right)."""
    return png_bytes(colour_bar(1, width).transpose(Image.Transpose.ROTATE_270))


def _display_size(size: tuple[int, int]) -> tuple[int, int]:
    scale = min(1.0, DISPLAY_SIDE / max(size))
    return max(1, round(size[0] * scale)), max(1, round(size[1] * scale))


def encode_map(anomaly_map: np.ndarray, size: tuple[int, int]) -> Image.Image:
    """Map [H, W] in [0, 1] -> RGB image of `size` (width, height): R, G = high, low byte of round(value x 65535).

    The page decodes it in a canvas and re-thresholds it when a slider moves, without 8-bit rounding."""
    levels = np.rint(np.clip(resize_map(anomaly_map, size), 0.0, 1.0) * 65535).astype(np.uint32)
    rgb = np.stack([levels >> 8, levels & 255, np.zeros_like(levels)], axis=-1).astype(np.uint8)
    return Image.fromarray(rgb, mode="RGB")


def prediction_payload(predictor: Predictor, image: Image.Image, *, images: bool = False) -> dict[str, Any]:
    """Score, decision and thresholds of one RGB image; with `images`, the display PNGs as data URLs, at most
    DISPLAY_SIDE pixels: input, overlay (fixed 0..1 scale), encoded map, and the mask of the display-size map at the
    pixel threshold (the page's). ModelOutputError for a NaN or infinite output (fail closed)."""
    result = predictor.predict(image)[0]
    if not result.is_judged:  # the Predictor's fail-closed verdict (`make_result`), reported as a server error
        raise ModelOutputError(
            "the model's score for this image is not a number (NaN or infinite): no decision is possible; "
            f"check the checkpoint ({result.error})"
        )
    thresholds = predictor.thresholds
    payload: dict[str, Any] = {
        "pred_score": result.pred_score,
        "pred_label": result.verdict,  # the API's word ("normal" / "anomalous"), not the boolean
        "max_pixel_score": result.max_pixel_score,
        "defect_area": result.defect_area,
        "width": image.width,
        "height": image.height,
        "image_threshold": result.image_threshold,
        "pixel_threshold": result.pixel_threshold,
        "threshold_source": thresholds.source,
        "images": None,
    }
    if images:
        shown = image.resize(_display_size(image.size), Image.BILINEAR)
        shown_map = resize_map(result.anomaly_map, shown.size)  # small before any arithmetic on it (memory)
        mask = np.where(shown_map >= result.pixel_threshold, 255, 0).astype(np.uint8)  # as the page draws it
        payload["images"] = {
            "input": data_url(png_bytes(shown)),
            "overlay": data_url(png_bytes(heatmap_overlay(shown, shown_map))),  # the fixed scale
            "map": data_url(png_bytes(encode_map(shown_map, shown.size))),
            "mask": data_url(png_bytes(Image.fromarray(mask))),
        }
    return payload


def predict_upload(predictor: Predictor, data: bytes, *, max_pixels: int, images: bool = False) -> dict[str, Any]:
    """Decode uploaded bytes (BadImageError / TooManyPixelsError) and predict: the job one request runs."""
    return prediction_payload(predictor, decode_image_bytes(data, max_pixels), images=images)
