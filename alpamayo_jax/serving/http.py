"""The HTTP API (FastAPI): NIM's trajectory endpoint and its service endpoints.

    POST /v1/infer          trajectories for one clip (`alpamayo_jax.serving.nim`)
    GET  /v1/health/ready   200 once warm, 503 before (loading, warming up) and while stopping; NIM's
                            body ({"object": "health.response", "message", "status"}; on 503 an
                            "error" object) with "ready": true / false
    GET  /v1/health/live    200 while the process serves
    GET  /v1/models         the served model, OpenAI style with NIM's card fields (backend
                            "jax", checkpoint "default")
    GET  /v1/metrics        Prometheus text: request counts, latency histograms per stage

Errors are JSON {"error": "<field>: <what is wrong>", "detail": [{"loc", "msg", "type"}...]}: 422 for
a request that does not validate (field named in `loc` and in `error`), 413 for a body over the
limit (128 MiB), 503 before the model is warm or while stopping, 500 when the model fails (the
server keeps serving). `/v1/infer` runs in FastAPI's thread pool and waits for the inference
worker there, so the health endpoints (on the event loop) answer whatever the model is doing.
"""

from __future__ import annotations

import json
import logging
import time

from alpamayo_jax.processing.clip import ClipError
from alpamayo_jax.serving.dependencies import require
from alpamayo_jax.serving.metrics import CONTENT_TYPE
from alpamayo_jax.serving.nim import InferRequest, RequestError, format_location, parse_request, response_body
from alpamayo_jax.serving.state import ServingState
from alpamayo_jax.serving.worker import ServerStopping

require("fastapi")
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

logger = logging.getLogger(__name__)

ROUTES = ("/v1/infer", "/v1/health/ready", "/v1/health/live", "/v1/models", "/v1/metrics")


def error_response(status: int, errors: list[tuple[tuple, str, str]]) -> JSONResponse:
    """{"error": summary, "detail": [...]} from (location, message, type) triples."""
    detail = [{"loc": ["body", *loc] if loc and loc[0] != "body" else list(loc) or ["body"], "msg": msg,
               "type": kind} for loc, msg, kind in errors]
    summary = "; ".join(f"{format_location(loc)}: {msg}" for loc, msg, _ in errors)
    return JSONResponse({"error": summary, "detail": detail}, status_code=status)


def _validation_message(error: dict) -> str:
    kind, msg = error.get("type", ""), error.get("msg", "invalid")
    if kind == "extra_forbidden":
        return "unknown field (not part of the /v1/infer trajectory request)"
    if kind == "missing":
        return "required field missing"
    if kind == "json_invalid":
        where = error.get("loc", ("body", None))[-1]
        return f"not valid JSON ({error.get('ctx', {}).get('error', msg)} at character {where})"
    return msg


class BodyLimit:
    """ASGI middleware refusing request bodies over `limit` bytes with 413: at once when
    Content-Length says so, else as soon as the streamed body passes the limit."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        length = headers.get(b"content-length")
        if length is not None:
            try:
                declared = int(length)
            except ValueError:
                return await _send_json(send, 400, {"error": "Content-Length: not a number"})
            if declared > self.limit:
                return await _send_json(send, 413, self._too_large(declared))
        received = 0

        async def limited_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:  # FastAPI passes HTTP exceptions of the body read through
                    raise StarletteHTTPException(413, self._too_large(None)["error"])
            return message

        await self.app(scope, limited_receive, send)

    def _too_large(self, declared: int | None) -> dict:
        size = "the request body is" if declared is None else f"a request body of {declared:,} bytes is"
        message = f"{size} over the limit of {self.limit:,} bytes ({self.limit / 2**20:g} MiB)"
        return {"error": f"body: {message}",
                "detail": [{"loc": ["body"], "msg": message, "type": "body_too_large"}]}


class RequestMetrics:
    """ASGI middleware counting answered requests by path and status, and timing them."""

    def __init__(self, app, metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start = time.perf_counter()
        status = 500

        async def recording_send(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, recording_send)
        finally:
            path = scope.get("path", "")
            path = path if path in ROUTES else "other"
            self.metrics.inc("alpamayo_http_requests_total", path=path, status=str(status))
            self.metrics.observe("alpamayo_http_request_seconds", time.perf_counter() - start, path=path)


async def _send_json(send, status: int, body: dict) -> None:
    payload = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": payload})


def create_app(state: ServingState) -> FastAPI:
    """The app serving `state` (filled in by the server as it loads and warms up)."""
    app = FastAPI(title="alpamayo-jax", description=__doc__, version="1.0.0", docs_url=None, redoc_url=None)
    metrics = state.metrics

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError):
        errors = []
        for error in exc.errors():
            loc = tuple(error.get("loc", ()))
            loc = loc[1:] if loc[:1] == ("body",) else loc
            if error.get("type") == "json_invalid":  # the location is a character offset
                loc = ()
            errors.append((loc, _validation_message(error), error.get("type", "value_error")))
        return error_response(422, errors)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        return JSONResponse({"error": str(exc.detail), "detail": [{"loc": [], "msg": str(exc.detail),
                                                                  "type": "http_error"}]},
                            status_code=exc.status_code, headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception):
        logger.exception("unhandled error serving %s", request.url.path)
        return error_response(500, [((), f"internal error: {type(exc).__name__}: {exc}", "internal_error")])

    @app.post("/v1/infer")
    def infer(body: InferRequest):
        start = time.perf_counter()
        if not state.ready:
            return error_response(503, [((), f"the model is not ready ({state.phase})", "not_ready")])
        pipeline, worker = state.pipeline, state.worker
        try:
            request = parse_request(body, config=pipeline.config, defaults=state.settings,
                                    default_seed=state.default_seed)
        except RequestError as error:
            return error_response(422, [(loc, message, "value_error") for loc, message in error.errors])
        decoded = time.perf_counter()
        try:
            inputs = pipeline.prepare(request.clip)
        except (ClipError, ValueError) as error:
            return error_response(422, [((), str(error), "value_error")])
        prepared = time.perf_counter()
        try:
            samples = worker.run(inputs, seed=request.seed, settings=request.settings, source="http")
        except ServerStopping as error:
            return error_response(503, [((), str(error), "stopping")])
        except Exception as error:  # noqa: BLE001 -- the model failed; the worker keeps serving
            return error_response(500, [((), f"inference failed: {type(error).__name__}: {error}",
                                         "inference_error")])
        timings = {"decode_images": round(decoded - start, 4), "prepare_inputs": round(prepared - decoded, 4),
                   **samples.timings, "total": round(time.perf_counter() - start, 4)}
        for stage in ("decode_images", "prepare_inputs", "total"):
            metrics.observe("alpamayo_stage_seconds", timings[stage], source="http", stage=stage)
        return response_body(samples, model=state.model_name, seed=request.seed, settings=request.settings,
                             warnings=request.warnings, timings=timings)

    @app.get("/v1/health/ready")
    async def ready():
        if state.ready:
            return {"object": "health.response", "message": "the model is warm and serving", "status": "ready",
                    "ready": True}
        message = f"the model is not ready ({state.phase})"
        return JSONResponse({"object": "health.response", "message": message, "status": state.phase, "ready": False,
                             "error": {"message": message, "type": "not_ready"}}, status_code=503)

    @app.get("/v1/health/live")
    async def live():
        return {"live": True, "status": state.phase}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": state.model_name, "object": "model", "created": state.created,
                                            "owned_by": "alpamayo-jax", "backend": "jax", "checkpoint": "default",
                                            "ready": state.ready}]}

    @app.get("/v1/metrics")
    async def prometheus():
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    app.add_middleware(BodyLimit, limit=state.max_body_bytes)  # refuses before anything reads the body
    app.add_middleware(RequestMetrics, metrics=metrics)  # outermost: counts the refusals too
    return app
