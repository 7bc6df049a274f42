"""What /docs.json adds to BentoML's spec: the error shape, /metadata, the raw .npy and image-upload routes (served
by serving/bulk.py, which BentoML does not describe), the key schemes and every prediction route's error answers."""
from __future__ import annotations

import copy
import json

from serving.routes import MODEL


def _schema(model) -> tuple[dict, dict]:
    schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
    defs = schema.pop("$defs", {})
    return schema, defs


def _error_response(description: str) -> dict:
    return {"description": description,
            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}}}


ERRORS = {
    "400": "malformed input: invalid JSON or .npy, wrong rank, shape, channels or dtype, NaN/inf, values "
           "outside [0,1], empty batch, not an image, pickled .npy, an upload that is not exactly one file "
           "part named image",
    "401": "missing, unknown or revoked API key",
    "413": "batch above max_batch_rows, or body above the route's limit (/metadata body_limits)",
    "415": "wrong Content-Type",
    "429": "over the key's row budget or rate (Retry-After says when to retry a rate refusal)",
    "503": "overloaded, or the keys database is busy or unavailable; retry (Retry-After)",
}


def patch_openapi(body: bytes) -> bytes:
    from serving.schemas import ErrorResponse, ImageResponse, MetadataResponse

    spec = json.loads(body)
    comps = spec.setdefault("components", {})
    schemas = comps.setdefault("schemas", {})
    for model in (ErrorResponse, MetadataResponse, ImageResponse):
        schema, defs = _schema(model)
        schemas[model.__name__] = schema
        schemas.update(defs)
    comps.setdefault("securitySchemes", {}).update({
        "bearer": {"type": "http", "scheme": "bearer", "description": "API key (when keys are configured)"},
        "apiKey": {"type": "apiKey", "in": "header", "name": "X-API-Key"},
    })
    paths = spec.setdefault("paths", {})
    paths["/metadata"] = {"get": {
        "tags": ["Service APIs"], "operationId": "metadata", "description": "What the model takes and answers; open.",
        "responses": {"200": {"description": "model and policy description", "content": {
            "application/json": {"schema": {"$ref": "#/components/schemas/MetadataResponse"}}}}}}}
    paths["/predict_npy"] = {"post": {
        "tags": ["Service APIs"], "operationId": "predict_npy",
        "description": "Bulk prediction. Body: raw .npy (numpy.save) float32 in [0,1] or uint8 0..255, shape "
                       "(N, C, H, W). Answer: raw .npy float32 (N, num_classes): probabilities (policy probs); "
                       "top-k with the other entries 0 (topk); one-hot rows (label); rounded when decimals is set. "
                       "Header X-Output-Policy repeats the policy as JSON.",
        "requestBody": {"required": True, "content": {
            "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}},
        "responses": {"200": {"description": "float32 (N, num_classes) .npy", "headers": {
            "X-Output-Policy": {"schema": {"type": "string"}, "description": "the output policy as JSON"}},
            "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}}}}}
    paths["/classify_image"] = {"post": {
        "tags": ["Service APIs"], "operationId": "classify_image",
        "description": "Upload one PNG or JPEG image: exactly one file part named `image` (converted to the model's "
                       "channels and resized to its H×W) and optionally one `top_k` field; top-k class names and "
                       "probabilities under the output policy. A text part named `image` (a URL) is refused, "
                       "never fetched.",
        "requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
            "type": "object", "required": ["image"], "properties": {
                "image": {"type": "string", "format": "binary", "description": "the image file (PNG or JPEG)"},
                "top_k": {"type": "integer", "minimum": 1, "maximum": 1000, "default": 5,
                          "description": "classes to return"}}}}}},
        "responses": {"200": {"description": "the most probable classes", "content": {
            "application/json": {"schema": {"$ref": "#/components/schemas/ImageResponse"}}}}}}}
    security = [{"bearer": []}, {"apiKey": []}, {}]
    for route in MODEL:
        op = paths.get(route, {}).get("post")
        if op is None:
            continue
        op["security"] = copy.deepcopy(security)
        responses = op.setdefault("responses", {})
        for code in list(responses):
            if code not in ("200",) and str(code).startswith(("4", "5")):
                del responses[code]
        for code, text in ERRORS.items():
            responses[code] = _error_response(text)
    return json.dumps(spec).encode()
