"""The HTTP API (FastAPI). Routes are thin: parse, authenticate, call ``UnlearnService``.

Every error body is ``{"error": {"code", "message", "field"?}}``. Mutating and state-revealing routes
need a bearer token; generate needs one only when the config says so.
"""

from __future__ import annotations

import asyncio
import importlib.metadata
from typing import Awaitable, Callable

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from r2f_ray.service.auth import AuthError
from r2f_ray.service.core import UnlearnService
from r2f_ray.service.metrics import CONTENT_TYPE
from r2f_ray.service.schemas import (ActivateOut, ErrorBody, GenerateBody, GenerateOut, JobAccepted, JobOut,
                                     ModelsOut, ServiceError, UnlearnBody)

_ERRORS = {code: {"model": ErrorBody} for code in (401, 404, 409, 411, 413, 422, 429)}


def _error(status: int, code: str, message: str, field: str | None = None, headers: dict | None = None) -> JSONResponse:
    return JSONResponse(ServiceError(status, code, message, field).body(), status_code=status, headers=headers)


class _Guard:
    """ASGI middleware: refuses oversized or unsized bodies before they are read, counts responses."""

    def __init__(self, app, service: UnlearnService):
        self.app, self.service = app, service

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = {}

        async def send_and_count(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            if scope["method"] in ("POST", "PUT", "PATCH"):
                headers = dict(scope["headers"])
                length = headers.get(b"content-length")
                limit = self.service.limits.max_body_bytes
                if length is None and b"transfer-encoding" in headers:  # a streamed body of unknown size
                    return await _error(411, "length_required", "send a Content-Length header with the body")(scope, receive, send_and_count)
                if length is not None and (not length.isdigit() or int(length) > limit):
                    return await _error(413, "body_too_large", f"the body has {length.decode(errors='replace')} bytes; "
                                        f"the limit is {limit}")(scope, receive, send_and_count)
            await self.app(scope, receive, send_and_count)
        finally:
            route = scope.get("route")
            self.service.metrics.http_requests.labels(getattr(route, "path", "unmatched"), str(status.get("code", 500))).inc()


def build_app(service: UnlearnService, generate: Callable[[GenerateBody], Awaitable[dict]] | None = None) -> FastAPI:
    """The FastAPI app over ``service``. ``generate`` answers one request (the Serve shell passes its
    ``@serve.batch`` method); by default each request is its own batch."""
    app = FastAPI(title="r2f_ray unlearning service", version=importlib.metadata.version("r2f_ray"),
                  description="Recover-to-Forget unlearning of a served LLM: forget requests become versioned "
                              "weight deltas; generate answers from the active version.")
    bearer = HTTPBearer(auto_error=False, description="a token from the service's tokens file or environment")

    if generate is None:
        async def generate(body: GenerateBody) -> dict:
            return (await asyncio.to_thread(service.generate_batch, [body]))[0]

    def caller(creds: HTTPAuthorizationCredentials | None = Depends(bearer)) -> str:
        if not service.auth.enabled:
            return "anonymous"
        if creds is None:
            raise AuthError("missing bearer token; send 'Authorization: Bearer <token>'")
        return service.auth.authenticate(f"Bearer {creds.credentials}")

    @app.exception_handler(ServiceError)
    async def _service_error(request: Request, e: ServiceError):
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(AuthError)
    async def _auth_error(request: Request, e: AuthError):
        return _error(401, "unauthorized", str(e), headers={"WWW-Authenticate": "Bearer"})

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, e: RequestValidationError):
        problems = [f"{'.'.join(str(p) for p in err['loc'] if p != 'body') or 'body'}: {err['msg']}" for err in e.errors()]
        first = e.errors()[0]["loc"] if e.errors() else ()
        field = ".".join(str(p) for p in first if p != "body") or None
        return _error(422, "invalid_request", "; ".join(problems), field)

    @app.post("/v1/unlearn", status_code=202, response_model=JobAccepted, responses=_ERRORS,
              summary="queue forget requests; they are applied as one update, one job at a time")
    def unlearn(body: UnlearnBody, request: Request, actor: str = Depends(caller)):
        job, replayed = service.submit_unlearn(body, actor)
        url = f"/v1/jobs/{job['job_id']}"
        out = JobAccepted(job_id=job["job_id"], status=job["status"], status_url=url, replayed=replayed)
        return JSONResponse(out.model_dump(), status_code=202, headers={"Location": url})

    @app.get("/v1/jobs/{job_id}", response_model=JobOut, responses=_ERRORS, summary="status and report of a job")
    def job_status(job_id: str, actor: str = Depends(caller)):
        job = service.jobs.get(job_id)
        return JobOut(**{k: job[k] for k in JobOut.model_fields})

    @app.post("/v1/generate", response_model=GenerateOut, responses=_ERRORS,
              summary="greedy answer from the active version (requests are batched)")
    async def generate_route(body: GenerateBody, creds: HTTPAuthorizationCredentials | None = Depends(bearer)):
        if service.config.generate_requires_auth:
            caller(creds)
        service.check_generate(body)
        return await generate(body)

    @app.get("/v1/models", response_model=ModelsOut, responses=_ERRORS, summary="all versions and the active one")
    def models(actor: str = Depends(caller)):
        return service.models()

    @app.post("/v1/models/{version}/activate", response_model=ActivateOut, responses=_ERRORS,
              summary="make a stored version active (roll back or forward)")
    def activate(version: str, actor: str = Depends(caller)):
        return service.activate(version, actor)

    @app.get("/healthz", summary="the process and its writer thread are alive")
    def healthz():
        alive = service.jobs.alive()
        return JSONResponse({"ok": alive}, status_code=200 if alive else 503)

    @app.get("/readyz", summary="the model is loaded on its active version and jobs are accepted")
    def readyz():
        body = {"ready": service.ready, "active": service.active_version, "model_id": service.model_id}
        return JSONResponse(body, status_code=200 if service.ready else 503)

    @app.get("/metrics", summary="Prometheus metrics", response_class=Response)
    def metrics():
        service.metrics.queue_depth.set(service.jobs.depth())
        return Response(service.metrics.render(), media_type=CONTENT_TYPE)

    app.add_middleware(_Guard, service=service)
    return app
