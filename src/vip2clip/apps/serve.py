"""`vip2clip serve`: a one-page browser demo on the standard library's http.server (no extra dependency).

The page uploads an image (or picks a bundled synthetic example, generated at start-up) to `POST /api/predict`
and shows the score, the decision, the heat-map overlay and the defect mask. The anomaly map travels as a PNG holding
round(value x 65535) in its red (high byte) and green (low byte) channels, so moving the threshold sliders
re-draws the mask and the decision in the browser, without another request and without 8-bit rounding.

Safety: binds 127.0.0.1 unless told otherwise (a warning is logged for any other address), refuses uploads
above `max_upload_bytes` (HTTP 413) and images above `MAX_PIXELS` before decoding them, and answers anything
that is not a readable image with HTTP 400 and a message. Predictions are serialised with a lock.
"""

from __future__ import annotations

import base64
import io
import ipaddress
import json
import logging
import tempfile
import threading
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from typing import Any
from urllib.parse import parse_qs, urlparse

import numpy as np
from PIL import Image

from vip2clip.data.images import BadImageError, decode_image_bytes
from vip2clip.data.transforms import resize_map
from vip2clip.inference.predictor import Predictor
from vip2clip.visualization.heatmap import heatmap_overlay

logger = logging.getLogger(__name__)

MAX_PIXELS = 40_000_000  # ~ 7700 x 5200: larger uploads are refused before decoding (memory)
DISPLAY_SIDE = 768  # images are shown (not scored) at most this large


class UploadError(ValueError):
    """A bad upload: the message is shown to the user; `status` is the HTTP status."""

    def __init__(self, message: str, status: HTTPStatus = HTTPStatus.BAD_REQUEST) -> None:
        super().__init__(message)
        self.status = status


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


def decode_upload(data: bytes, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Upload bytes -> RGB PIL image (`vip2clip.data.images`); UploadError (400) for anything unusable."""
    try:
        return decode_image_bytes(data, max_pixels)
    except BadImageError as error:
        raise UploadError(str(error)) from None


def page_html() -> str:
    """The demo page (package data `serve_page.html`): it decodes the 16-bit map of `encode_map` in a canvas and
    re-thresholds it when a slider moves, so mask and decision follow the sliders without a new request."""
    return resources.files(__package__).joinpath("serve_page.html").read_text(encoding="utf-8")


def _bytes_data_url(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def _png_data_url(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return _bytes_data_url(buffer.getvalue())


def _display_size(size: tuple[int, int]) -> tuple[int, int]:
    scale = min(1.0, DISPLAY_SIDE / max(size))
    return max(1, round(size[0] * scale)), max(1, round(size[1] * scale))


def encode_map(anomaly_map: np.ndarray, size: tuple[int, int]) -> Image.Image:
    """Map [H, W] in [0, 1] -> RGB image of `size` (width, height): R, G = high, low byte of round(value x 65535)."""
    levels = np.rint(np.clip(resize_map(anomaly_map, size), 0.0, 1.0) * 65535).astype(np.uint32)
    rgb = np.stack([levels >> 8, levels & 255, np.zeros_like(levels)], axis=-1).astype(np.uint8)
    return Image.fromarray(rgb, mode="RGB")


def prediction_payload(predictor: Predictor, image: Image.Image) -> dict[str, Any]:
    """Score, decision and display PNGs (input, overlay, encoded map, mask) for one RGB image."""
    result = predictor.predict(image)[0]
    shown = image.resize(_display_size(image.size), Image.BILINEAR)
    mask = np.where(result.pred_mask, 255, 0).astype(np.uint8)
    return {
        "pred_score": result.pred_score,
        "pred_label": result.pred_label,
        "image_threshold": result.image_threshold,
        "pixel_threshold": result.pixel_threshold,
        "max_pixel_score": result.max_pixel_score,
        "defect_area": result.defect_area,
        "width": image.width,
        "height": image.height,
        "image": _png_data_url(shown),
        "overlay": _png_data_url(heatmap_overlay(shown, result.anomaly_map, 0.0, 1.0)),
        "map": _png_data_url(encode_map(result.anomaly_map, shown.size)),
        "mask": _png_data_url(Image.fromarray(mask, mode="L").resize(shown.size, Image.NEAREST)),
    }


class DemoServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], predictor: Predictor, max_upload_bytes: int, examples: list[Example]):
        super().__init__(address, DemoHandler)
        self.predictor = predictor
        self.max_upload_bytes = max_upload_bytes
        self.examples = {example.name: example for example in examples}
        self.lock = threading.Lock()

    def predict(self, image: Image.Image) -> dict[str, Any]:
        with self.lock:
            return prediction_payload(self.predictor, image)


class DemoHandler(BaseHTTPRequestHandler):
    server: DemoServer
    server_version = "vip2clip"

    def log_message(self, format: str, *args: Any) -> None:
        logger.debug("%s " + format, self.address_string(), *args)

    def _send(self, status: HTTPStatus, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(body)

    def _send_json(self, payload: Any, status: HTTPStatus = HTTPStatus.OK) -> None:
        self._send(status, json.dumps(payload).encode(), "application/json")

    def do_GET(self) -> None:
        route = urlparse(self.path).path
        if route == "/":
            page = page_html().replace("__MAX_BYTES__", str(self.server.max_upload_bytes))
            self._send(HTTPStatus.OK, page.encode(), "text/html; charset=utf-8")
        elif route == "/api/examples":
            examples = self.server.examples.values()
            self._send_json([{"name": e.name, "label": e.label, "thumbnail": _bytes_data_url(e.png)} for e in examples])
        else:
            self._send_json({"error": f"no such page: {route}"}, HTTPStatus.NOT_FOUND)

    def do_POST(self) -> None:
        url = urlparse(self.path)
        try:
            if url.path == "/api/predict":
                image = decode_upload(self._read_body())
            elif url.path == "/api/example":
                image = self._example(parse_qs(url.query).get("name", [""])[0])
            else:
                raise UploadError(f"no such endpoint: {url.path}", HTTPStatus.NOT_FOUND)
            self._send_json(self.server.predict(image))
        except UploadError as error:
            self._send_json({"error": str(error)}, error.status)
        except Exception:
            logger.exception("prediction failed")
            self._send_json(
                {"error": "prediction failed on the server (see its log)"}, HTTPStatus.INTERNAL_SERVER_ERROR
            )

    def _read_body(self) -> bytes:
        length = self.headers.get("Content-Length")
        if length is None or not length.isdigit():
            raise UploadError("the upload has no Content-Length", HTTPStatus.LENGTH_REQUIRED)
        if int(length) > self.server.max_upload_bytes:
            self.close_connection = True  # the unread body must not be parsed as the next request
            limit = self.server.max_upload_bytes / 1024 / 1024
            raise UploadError(
                f"the upload is {int(length) / 1024 / 1024:.1f} MB; the limit is {limit:.1f} MB",
                HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
            )
        return self.rfile.read(int(length))

    def _example(self, name: str) -> Image.Image:
        if name not in self.server.examples:
            raise UploadError(f"no example named {name!r}", HTTPStatus.NOT_FOUND)
        return decode_upload(self.server.examples[name].png)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def make_server(
    predictor: Predictor,
    host: str = "127.0.0.1",
    port: int = 7860,
    max_upload_bytes: int = 10 * 1024 * 1024,
    examples: list[Example] | None = None,
) -> DemoServer:
    """A ready (not yet serving) demo server; port 0 picks a free port (see `server.server_address`)."""
    if not is_loopback(host):
        logger.warning("binding %s: the demo is reachable from other machines and has no authentication", host)
    examples = synthetic_examples() if examples is None else examples
    return DemoServer((host, port), predictor, max_upload_bytes, examples)


def serve(predictor: Predictor, host: str = "127.0.0.1", port: int = 7860, max_upload_bytes: int = 10 << 20) -> None:
    """Serve until interrupted; prints the URL once the socket is listening."""
    try:
        server = make_server(predictor, host, port, max_upload_bytes)
    except OSError as error:
        raise ValueError(f"cannot listen on {host}:{port}: {error}") from error
    bound_host, bound_port = server.server_address[:2]
    print(f"serving the vip2clip demo on http://{bound_host}:{bound_port}/ (Ctrl+C stops)", flush=True)
    try:
        server.serve_forever()
    finally:
        server.server_close()
