"""The request and response bodies of the HTTP API as pydantic models (FastAPI validates requests against them and
publishes them in the OpenAPI schema at /openapi.json)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SegmentRequest(_Request):
    """`POST /v1/segment`: one image (uploaded or inline), an adapter, and prompts in original pixels."""

    image_id: str | None = Field(None, description="An id from POST /v1/images.")
    image: str | None = Field(None, description="The image file in base64 (a data: URL prefix is allowed).")
    adapter: str | None = Field(None, description="A loaded adapter's name; null for the base model.")
    boxes: list[list[float]] | None = Field(None, description="(N, 4) boxes x0, y0, x1, y1 in pixels.")
    points: list[list[list[float]]] | None = Field(None, description="(N, P, 2) points x, y in pixels.")
    labels: list[list[int]] | None = Field(None, description="(N, P) point labels: 1 foreground, 0 background.")
    multimask: bool = Field(False, description="Three candidate masks per object instead of one.")
    format: Literal["rle", "png", "polygon"] = Field(
        "rle", description="COCO compressed RLE, a base64 1-bit PNG, or polygons (needs OpenCV on the server)."
    )


class LoadAdapterRequest(_Request):
    """`POST /v1/adapters`: load an adapter from the Hub or from a folder under the server's --adapter-root."""

    name: str = Field(description="The name requests will use: 1-64 letters, digits, '_' or '-'.")
    source: str = Field(description="A Hub repo id (org/name) or a folder relative to --adapter-root.")
    revision: str | None = Field(None, description="Hub branch, tag or commit.")


class Rle(BaseModel):
    size: list[int] = Field(description="[height, width].")
    counts: str = Field(description="COCO compressed RLE counts (column-major).")


class Mask(BaseModel):
    """One mask: which object (and candidate), its score and box, and the mask in the requested format."""

    object: int
    candidate: int | None = Field(None, description="0-2, only with multimask.")
    score: float = Field(description="The model's predicted IoU.")
    bbox: list[float] = Field(description="[x, y, width, height] in pixels.")
    area: int
    rle: Rle | None = None
    png: str | None = Field(None, description="Base64 1-bit PNG.")
    polygon: list[list[float]] | None = Field(None, description="Outer contours as flat [x0, y0, x1, y1, ...].")
    class_id: int | None = Field(
        None, description="Multi-class PTSAM adapter only: the class's trained id (mask value); one mask per class."
    )
    class_name: str | None = Field(None, description="Multi-class PTSAM adapter only: the class's name.")


class Encoding(BaseModel):
    encode_ms: float = Field(description="Time to encode the image (0 when the embedding came from the cache).")
    cache_hit: bool = Field(description="Whether the image's embedding came from the cache.")


class Timing(Encoding):
    decode_ms: float = Field(description="Time in the (micro-batched) decode, queueing included.")


class SegmentResponse(BaseModel):
    image_id: str
    adapter: str | None
    masks: list[Mask]
    timing: Timing


class ImageResponse(Encoding):
    """`POST /v1/images`: the image's id (a hash of its bytes), its size, and the encoding's timing."""

    image_id: str
    width: int
    height: int


class Adapter(BaseModel):
    name: str
    source: str
    revision: str | None
    kind: Literal["peft", "partial"]
    peft_type: str | None
    encoder: Literal["base", "own"] = Field(description="'base': shares the base's cached image embeddings.")
    prompt_free: bool
    classes: dict[str, str] | None = Field(
        None, description="A multi-class PTSAM adapter's classes, id to name (its id2label); null otherwise."
    )


class AdapterList(BaseModel):
    base_model: str
    adapters: list[Adapter]


class Health(BaseModel):
    status: Literal["ok"]
    base_model: str
    adapters: list[str]
    device: str


class Liveness(BaseModel):
    status: Literal["ok"]


class Readiness(BaseModel):
    status: Literal["ready", "warming"]
    warmed: bool = Field(description="The model answered one warm-up decode.")


class ErrorDetail(BaseModel):
    code: str = Field(description="A stable machine-readable code, e.g. unknown_adapter, bad_prompt, timeout.")
    message: str = Field(description="What went wrong and how to fix it.")


class ErrorResponse(BaseModel):
    error: ErrorDetail
