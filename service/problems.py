"""RFC 9457 problem details: every error the HTTP API answers looks like this.

``{"type", "title", "status", "detail", "errors": [{"field", "rule"}]}`` with
``Content-Type: application/problem+json``. Messages are written for the
caller and never carry secrets or another team's data.
"""

from __future__ import annotations

from typing import Any

from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

PROBLEM_MEDIA_TYPE = "application/problem+json"
TYPE_BASE = "https://resultsvc.dev/problems/"
_PROBLEM_REF = "#/components/schemas/ProblemModel"


class FieldError(BaseModel):
    field: str = Field(description="Path of the offending field, e.g. results[3].severity")
    rule: str = Field(description="The rule it broke")


class ProblemModel(BaseModel):
    """The body of every error answer (RFC 9457)."""

    type: str
    title: str
    status: int
    detail: str
    errors: list[FieldError] = Field(default_factory=list)


class Problem(Exception):
    """Raise to answer with a problem document."""

    def __init__(
        self,
        status: int,
        title: str,
        detail: str,
        *,
        kind: str | None = None,
        errors: list[dict[str, str]] | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(detail)
        self.status = status
        self.title = title
        self.detail = detail
        self.kind = kind or title.lower().replace(" ", "-")
        self.errors = errors or []
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {
            "type": TYPE_BASE + self.kind,
            "title": self.title,
            "status": self.status,
            "detail": self.detail,
            "errors": self.errors,
        }

    def response(self) -> JSONResponse:
        return JSONResponse(
            self.body(),
            status_code=self.status,
            media_type=PROBLEM_MEDIA_TYPE,
            headers=self.headers,
        )


def problem_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI entries documenting the problem answers of an operation."""
    titles = {
        400: "Bad request",
        401: "Missing or invalid token",
        403: "Token lacks the scope",
        404: "Not found (or another team's)",
        409: "Conflict (state, or the same Idempotency-Key still running)",
        413: "Body over the size limit",
        422: "Invalid input (fields listed), or Idempotency-Key reused with another body",
        503: "Views behind the requested position (retry after Retry-After)",
    }
    return {
        status: {
            "model": ProblemModel,
            "description": titles.get(status, "Problem"),
            "content": {PROBLEM_MEDIA_TYPE: {"schema": {"$ref": _PROBLEM_REF}}},
        }
        for status in statuses
    }
