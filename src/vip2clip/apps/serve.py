"""`vip2clip serve`: the prediction API and its browser page, a FastAPI app served by uvicorn.

Routes: `GET /` the page (package data `serve_page.html`), `GET /api/info` model, thresholds and limits,
`GET /api/examples` the bundled synthetic examples, `POST /api/example?name=...` and `POST /api/predict` a
prediction (JSON; `?images=true` adds the display PNGs the page draws). OpenAPI at `/openapi.json` and `/docs`
(Swagger UI served from the fastapi-offline package's files, so it works without internet; `/redoc` too).
`POST /api/predict` takes the image as the raw request body (`Content-Type: image/*` or
`application/octet-stream`) or as the one file of a `multipart/form-data` upload.

Limits (`ServeLimits`): Content-Length is checked before the body is read and the bytes are counted while they
arrive (chunked bodies), so nothing above `max_upload_bytes` is held (413); a body must arrive within `body_timeout`
(408) and request headers within `header_timeout` (else the connection is closed); images above `max_pixels` are
refused from their header (413); at most `max_queue` requests are admitted at once (uploading, waiting or running)
and the rest get 503 with Retry-After; decoding and prediction run one at a time on a worker thread
(`serve_jobs.JobQueue`), off the event loop. Clients that leave are dropped quietly (a job still waiting is
skipped). Every error is JSON `{"error": "..."}`.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
from importlib import resources
from pathlib import Path
from typing import Any

import anyio
from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from fastapi_offline import FastAPIOffline
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect

from vip2clip import __version__
from vip2clip.apps.serve_jobs import (
    Example,
    JobQueue,
    ModelOutputError,
    QueueFull,
    ServeLimits,
    colour_bar_png,
    data_url,
    predict_upload,
    synthetic_examples,
)
from vip2clip.apps.serve_models import (
    PREDICT_BODY,
    ExampleInfo,
    ExampleName,
    ImagesFlag,
    Info,
    LimitsInfo,
    ModelInfo,
    PredictResponse,
    QueueInfo,
    error_responses,
)
from vip2clip.data.images import BadImageError, TooManyPixelsError
from vip2clip.inference.predictor import Predictor

logger = logging.getLogger(__name__)


class ApiError(Exception):
    """An answer `{"error": message}` with an HTTP status (and headers, e.g. Retry-After)."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers or {}


def page_html() -> str:
    """The page (package data `serve_page.html`): it reads /api/info and /api/examples, posts uploads to
    /api/predict?images=true and re-thresholds the 16-bit map of `encode_map` in a canvas when a slider moves."""
    return resources.files(__package__).joinpath("serve_page.html").read_text(encoding="utf-8")


def _upload_kind(content_type: str | None) -> str:
    """'raw' or 'multipart' for an accepted Content-Type; ApiError 415 otherwise."""
    media = (content_type or "").split(";")[0].strip().lower()
    if media == "multipart/form-data":
        return "multipart"
    if media in ("", "application/octet-stream") or media.startswith("image/"):
        return "raw"
    raise ApiError(
        415,
        f"Content-Type {media} is not accepted: send the image's bytes with Content-Type image/* or "
        "application/octet-stream (curl --data-binary @part.png -H 'Content-Type: image/png'), or as a "
        "multipart/form-data file (curl -F file=@part.png)",
    )


def _too_large(limit: int, size: int | None = None) -> ApiError:
    limit_mb = f"{limit / 1024 / 1024:.1f} MB"
    if size is None:
        return ApiError(413, f"the upload is larger than the limit of {limit_mb} (reading stopped there)")
    return ApiError(413, f"the upload is {size / 1024 / 1024:.1f} MB; the limit is {limit_mb}")


async def read_body(request: Request, limits: ServeLimits) -> bytes:
    """The request body, refused (413) as soon as it is known to exceed the limit: from Content-Length before
    reading, else by counting the bytes as they arrive. 408 (and the connection closed) when it takes longer than
    `body_timeout`. ClientDisconnect when the client leaves."""
    limit = limits.max_upload_bytes
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > limit:
        raise _too_large(limit, int(length))
    body = bytearray()
    try:
        with anyio.fail_after(limits.body_timeout):
            async for chunk in request.stream():
                body += chunk
                if len(body) > limit:
                    raise _too_large(limit)
    except TimeoutError:
        message = f"the upload did not arrive within {limits.body_timeout:g} s ({len(body)} bytes received)"
        raise ApiError(408, message, {"Connection": "close"}) from None
    return bytes(body)


async def _multipart_file(request: Request, body: bytes) -> bytes:
    """The one file of a multipart/form-data body (already read and bounded)."""

    async def replay() -> dict[str, Any]:
        return {"type": "http.request", "body": body, "more_body": False}

    boundary = request.headers.get("content-type", "").partition("boundary=")[2].split(";")[0].strip().strip('"')
    if boundary and f"--{boundary}--".encode() not in body:
        missing = f"its closing boundary --{boundary}-- is missing (the upload was cut short, or the form unfinished)"
        raise ApiError(400, f"incomplete multipart body: {missing}")
    async with Request(request.scope, replay).form(max_files=1, max_fields=16) as form:
        files = [value for _, value in form.multi_items() if isinstance(value, UploadFile)]
        if not files:
            raise ApiError(400, "the multipart upload holds no file: send the image as a file field (-F file=@x.png)")
        return await files[0].read()


async def _wait_for_disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass  # an unread body (/api/example): discarded


def create_app(predictor: Predictor, limits: ServeLimits | None = None, examples: list[Example] | None = None):
    """The FastAPI app of `vip2clip serve` for `predictor` (its `jobs` queue is on `app.state.jobs`)."""
    limits = limits or ServeLimits()
    examples_by_name = {e.name: e for e in (synthetic_examples() if examples is None else examples)}
    jobs = JobQueue(limits.max_queue)
    identity = predictor.identity
    weights = identity.weights or "unknown"
    model = ModelInfo(
        backbone=identity.backbone,
        weights=weights,
        random_weights=weights.startswith("random"),
        checkpoint=Path(identity.checkpoint).name if identity.checkpoint else None,
        checkpoint_sha256=identity.checkpoint_sha256,
        image_size=identity.image_size,
    )
    app = FastAPIOffline(  # /docs with Swagger UI's files from the fastapi-offline package: no CDN, works offline
        title="vip2clip",
        version=__version__,
        description="Zero-shot anomaly detection (ViP²-CLIP): score an image, get its decision and defect area.",
    )
    app.state.jobs = jobs
    no_store = {"Cache-Control": "no-store"}

    @app.exception_handler(ApiError)
    async def api_error(request: Request, error: ApiError) -> JSONResponse:
        return JSONResponse({"error": error.message}, error.status, headers={**no_store, **error.headers})

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, error: HTTPException) -> JSONResponse:
        detail = error.detail if isinstance(error.detail, str) else str(error.detail)
        if error.status_code == 404:
            detail = f"no such page: {request.url.path}"
        return JSONResponse({"error": detail}, error.status_code, headers=error.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, error: RequestValidationError) -> JSONResponse:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in error.errors())
        return JSONResponse({"error": f"invalid request: {problems}"}, 422)

    @app.exception_handler(ClientDisconnect)
    async def client_left(request: Request, error: ClientDisconnect) -> Response:
        logger.debug("client left during its upload: %s", request.url.path)
        return Response(status_code=400)  # never delivered

    @app.exception_handler(QueueFull)
    async def busy(request: Request, error: QueueFull) -> JSONResponse:
        headers = {**no_store, "Retry-After": str(error.retry_after)}
        return JSONResponse({"error": str(error)}, 503, headers=headers)

    async def answer(request: Request, response: Response, data: bytes, images: bool) -> Any:
        """Run the job of one admitted request; the payload, or a never-delivered answer if the client left."""
        try:
            payload = await jobs.run(
                lambda: predict_upload(predictor, data, limits.max_pixels, images),
                lambda: _wait_for_disconnect(request),
            )
        except TooManyPixelsError as error:
            raise ApiError(413, str(error)) from None
        except BadImageError as error:
            raise ApiError(400, str(error)) from None
        except ModelOutputError as error:
            logger.warning("%s", error)
            raise ApiError(500, str(error)) from None
        except Exception:
            logger.exception("prediction failed")
            raise ApiError(500, "prediction failed on the server (see its log)") from None
        if payload is None:
            logger.debug("client left before its job ran: skipped")
            return Response(status_code=499)  # never delivered (nginx's "client closed request")
        response.headers.update(no_store)
        return payload

    @app.post(
        "/api/predict",
        response_model=PredictResponse,
        responses=error_responses(400, 408, 413, 415, 422, 500, 503),
        openapi_extra={"requestBody": PREDICT_BODY},
        summary="Score one image",
    )
    async def predict(request: Request, response: Response, images: ImagesFlag = False) -> Any:
        """The image's anomaly score, decision, largest pixel score and defect area at the server's thresholds.

        Send the image's bytes as the body (`Content-Type: image/png`, `image/jpeg`, ... or
        `application/octet-stream`), or as the one file of a `multipart/form-data` upload."""
        kind = _upload_kind(request.headers.get("content-type"))
        with jobs.slot() as slot:
            with slot.uploading(limits.body_timeout):  # for Retry-After: this slot frees by the upload's deadline
                data = await read_body(request, limits)
            if kind == "multipart":
                data = await _multipart_file(request, data)
            return await answer(request, response, data, images)

    @app.post(
        "/api/example",
        response_model=PredictResponse,
        responses=error_responses(404, 422, 500, 503),
        summary="Score a bundled example",
    )
    async def example(request: Request, response: Response, name: ExampleName, images: ImagesFlag = False) -> Any:
        if name not in examples_by_name:
            raise ApiError(404, f"no example named {name!r}")
        with jobs.slot():
            return await answer(request, response, examples_by_name[name].png, images)

    @app.get("/api/examples", response_model=list[ExampleInfo], summary="The bundled synthetic examples")
    async def list_examples() -> Any:
        return [ExampleInfo(name=e.name, label=e.label, thumbnail=data_url(e.png)) for e in examples_by_name.values()]

    @app.get("/api/info", response_model=Info, summary="Model, thresholds, limits and queue")
    async def info() -> Any:
        thresholds = predictor.thresholds
        return Info(
            version=__version__,
            model=model,
            image_threshold=thresholds.image,
            pixel_threshold=thresholds.pixel,
            threshold_source=thresholds.source,
            limits=LimitsInfo(
                max_upload_bytes=limits.max_upload_bytes,
                max_pixels=limits.max_pixels,
                max_queue=limits.max_queue,
                body_timeout_s=limits.body_timeout,
            ),
            queue=QueueInfo(in_use=jobs.in_use, done=jobs.done, skipped=jobs.skipped),
        )

    colour_bar = colour_bar_png()

    @app.get("/colour-bar.png", include_in_schema=False)
    async def colour_bar_image() -> Response:
        return Response(colour_bar, media_type="image/png")

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page() -> HTMLResponse:
        return HTMLResponse(page_html(), headers=no_store)

    return app


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def listen(host: str = "127.0.0.1", port: int = 7860) -> socket.socket:
    """A listening TCP socket (port 0 picks a free port); ValueError naming the address when that fails.

    Bound before the model loads, so a taken port is reported at once. Warns for a non-loopback address.
    """
    if not 0 <= port <= 65535:
        raise ValueError(f"port must be in 0..65535 (0 picks a free port), got {port}")
    try:
        family, _, _, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except OSError as error:
        raise ValueError(f"cannot listen on {host}:{port}: {error.strerror or error}") from None
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(128)
    except OSError as error:
        sock.close()
        raise ValueError(f"cannot listen on {host}:{port}: {error.strerror or error}") from None
    if not is_loopback(host):
        logger.warning("binding %s: the server is reachable from other machines and has no authentication", host)
    return sock


def _protocol_with_header_timeout(seconds: float) -> type:
    """uvicorn's h11 protocol, also closing a connection whose request headers are not complete `seconds` after it
    opened or after its previous answer: uvicorn times out idle kept-alive connections and we time out bodies, but
    nothing else stops a client that trickles its headers (slowloris) from holding a connection forever."""
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class Protocol(H11Protocol):
        _armed = 0  # generation of the latest timer: an older timer has nothing left to check

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._arm()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._arm()

        def _arm(self) -> None:
            self._armed += 1
            self.loop.call_later(seconds, self._expire, self._armed)

        def _expire(self, armed: int) -> None:
            if armed == self._armed and self.conn.their_state is h11.IDLE and not self.transport.is_closing():
                self.transport.close()

    return Protocol


def make_server(predictor: Predictor, limits: ServeLimits | None = None, examples: list[Example] | None = None):
    """A uvicorn.Server for the app (not yet running: `server.run(sockets=[listen(...)])`)."""
    import uvicorn

    limits = limits or ServeLimits()
    config = uvicorn.Config(
        create_app(predictor, limits, examples),
        http=_protocol_with_header_timeout(limits.header_timeout),
        log_config=None,  # uvicorn's records go through the CLI's logging set-up
        timeout_keep_alive=limits.keep_alive_timeout,  # type: ignore[arg-type]  (a float works)
        timeout_graceful_shutdown=5,
        limit_concurrency=max(256, 4 * limits.max_queue),  # connections beyond this get uvicorn's plain-text 503
        server_header=False,
    )
    if logging.getLogger().level > logging.DEBUG:
        logging.getLogger("uvicorn.error").setLevel(logging.WARNING)  # its start/stop chatter; warnings stay
    return uvicorn.Server(config)


def serve(
    predictor: Predictor,
    sock: socket.socket,
    limits: ServeLimits | None = None,
    examples: list[Example] | None = None,
) -> None:
    """Serve on the listening `sock` (see `listen`) until SIGINT/SIGTERM; prints the URL first."""
    server = make_server(predictor, limits, examples)
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    print(
        f"serving the vip2clip demo on http://{shown}:{port}/ (API docs: /docs, schema: /openapi.json; Ctrl+C stops)",
        flush=True,
    )
    try:
        server.run(sockets=[sock])
    finally:
        server.config.app.state.jobs.close()
        sock.close()
