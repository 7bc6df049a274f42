"""The one error shape every 4xx/5xx answer takes: `{"error": code, "detail": human-readable text}`."""
from __future__ import annotations

import json
from http import HTTPStatus

from bentoml.exceptions import BentoMLException


class InputError(BentoMLException):
    """A client input the service refuses. `error` is a short code, `detail` says what was wrong.

    BentoML answers a raised BentoMLException with `[{"error": str(exc)}]` and the exception's status;
    str(exc) is this error as JSON so that the guard middleware can restore the two fields exactly."""

    def __init__(self, error: str, detail: str, status: int = 400):
        self.error, self.detail, self.status = error, detail, status
        super().__init__(json.dumps({"error": error, "detail": detail}), error_code=HTTPStatus(status))

    def body(self) -> dict:
        return {"error": self.error, "detail": self.detail}

    def response(self):
        from starlette.responses import JSONResponse

        return JSONResponse(self.body(), status_code=self.status)


def error_body(error: str, detail: str) -> bytes:
    return json.dumps({"error": error, "detail": detail}).encode()
