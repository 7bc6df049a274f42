"""What can go wrong with an oracle: each error's message says why and what to do (exit status 1, or 2 for a
model that does not fit the dataset)."""
from __future__ import annotations


class OracleError(RuntimeError):
    """The oracle cannot answer; the message says why and what to do."""


class OracleAuthError(OracleError):
    """401/403: no or wrong API key."""


class OracleUnavailableError(OracleError):
    """Connection failures, 503s or 429s that outlasted the retries."""


class OracleMismatchError(OracleError):
    """The model behind the oracle does not fit the dataset (classes, input shape)."""


class OracleAnswerError(OracleError):
    """The oracle answered something that is not what its declared output policy promises (too large, not a float
    array, wrong shape, non-finite, outside [0, 1], inconsistent with the policy). `row` is the first bad row of
    the batch when one row can be named. Such a batch is never cached."""

    def __init__(self, message: str, row: int | None = None):
        super().__init__(message)
        self.row = row
