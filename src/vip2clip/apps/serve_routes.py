"""The routes of `vip2clip serve` (see `vip2clip.apps.serve`): reading uploads, the error answers, and one handler
per route at module level, each reading what it shares with the others (`ServeState`: predictor, limits, job queue,
examples, model description) from `request.app.state.serve`, so that a handler can be called and tested alone."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import anyio
from fastapi import APIRouter, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
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
    ComputationInfo,
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

NO_STORE = {"Cache-Control": "no-store"}
router = APIRouter()


class ApiError(Exception):
    """An answer `{"error": message}` with an HTTP status (and headers, e.g. Retry-After)."""

    def __init__(self, status: int, message: str, *, headers: dict[str, str] | None = None) -> None:
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
        raise ApiError(408, message, headers={"Connection": "close"}) from None
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


@dataclass(kw_only=True)
class ServeState:
    """What the routes share: the predictor, the limits, the job queue, the examples by name, the model's
    description and the colour bar's PNG."""

    predictor: Predictor
    limits: ServeLimits
    jobs: JobQueue
    examples: dict[str, Example]
    model: ModelInfo
    colour_bar: bytes

    @classmethod
    def of(cls, predictor: Predictor, *, limits: ServeLimits | None = None, examples: list[Example] | None = None):
        """The state of a server for `predictor` (default limits; the synthetic examples unless `examples`)."""
        limits = limits or ServeLimits()
        identity = predictor.identity.model
        weights = identity.weights or "unknown"
        model = ModelInfo(
            backbone=identity.backbone,
            weights=weights,
            random_weights=weights.startswith("random"),
            checkpoint=Path(identity.checkpoint).name if identity.checkpoint else None,
            checkpoint_sha256=identity.checkpoint_sha256,
            image_size=identity.image_size,
            computation=ComputationInfo(**predictor.computation),
        )
        shown = synthetic_examples() if examples is None else examples
        return cls(
            predictor=predictor,
            limits=limits,
            jobs=JobQueue(limits.max_queue),
            examples={e.name: e for e in shown},
            model=model,
            colour_bar=colour_bar_png(),
        )


def state_of(request: Request) -> ServeState:
    return request.app.state.serve


async def api_error(request: Request, error: ApiError) -> JSONResponse:
    return JSONResponse({"error": error.message}, error.status, headers={**NO_STORE, **error.headers})


async def http_error(request: Request, error: HTTPException) -> JSONResponse:
    detail = error.detail if isinstance(error.detail, str) else str(error.detail)
    if error.status_code == 404:
        detail = f"no such page: {request.url.path}"
    return JSONResponse({"error": detail}, error.status_code, headers=error.headers)


async def invalid_request(request: Request, error: RequestValidationError) -> JSONResponse:
    problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in error.errors())
    return JSONResponse({"error": f"invalid request: {problems}"}, 422)


async def client_left(request: Request, error: ClientDisconnect) -> Response:
    logger.debug("client left during its upload: %s", request.url.path)
    return Response(status_code=400)  # never delivered


async def busy(request: Request, error: QueueFull) -> JSONResponse:
    headers = {**NO_STORE, "Retry-After": str(error.retry_after)}
    return JSONResponse({"error": str(error)}, 503, headers=headers)


# Every error is JSON {"error": "..."}: the handler of each kind of exception.
EXCEPTION_HANDLERS = (
    (ApiError, api_error),
    (HTTPException, http_error),
    (RequestValidationError, invalid_request),
    (ClientDisconnect, client_left),
    (QueueFull, busy),
)


async def answer(request: Request, response: Response, *, data: bytes, images: bool) -> Any:
    """Run the job of one admitted request; the payload, or a never-delivered answer if the client left."""
    state = state_of(request)
    try:
        payload = await state.jobs.run(
            lambda: predict_upload(state.predictor, data, max_pixels=state.limits.max_pixels, images=images),
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
    response.headers.update(NO_STORE)
    return payload


@router.post(
    "/api/predict",
    response_model=PredictResponse,
    responses=error_responses(400, 408, 413, 415, 422, 500, 503),
    openapi_extra={"requestBody": PREDICT_BODY},
    summary="Score one image",
)
async def predict(request: Request, response: Response, *, images: ImagesFlag = False) -> Any:
    """The image's anomaly score, decision, largest pixel score and defect area at the server's thresholds.

    Send the image's bytes as the body (`Content-Type: image/png`, `image/jpeg`, ... or
    `application/octet-stream`), or as the one file of a `multipart/form-data` upload."""
    state = state_of(request)
    kind = _upload_kind(request.headers.get("content-type"))
    with state.jobs.slot() as slot:
        with slot.uploading(state.limits.body_timeout):  # for Retry-After: this slot frees by the upload's deadline
            data = await read_body(request, state.limits)
        if kind == "multipart":
            data = await _multipart_file(request, data)
        return await answer(request, response, data=data, images=images)


@router.post(
    "/api/example",
    response_model=PredictResponse,
    responses=error_responses(404, 422, 500, 503),
    summary="Score a bundled example",
)
async def example(request: Request, response: Response, *, name: ExampleName, images: ImagesFlag = False) -> Any:
    state = state_of(request)
    if name not in state.examples:
        raise ApiError(404, f"no example named {name!r}")
    with state.jobs.slot():
        return await answer(request, response, data=state.examples[name].png, images=images)


@router.get("/api/examples", response_model=list[ExampleInfo], summary="The bundled synthetic examples")
async def list_examples(request: Request) -> Any:
    examples = state_of(request).examples.values()
    return [ExampleInfo(name=e.name, label=e.label, thumbnail=data_url(e.png)) for e in examples]


@router.get("/api/info", response_model=Info, summary="Model, thresholds, limits and queue")
async def info(request: Request) -> Any:
    state = state_of(request)
    thresholds, limits, jobs = state.predictor.thresholds, state.limits, state.jobs
    return Info(
        version=__version__,
        model=state.model,
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


@router.get("/colour-bar.png", include_in_schema=False)
async def colour_bar_image(request: Request) -> Response:
    return Response(state_of(request).colour_bar, media_type="image/png")


@router.get("/", response_class=HTMLResponse, include_in_schema=False)
async def page() -> HTMLResponse:
    return HTMLResponse(page_html(), headers=NO_STORE)
