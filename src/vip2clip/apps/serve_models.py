"""The JSON contract of `vip2clip serve`: pydantic response models, the request body of `POST /api/predict` and the
error answers, as `/openapi.json` documents them (the routes are in `vip2clip.apps.serve`)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import Query
from pydantic import BaseModel, Field

ImagesFlag = Annotated[bool, Query(description="add the display PNGs (data URLs) that the page draws")]
ExampleName = Annotated[str, Query(description="an example's name from /api/examples")]


class ErrorResponse(BaseModel):
    error: str = Field(description="what went wrong, for a person to read")


class DisplayImages(BaseModel):
    """PNG data URLs at most 768 pixels wide or high, for display only."""

    input: str = Field(description="the image as decoded (EXIF orientation applied)")
    overlay: str = Field(description="the anomaly map as a heat map over the image, fixed scale: blue 0, red 1")
    map: str = Field(description="the anomaly map as 16 bits: red = high byte, green = low byte of value x 65535")
    mask: str = Field(description="the defect mask at the pixel threshold (white = defect)")


class PredictResponse(BaseModel):
    pred_score: float = Field(description="image anomaly probability in [0, 1]")
    pred_label: Literal["normal", "anomalous"] = Field(description="anomalous when pred_score >= image_threshold")
    max_pixel_score: float = Field(description="largest value of the anomaly map, in [0, 1]")
    defect_area: float = Field(description="fraction of the image's pixels at or above pixel_threshold")
    width: int = Field(description="image width in pixels (as displayed: EXIF orientation applied)")
    height: int = Field(description="image height in pixels")
    image_threshold: float
    pixel_threshold: float
    threshold_source: str = Field(description="where the thresholds come from (calibration file, flags, default)")
    images: DisplayImages | None = Field(None, description="display PNGs, only with ?images=true")


class ComputationInfo(BaseModel):
    engine: str = Field(description="torch, onnxruntime or openvino")
    precision: str = Field(description="what the model computes in (what --precision auto chose)")
    why: str = Field(description="why that precision")


class ModelInfo(BaseModel):
    backbone: str
    weights: str = Field(description="where the CLIP backbone's weights come from")
    random_weights: bool = Field(description="true when the backbone has random weights: scores mean nothing")
    checkpoint: str | None = Field(description="file name of the trained checkpoint")
    checkpoint_sha256: str | None
    image_size: int
    computation: ComputationInfo = Field(description="what computes the scores: other precisions give other numbers")


class LimitsInfo(BaseModel):
    max_upload_bytes: int
    max_pixels: int
    max_queue: int
    body_timeout_s: float


class QueueInfo(BaseModel):
    in_use: int = Field(description="requests admitted now (uploading, waiting or running)")
    done: int = Field(description="jobs run since start")
    skipped: int = Field(description="jobs dropped because their client left before they ran")


class Info(BaseModel):
    version: str
    model: ModelInfo
    image_threshold: float
    pixel_threshold: float
    threshold_source: str
    limits: LimitsInfo
    queue: QueueInfo


class ExampleInfo(BaseModel):
    name: str
    label: str
    thumbnail: str = Field(description="PNG data URL")


IMAGE_BODY = {"schema": {"type": "string", "format": "binary"}}
PREDICT_BODY = {
    "required": True,
    "description": "the image file's bytes (PNG, JPEG, BMP, TIFF, WebP ...) as the body, or one file field "
    "(any name, e.g. `file`) of a multipart/form-data upload",
    "content": {
        "image/*": IMAGE_BODY,
        "application/octet-stream": IMAGE_BODY,
        "multipart/form-data": {
            "schema": {
                "type": "object",
                "properties": {"file": {"type": "string", "format": "binary"}},
                "required": ["file"],
            }
        },
    },
}


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    described = {
        400: "not an image, damaged, empty, or a malformed upload",
        404: "no such example",
        408: "the request body did not arrive within the body timeout",
        413: "the upload is larger than the byte limit, or the image larger than the pixel limit",
        415: "Content-Type is none of image/*, application/octet-stream, multipart/form-data",
        422: "invalid query parameter",
        500: "the model gave no usable output (NaN/inf) or failed",
        503: "the queue is full: retry after the Retry-After header's seconds",
    }
    return {status: {"model": ErrorResponse, "description": described[status]} for status in statuses}
