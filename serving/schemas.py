"""Request and response models of the HTTP API; they are what /docs.json shows."""
from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field, WithJsonSchema
from typing_extensions import Annotated

from protect.card import Normalization  # the card's own class (torch-free, packed by bentofile.yaml)

NESTED_PIXELS = {
    "type": "array", "minItems": 1,
    "description": "Raw pixels in [0, 1], shape (N, C, H, W); C, H, W as /metadata `input_shape`. "
                   "The service normalises them itself.",
    "items": {"type": "array", "items": {"type": "array", "items": {
        "type": "array", "items": {"type": "number", "minimum": 0, "maximum": 1}}}},
}
# Validated by the service (rank, shape, channels, range, finiteness) so that each problem gets its own
# error code; the schema still says exactly what to send.
Pixels = Annotated[list[Any], WithJsonSchema(NESTED_PIXELS)]


class PolicyInfo(BaseModel):
    kind: Literal["probs", "topk", "label"] = Field(description="probs: every class probability; topk: the k most "
                                                    "probable classes; label: the predicted class only")
    k: int | None = Field(None, description="k under the topk policy, else null")
    decimals: int | None = Field(None, description="probabilities are rounded to this many decimals; null: not rounded")


class ClassScore(BaseModel):
    index: int = Field(description="class index")
    class_name: str
    prob: float | None = Field(description="probability (rounded under the policy); null under the label policy")


class RowPrediction(BaseModel):
    label: int = Field(description="index of the most probable class")
    class_name: str
    probs: list[float] = Field(description="all class probabilities, in class order, under policy probs; "
                               "empty under the other policies")
    topk: list[ClassScore] = Field(description="the k most probable classes, most probable first, under policy "
                                   "topk; empty under the other policies")


class PredictResponse(BaseModel):
    policy: PolicyInfo = Field(description="the output policy that produced this answer: which fields are filled")
    predictions: list[RowPrediction]


class ImageResponse(BaseModel):
    policy: PolicyInfo
    top: list[ClassScore] = Field(description="most probable classes first; at most the policy's k under topk, "
                                  "the label only (prob null) under label")


class MetadataResponse(BaseModel):
    classes: list[str]
    num_classes: int
    input_shape: list[int] = Field(description="(C, H, W) of one input")
    normalization: Normalization = Field(description="what the service applies to the raw [0,1] pixels")
    model_sha256: str = Field(description="sha256 of the served model.onnx, checked against the card at start")
    mode: str = Field(description="training mode of the model (cmim, mcmi, ce, ls, nasty)")
    output_policy: PolicyInfo
    max_batch_rows: int
    max_body_bytes: int = Field(description="the ceiling of every route's body limit")
    body_limits: dict[str, int] = Field(description="each prediction route's body limit in bytes: what max_batch_rows "
                                        "rows take in its encoding (.npy float32, JSON text, one image)")
    dataset: str
    arch: str
    test_accuracy: float | None
    options: dict[str, Any] | None = Field(description="training options; null when the owner hides them")
    input_dtypes: list[str]
    keys_required: bool = Field(description="prediction endpoints need an API key (Authorization: Bearer or X-API-Key)")


class ErrorResponse(BaseModel):
    error: str = Field(description="short code, e.g. bad_shape, out_of_range, over_budget, unauthorized")
    detail: str = Field(description="what was wrong, in words")
