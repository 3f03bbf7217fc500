"""Request and response bodies of the HTTP API, and the checks that turn bad input into 4xx errors.

Types are enforced by pydantic (and so appear in the OpenAPI document); limits come from the running
service's config and are checked by ``check_unlearn`` / ``check_generate``.
"""

from __future__ import annotations

import hashlib
import json
import math
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from r2f_ray.service.config import Limits


class ServiceError(Exception):
    """An error with an HTTP status, a stable code and a message that names the fix."""

    def __init__(self, status: int, code: str, message: str, field: str | None = None):
        super().__init__(message)
        self.status, self.code, self.message, self.field = status, code, message, field

    def body(self) -> dict:
        err = {"code": self.code, "message": self.message}
        if self.field is not None:
            err["field"] = self.field
        return {"error": err}


class ErrorDetail(BaseModel):
    code: str
    message: str
    field: str | None = None


class ErrorBody(BaseModel):
    error: ErrorDetail


class ForgetItem(BaseModel):
    model_config = ConfigDict(extra="forbid")

    id: str | None = Field(None, description="caller's id of this request, echoed in reports")
    prompt: str = Field(..., description="the question whose answer must be forgotten")
    answer: str = Field(..., description="the answer to forget")


class UnlearnBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    requests: list[ForgetItem] = Field(..., description="forget requests applied together as one update")
    views: int | None = Field(None, description="paraphrase views per request (default from the config)")
    step: Literal["auto"] | float = Field("auto", description="'auto' (smallest step that forgets) or a step size > 0")
    method: str = Field("r2f", description="engine method")
    dry_run: bool = Field(False, description="compute the update and its metrics, store nothing, change nothing")
    idempotency_key: str | None = Field(None, description="a retried call with the same key applies once")

    @field_validator("step", mode="before")
    @classmethod
    def _step(cls, v: Any) -> Any:
        if isinstance(v, bool) or not (v == "auto" or isinstance(v, (int, float))):
            raise ValueError("step must be 'auto' or a number > 0")
        return v

    def fingerprint(self) -> str:
        """Hash of what the call asks for (the idempotency key itself excluded)."""
        body = self.model_dump(mode="json", exclude={"idempotency_key"})
        return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


class GenerateBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    prompt: str = Field(..., description="user message (or raw text with chat=false)")
    max_new_tokens: int = Field(32, description="greedy tokens to generate")
    chat: bool = Field(True, description="wrap the prompt in the model's chat template")


class GenerateOut(BaseModel):
    text: str
    version: str
    new_tokens: int


class JobAccepted(BaseModel):
    job_id: str
    status: str
    status_url: str
    replayed: bool = False


class JobOut(BaseModel):
    job_id: str
    status: Literal["queued", "running", "succeeded", "failed"]
    created: str
    started: str | None = None
    finished: str | None = None
    actor: str
    request: dict
    result: dict | None = None
    error: str | None = None


class VersionOut(BaseModel):
    version: str
    parent: str | None
    created: str
    active: bool
    requests: list[dict] = []
    matrices: int = 0
    method: str | None = None
    step: float | None = None
    metrics: dict | None = None
    job_id: str | None = None


class ModelsOut(BaseModel):
    model_id: str
    active: str
    versions: list[VersionOut]


class ActivateOut(BaseModel):
    active: str
    previous: str


def _text(value: str, name: str, limit: int) -> None:
    if not value.strip():
        raise ServiceError(422, "empty_field", f"{name} is empty; send non-blank text", name)
    if len(value) > limit:
        raise ServiceError(422, "too_long", f"{name} has {len(value)} characters; the limit is {limit}", name)


def check_unlearn(body: UnlearnBody, limits: Limits, methods: tuple[str, ...]) -> None:
    if not body.requests:
        raise ServiceError(422, "no_requests", "requests is empty; send at least one {prompt, answer}", "requests")
    if len(body.requests) > limits.max_requests:
        raise ServiceError(422, "too_many_requests", f"{len(body.requests)} forget requests in one call; the limit is "
                           f"{limits.max_requests}: split them over several calls", "requests")
    for i, r in enumerate(body.requests):
        _text(r.prompt, f"requests[{i}].prompt", limits.max_prompt_chars)
        _text(r.answer, f"requests[{i}].answer", limits.max_answer_chars)
        if r.id is not None and not 0 < len(r.id) <= limits.max_id_chars:
            raise ServiceError(422, "bad_id", f"requests[{i}].id must have 1 to {limits.max_id_chars} characters", f"requests[{i}].id")
    if body.step != "auto":
        if not math.isfinite(body.step) or not 0 < body.step <= limits.max_step:
            raise ServiceError(422, "bad_step", f"step must be 'auto' or a number in (0, {limits.max_step}], got {body.step}", "step")
    if body.method not in methods:
        raise ServiceError(422, "unknown_method", f"unknown method {body.method!r}; this service offers {list(methods)}", "method")
    if body.idempotency_key is not None and not 0 < len(body.idempotency_key) <= limits.max_id_chars:
        raise ServiceError(422, "bad_idempotency_key", f"idempotency_key must have 1 to {limits.max_id_chars} characters", "idempotency_key")


def check_generate(body: GenerateBody, limits: Limits) -> None:
    _text(body.prompt, "prompt", limits.max_prompt_chars)
    if not 1 <= body.max_new_tokens <= limits.max_new_tokens:
        raise ServiceError(422, "bad_max_new_tokens", f"max_new_tokens must be between 1 and {limits.max_new_tokens}, "
                           f"got {body.max_new_tokens}", "max_new_tokens")
